//! The distillation training loop (NeMo's `megatron_gpt_distillation.py` semantics,
//! nemo-format.md §5): teacher and student at the launch TP, the student restored or built
//! from the config, KD loss per micro-batch (masked mean over valid tokens, summed over TP
//! ranks) averaged over the step's micro-batches, AdamW with cosine annealing and global-norm
//! clipping, validation (KD loss and the student's LM cross-entropy) every
//! `val_check_interval` steps, periodic checkpoints with exact resume, and the student saved
//! as a `.nemo` at the end. Metrics go to a callback (the CLI prints them), `metrics.jsonl`,
//! TensorBoard event files and a PNG plot in the experiment folder.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::hidden_loss::Projection;
use super::job::{Job, Precision};
use super::loss::{self, log_softmax_tp, Parts, Teacher};
use super::model::{self, Gpt, InitFrom, NamedParam, Stage};
use super::optim::{self, AdamW};
use super::parallel::{self, Grid, ProcessGroup};
use super::pipeline::{self, Batch};
use super::save::{self, StudentArchive};
use super::spec::{self, GptSpec};
use super::state::{self, StepRecord, TrainState, ValRecord};
use super::teacher_cache::{self, Cache};
use super::weights::{self, Source};
use crate::distill::obs::plot::{self, Series};
use crate::distill::obs::tensorboard::EventWriter;
use crate::distill::sampling::{self, BlendedSamples, Split};
use crate::io::bytes::ByteView;
use crate::model::checkpoint::{self as ckpt, Checkpoint};
use crate::model::config::{self, ModelConfig};
use crate::model::layout::Rule;

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening a checkpoint.
    #[error("{path}: {source}")]
    Checkpoint {
        /// Which.
        path: PathBuf,
        /// Why (boxed: checkpoint errors are large).
        source: Box<ckpt::Error>,
    },
    /// A model config that cannot be used.
    #[error("{what} config: {source}")]
    Config {
        /// Student or teacher.
        what: &'static str,
        /// Why.
        source: config::Error,
    },
    /// An architecture the engine cannot run.
    #[error("{what}: {source}")]
    Spec {
        /// Student or teacher.
        what: &'static str,
        /// Why.
        source: spec::Error,
    },
    /// Reading weights.
    #[error("{what}: {source}")]
    Weights {
        /// Student or teacher.
        what: &'static str,
        /// Why.
        source: weights::Error,
    },
    /// Building or running a model.
    #[error(transparent)]
    Model(#[from] model::Error),
    /// The loss.
    #[error(transparent)]
    Loss(#[from] loss::Error),
    /// The optimizer.
    #[error(transparent)]
    Optim(#[from] optim::Error),
    /// A collective.
    #[error(transparent)]
    Parallel(#[from] parallel::Error),
    /// A pipeline step.
    #[error(transparent)]
    Pipeline(#[from] pipeline::Error),
    /// Data.
    #[error("data: {0}")]
    Data(#[from] sampling::Error),
    /// The teacher cache.
    #[error(transparent)]
    TeacherCache(#[from] teacher_cache::Error),
    /// Checkpoints.
    #[error("training checkpoint: {0}")]
    State(#[from] state::Error),
    /// Writing the student.
    #[error(transparent)]
    Save(#[from] save::Error),
    /// A setting from the environment that cannot be used.
    #[error("{0}")]
    Setting(String),
    /// Student and teacher that cannot be distilled into each other.
    #[error("student and teacher: {0}")]
    Mismatch(String),
    /// Output files (metrics, TensorBoard, plot).
    #[error("{path}: {why}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

/// Name prefix of the KD projection layer's parameters in the optimizer and run checkpoints.
pub const PROJECTION: &str = "kd_projection.";

/// Progress reported to the caller (rank 0 only).
#[derive(Debug)]
pub enum Event<'a> {
    /// A one-line note (what was loaded, where things go).
    Info(String),
    /// A training step finished.
    Step(&'a StepRecord),
    /// A validation finished.
    Val(&'a ValRecord),
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The student `.nemo`.
    pub nemo_path: PathBuf,
    /// The experiment folder.
    pub exp_dir: PathBuf,
    /// The KD loss plot.
    pub plot: PathBuf,
    /// All metrics.
    pub history: TrainState,
    /// Step the run resumed from (0 for a fresh run).
    pub resumed_from: u64,
}

/// A checkpoint opened as a model source, with its config.
struct Opened {
    ck: Checkpoint,
}

fn open(path: &Path) -> Result<Opened, Error> {
    let ck = Checkpoint::open(path).map_err(|source| Error::Checkpoint {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    Ok(Opened { ck })
}

/// The tokenizer's vocabulary size, when a tokenizer file is at hand.
fn true_vocab(job: &Job, teacher: &Checkpoint) -> Option<u64> {
    if let Some(f) = &job.tokenizer_file {
        let bytes = std::fs::read(f).ok()?;
        let name = f.file_name()?.to_string_lossy().into_owned();
        return crate::model::tokenizer::vocab_size(&name, &bytes)
            .ok()
            .flatten();
    }
    let name = teacher.config.tokenizer().model.clone()?;
    let member = name.strip_prefix("nemo:")?;
    let bytes = teacher.read_member(member).ok()?;
    crate::model::tokenizer::vocab_size(member, bytes.as_slice())
        .ok()
        .flatten()
}

/// The models of a run.
pub struct Models {
    /// Trainable student.
    pub student: Gpt,
    /// Frozen teacher (None when a teacher cache stands in for it).
    pub teacher: Option<Gpt>,
    /// The teacher cache (`model.kd.teacher_cache`).
    pub cache: Option<Cache>,
    /// The student's config text (from its checkpoint, or the run's `model` section).
    pub student_config: ModelConfig,
    /// The student was restored from a checkpoint using TE-fused norm names.
    pub te_norm_names: bool,
    /// Tokenizer artifacts to save with the student, and config edits pointing at them.
    pub artifacts: Vec<(String, ByteView)>,
    /// Config updates for the saved student (`key`, YAML scalar).
    pub config_updates: Vec<(String, String)>,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Models").finish_non_exhaustive()
    }
}

fn kind_of(p: Precision) -> Kind {
    match p {
        Precision::Fp32 => Kind::Float,
        Precision::Bf16Mixed => Kind::BFloat16,
    }
}

/// This rank's pipeline stage of a `layers`-layer model, with the issue named for the model.
fn stage_of(grid: &Grid, layers: usize, what: &'static str) -> Result<Stage, Error> {
    let stage = Stage {
        index: grid.stage() as usize,
        count: grid.layout.pp as usize,
    };
    if layers % stage.count != 0 {
        return Err(match what {
            "teacher" => Error::Mismatch(format!(
                "pipeline mismatch: the teacher's {layers} layers do not split into {} stages; the teacher runs at the student's pipeline_model_parallel_size with stage-aligned layers (as in NeMo)",
                stage.count
            )),
            _ => Error::Setting(format!(
                "the {what}'s num_layers {layers} is not divisible by pipeline_model_parallel_size {}",
                stage.count
            )),
        });
    }
    Ok(stage)
}

/// This rank's TP shard of its pipeline stage of the model in `ck` (`what`: student or
/// teacher, for errors), and whether the checkpoint uses TE-fused norm names.
fn checkpoint_model(
    ck: &Checkpoint,
    what: &'static str,
    grid: &Grid,
    tp: u64,
    kind: Kind,
    device: Device,
    trainable: bool,
) -> Result<(Gpt, bool), Error> {
    let src = Source::new(ck).map_err(|source| Error::Weights { what, source })?;
    let vocab = src
        .padded_vocab(ck.config.make_vocab_size_divisible_by(), tp)
        .map_err(|source| Error::Weights { what, source })?;
    let spec = GptSpec::from_config(&ck.config, tp, vocab)
        .map_err(|source| Error::Spec { what, source })?;
    let te = src.exists("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight");
    let stage = stage_of(grid, spec.num_layers, what)?;
    let m = Gpt::new_stage(
        spec,
        &InitFrom::Checkpoint(&src),
        &grid.tp,
        kind,
        device,
        trainable,
        stage,
    )?;
    Ok((m, te))
}

/// Loads the teacher and builds the student (restored or from the config) at the launch TP,
/// this rank's pipeline stage of each.
///
/// # Errors
/// Checkpoint, config, spec and weight errors; [`Error::Mismatch`] when the padded
/// vocabularies differ (the KL needs the same logits shape) or the teacher's layers do not
/// split into the pipeline's stages; [`Error::Setting`] when the student's do not.
pub fn load_models(job: &Job, grid: &Grid, device: Device) -> Result<Models, Error> {
    let pg = &grid.tp;
    let tp = job.tp;
    let kind = kind_of(job.precision);
    let t = open(&job.teacher)?;
    // with a teacher cache only the teacher's config and tokenizer are read
    let teacher = match job.teacher_cache {
        None => Some(checkpoint_model(&t.ck, "teacher", grid, tp, kind, device, false)?.0),
        Some(_) => None,
    };
    let tvocab = match &teacher {
        Some(m) => u64::try_from(m.spec.padded_vocab).unwrap_or(0),
        None => Source::new(&t.ck)
            .and_then(|s| s.padded_vocab(t.ck.config.make_vocab_size_divisible_by(), tp))
            .map_err(|source| Error::Weights {
                what: "teacher",
                source,
            })?,
    };
    // the tokenizer the student is trained and saved with, for the cache's check
    let mut tokenizer = None;

    let mut artifacts: Vec<(String, ByteView)> = Vec::new();
    let mut updates: Vec<(String, String)> = vec![
        ("tensor_model_parallel_size".into(), tp.to_string()),
        ("pipeline_model_parallel_size".into(), "1".into()),
        (
            "precision".into(),
            match job.precision {
                Precision::Fp32 => "32".into(),
                Precision::Bf16Mixed => "bf16-mixed".into(),
            },
        ),
    ];
    let (student, student_config, te) = match &job.student {
        Some(path) => {
            let s = open(path)?;
            let (m, te) = checkpoint_model(&s.ck, "student", grid, tp, kind, device, true)?;
            tokenizer = Some(teacher_cache::tokenizer_fingerprint(&s.ck, None));
            for a in &s.ck.artifacts {
                if let Ok(b) = s.ck.read_member(a) {
                    artifacts.push((a.clone(), b));
                }
            }
            (m, s.ck.config.clone(), te)
        }
        None => {
            let cfg = ModelConfig::parse(&job.model_yaml).map_err(|source| Error::Config {
                what: "student (model section)",
                source,
            })?;
            let vocab = match true_vocab(job, &t.ck) {
                Some(v) => cfg.padded_vocab(v, tp).map_err(|source| Error::Config {
                    what: "student",
                    source,
                })?,
                None => tvocab,
            };
            let spec = GptSpec::from_config(&cfg, tp, vocab).map_err(|source| Error::Spec {
                what: "student",
                source,
            })?;
            let stage = stage_of(grid, spec.num_layers, "student")?;
            let m = Gpt::new_stage(
                spec,
                &InitFrom::Random {
                    seed: job.seed as i64,
                },
                pg,
                kind,
                device,
                true,
                stage,
            )?;
            if job.tokenizer_file.is_none() {
                // NeMo: the teacher's tokenizer when the student names none
                let tk = t.ck.config.tokenizer().clone();
                for a in &t.ck.artifacts {
                    if let Ok(b) = t.ck.read_member(a) {
                        artifacts.push((a.clone(), b));
                    }
                }
                let q = |v: &Option<String>| match v {
                    Some(s) => format!("'{}'", s.replace('\'', "''")),
                    None => "null".to_string(),
                };
                updates.push(("tokenizer.library".into(), q(&tk.library)));
                updates.push(("tokenizer.type".into(), q(&tk.type_)));
                updates.push(("tokenizer.model".into(), q(&tk.model)));
                updates.push(("tokenizer.vocab_file".into(), q(&tk.vocab_file)));
                updates.push(("tokenizer.merge_file".into(), q(&tk.merge_file)));
            }
            updates.push(("name".into(), "modelopt".into()));
            updates.push(("restore_from_path".into(), "null".into()));
            (m, cfg, false)
        }
    };
    if let Some(f) = &job.tokenizer_file {
        let bytes = std::fs::read(f).map_err(io_err(f))?;
        tokenizer = Some(teacher_cache::tokenizer_fingerprint(&t.ck, Some(&bytes)));
        let name = save::artifact_name(f, &bytes);
        updates.push(("tokenizer.model".into(), format!("'nemo:{name}'")));
        artifacts.retain(|(n, _)| !n.ends_with("tokenizer.model"));
        artifacts.push((name, ByteView::from_vec(bytes)));
    }
    if let Some(moe) = student
        .spec
        .moe
        .as_ref()
        .filter(|m| m.aux_loss_coeff != 0.0)
    {
        return Err(Error::Setting(format!(
            "moe_aux_loss_coeff {}: the load-balancing loss is not part of the distillation objective yet; set model.moe_aux_loss_coeff=0",
            moe.aux_loss_coeff
        )));
    }
    if u64::try_from(student.spec.padded_vocab).unwrap_or(0) != tvocab {
        return Err(Error::Mismatch(format!(
            "padded vocabularies differ at TP {tp}: student {} rows, teacher {tvocab} (same tokenizer and make_vocab_size_divisible_by needed, as in NeMo)",
            student.spec.padded_vocab
        )));
    }
    let cache = match &job.teacher_cache {
        Some(dir) => {
            let tokenizer =
                tokenizer.unwrap_or_else(|| teacher_cache::tokenizer_fingerprint(&t.ck, None));
            let source = teacher_cache::source(
                &job.blend,
                &job.splits,
                job.seq_length,
                job.seed,
                tvocab,
                &tokenizer,
            )?;
            let k = match job.kd.kind {
                loss::LossKind::ModeloptTopK { k } => k,
                _ => 0,
            };
            Some(Cache::open(dir, k, &source)?)
        }
        None => None,
    };
    Ok(Models {
        student,
        teacher,
        cache,
        student_config,
        te_norm_names: te,
        artifacts,
        config_updates: updates,
    })
}

/// Samples `first..first + n` as a micro-batch, with the teacher's cached top-k when the run
/// has a cache (`cache`: it and the samples' split).
fn batch(
    samples: &BlendedSamples,
    first: usize,
    n: usize,
    seq: usize,
    eod: Option<i64>,
    cache: Option<(&Cache, Split)>,
) -> Result<Batch, Error> {
    let mut toks = Vec::with_capacity(n * (seq + 1));
    for i in first..first + n {
        let (_, mut w) = samples.get(i);
        w.resize(seq + 1, 0);
        toks.extend_from_slice(&w);
    }
    let all = Tensor::from_slice(&toks).view([n as i64, seq as i64 + 1]);
    let tokens = all.narrow(1, 0, seq as i64).contiguous();
    let labels = all.narrow(1, 1, seq as i64).contiguous();
    let mut mask = Tensor::ones([n as i64, seq as i64], (Kind::Float, Device::Cpu));
    if let Some(e) = eod {
        mask = mask.masked_fill(&tokens.eq(e), 0.0);
    }
    let cached = match cache {
        Some((c, split)) => Some(c.topk(samples, split, first, n)?),
        None => None,
    };
    Ok(Batch {
        tokens,
        labels,
        mask,
        cached,
    })
}

/// Validation data: the first `limit_val_batches` global batches of the validation split
/// (the same batches at every validation, as NeMo's validation loop restarts its sampler).
///
/// # Errors
/// Data errors.
pub fn validation_samples(job: &Job) -> Result<Option<BlendedSamples>, Error> {
    if job.limit_val_batches == 0 {
        return Ok(None);
    }
    let n = job.limit_val_batches as usize * job.global_batch;
    Ok(Some(BlendedSamples::new(
        &job.blend,
        &job.splits,
        Split::Validation,
        job.seq_length,
        n,
        job.seed,
    )?))
}

/// Validation KD loss and LM cross-entropy of `m.student` on `samples`: means over
/// micro-batches of each micro-batch's masked token mean (under no_grad, in sequence chunks;
/// through the pipeline's stages at PP > 1, the last stage computing both).
///
/// # Errors
/// Model, loss and collective errors.
pub fn validate(
    job: &Job,
    m: &Models,
    grid: &Grid,
    samples: &BlendedSamples,
    step: u64,
) -> Result<ValRecord, Error> {
    let pg = m.student.group();
    let (mut kd_sum, mut lm_sum, mut count) = (0.0, 0.0, 0usize);
    let vl = m.student.spec.padded_vocab / m.student.spec.tp;
    let start = i64::from(pg.rank()) * vl;
    let n_micro = job.limit_val_batches as usize * job.accumulation();
    let stage = stage_runner(job, m, None);
    let (dp, dp_rank) = (grid.dp_size() as usize, grid.dp_rank() as usize);
    let cache = m.cache.as_ref().map(|c| (c, Split::Validation));
    for j in 0..n_micro {
        // each replica its share of every global batch, as in training
        let b = batch(
            samples,
            (j * dp + dp_rank) * job.micro_batch,
            job.micro_batch,
            job.seq_length,
            job.eod_mask,
            cache,
        )?;
        let mask = b.mask.to_device(m.student.device());
        let labels = b.labels.to_device(m.student.device());
        let n = mask.sum(Kind::Double).double_value(&[]);
        if n <= 0.0 {
            continue;
        }
        count += 1;
        let Some((sh, th)) = stage.forward_only(&grid.pp, &b)? else {
            continue;
        };
        let (kd_part, lm_part) = tch::no_grad(|| -> Result<(f64, f64), Error> {
            let seq = job.seq_length as i64;
            let (mut kd, mut lm) = (0.0, 0.0);
            let mut s0 = 0;
            while s0 < seq {
                let len = job.chunk_tokens.min(seq - s0);
                let sl = m.student.logits_from_hidden(&sh.narrow(1, s0, len))?;
                let mk = mask.narrow(1, s0, len);
                let partials = match (&m.teacher, &th, &b.cached) {
                    (Some(t), Some(th), _) => {
                        let tl = t.logits_from_hidden(&th.narrow(1, s0, len))?;
                        job.kd.token_partials(pg, &sl, &tl)?
                    }
                    (_, _, Some(c)) => job.kd.token_partials_cached(
                        pg,
                        &sl,
                        &c.values.narrow(1, s0, len),
                        &c.ids.narrow(1, s0, len),
                    )?,
                    _ => return Err(Error::Setting(
                        "validation: no teacher output (neither a live teacher nor cached logits)"
                            .to_string(),
                    )),
                };
                kd += (partials * &mk).sum(Kind::Double).double_value(&[]);
                let ls = log_softmax_tp(pg, &sl.to_kind(Kind::Float))?;
                let lab = labels.narrow(1, s0, len);
                let inside = lab.ge(start).logical_and(&lab.lt(start + vl));
                let idx = (&lab - start).masked_fill(&inside.logical_not(), 0);
                let picked = ls
                    .gather(-1, &idx.unsqueeze(-1), false)
                    .squeeze_dim(-1)
                    .masked_fill(&inside.logical_not(), 0.0);
                lm -= (picked * &mk).sum(Kind::Double).double_value(&[]);
                s0 += len;
            }
            Ok((kd, lm))
        })?;
        kd_sum += pg.sum_f64(kd_part)? / n;
        lm_sum += pg.sum_f64(lm_part)? / n;
    }
    // only the last stage has the sums; the mean is over every replica's micro-batches
    let kd_sum = grid.dp.sum_f64(grid.pp.sum_f64(kd_sum)?)?;
    let lm_sum = grid.dp.sum_f64(grid.pp.sum_f64(lm_sum)?)?;
    let c = grid.dp.sum_f64(count as f64)?.max(1.0);
    Ok(ValRecord {
        step,
        val_kd_loss: kd_sum / c,
        val_loss: lm_sum / c,
    })
}

/// How this rank's stage of the two models runs.
fn stage_runner<'a>(
    job: &'a Job,
    m: &'a Models,
    projection: Option<&'a Projection>,
) -> pipeline::Stage<'a> {
    pipeline::Stage {
        student: &m.student,
        teacher: m.teacher.as_ref(),
        kd: &job.kd,
        chunk: job.chunk_tokens,
        recompute: job.recompute,
        pairs: &job.intermediate,
        projection,
    }
}

/// Canonical names and per-rank fp32 shards of every student parameter, gathered on every
/// rank (`[rank][param]`).
fn gather_student(
    opt: &AdamW,
    masters: &[Tensor],
    pg: &ProcessGroup,
) -> Result<Vec<Vec<(String, Tensor)>>, Error> {
    let world = pg.world() as usize;
    let mut ranks: Vec<Vec<(String, Tensor)>> = (0..world).map(|_| Vec::new()).collect();
    for (s, master) in opt.slots.iter().zip(masters) {
        if s.name.starts_with(PROJECTION) {
            // the KD projection is not part of the student
            continue;
        }
        let parts = pg.all_gather(&master.detach().contiguous())?;
        for (r, p) in parts.into_iter().enumerate() {
            if let Some(v) = ranks.get_mut(r) {
                v.push((s.name.clone(), p.to_device(Device::Cpu)));
            }
        }
    }
    Ok(ranks)
}

/// Writes the student `.nemo` (the first stage's TP rank 0 writes; every rank of the
/// replica must call). At PP > 1 each stage's TP rank 0 sends its stage to the first stage,
/// which writes the student at the training TP and reshards it through the canonical core
/// into the `tp_rank_XX_pp_rank_YYY` layout.
///
/// # Errors
/// Collective, config and write errors.
pub fn save_student(
    job: &Job,
    m: &Models,
    grid: &Grid,
    opt: &AdamW,
    masters: &[Tensor],
) -> Result<PathBuf, Error> {
    let pg = m.student.group();
    let mut ranks = gather_student(opt, masters, pg)?;
    let pp = grid.layout.pp;
    if pg.rank() == 0 && pp > 1 {
        if grid.stage() > 0 {
            for r in &ranks {
                grid.pp.send_named(r, 0)?;
            }
        } else {
            for p in 1..pp {
                for r in ranks.iter_mut() {
                    r.extend(grid.pp.recv_named(p)?);
                }
            }
            if m.student.spec.tied {
                // the last stage's copy of the tied embeddings equals them
                for r in ranks.iter_mut() {
                    r.retain(|(n, _)| n != "output_layer.weight");
                }
            }
        }
    }
    if pg.rank() == 0 && grid.stage() == 0 {
        let ups: Vec<(&str, &str)> = m
            .config_updates
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let config = m
            .student_config
            .with_updates(&ups)
            .map_err(|source| Error::Config {
                what: "saved student",
                source,
            })?;
        let archive = StudentArchive {
            config,
            artifacts: m.artifacts.clone(),
            ranks,
            te_norm_names: m.te_norm_names,
        };
        if pp > 1 {
            write_pipelined(&archive, &job.nemo_path, pp as u64)?;
        } else {
            save::write(&archive, &job.nemo_path)?;
        }
    }
    pg.barrier()?;
    Ok(job.nemo_path.clone())
}

/// Writes `a` (every layer, at its TP) resharded to `pp` stages at `out`: through a
/// temporary single-stage archive beside it.
fn write_pipelined(a: &StudentArchive, out: &Path, pp: u64) -> Result<(), Error> {
    let fail = |why: String| Error::Io {
        path: out.to_path_buf(),
        why,
    };
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(".nemo-tool-student")
        .tempdir_in(dir)
        .map_err(io_err(dir))?;
    let flat = tmp.path().join("student_pp1.nemo");
    save::write(a, &flat)?;
    let ck = Checkpoint::open(&flat).map_err(|source| Error::Checkpoint {
        path: flat.clone(),
        source: Box::new(source),
    })?;
    let canon = crate::model::canonical::Canonical::new(&ck).map_err(|e| fail(e.to_string()))?;
    let opts = crate::model::plan::ReshardOptions {
        tp: a.ranks.len() as u64,
        pp,
        dtype: None,
        allow_partial_query_groups: false,
        vocab_size: None,
    };
    let plan = crate::model::plan::plan_reshard(&canon, &opts)
        .map_err(|e| fail(format!("pipeline layout: {e}")))?;
    crate::ops::reshard::write(
        &canon,
        &plan,
        out,
        crate::ops::reshard::WriteOptions {
            force: true,
            ..Default::default()
        },
    )
    .map_err(|e| fail(e.to_string()))?;
    Ok(())
}

/// Rank-0 outputs in the experiment folder.
struct Logs {
    metrics: std::fs::File,
    metrics_path: PathBuf,
    tb: EventWriter,
}

impl Logs {
    fn open(job: &Job, history: &TrainState) -> Result<Logs, Error> {
        let dir = &job.exp_dir;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let p = job.metrics_path();
        // rewritten from the restored history, so a resumed run's log has no repeated steps
        let mut metrics = std::fs::File::create(&p).map_err(io_err(&p))?;
        for r in &history.train {
            Self::line(
                &mut metrics,
                &p,
                serde_json::to_string(r).unwrap_or_default(),
            )?;
        }
        for r in &history.val {
            Self::line(
                &mut metrics,
                &p,
                serde_json::to_string(r).unwrap_or_default(),
            )?;
        }
        let tb = EventWriter::create(dir).map_err(io_err(dir))?;
        Ok(Logs {
            metrics,
            metrics_path: p,
            tb,
        })
    }

    fn line(f: &mut std::fs::File, p: &Path, s: String) -> Result<(), Error> {
        writeln!(f, "{s}").map_err(io_err(p))
    }

    fn step(&mut self, r: &StepRecord) -> Result<(), Error> {
        Self::line(
            &mut self.metrics,
            &self.metrics_path,
            serde_json::to_string(r).unwrap_or_default(),
        )?;
        let s = r.step as i64;
        let p = self.tb.path().to_path_buf();
        for (tag, v) in [
            ("kd_loss", r.kd_loss),
            ("lr", r.lr),
            ("grad_norm", r.grad_norm),
            ("tokens_per_s", r.tokens_per_s),
        ] {
            self.tb.scalar(tag, v as f32, s).map_err(io_err(&p))?;
        }
        for (tag, v) in [
            ("mfu", r.mfu),
            ("logits_loss", r.logits_loss),
            ("lm_loss", r.lm_loss),
            ("intermediate_loss", r.intermediate_loss),
            ("moe_load_balancing_loss", r.moe_load_balancing_loss),
        ] {
            if let Some(v) = v {
                self.tb.scalar(tag, v as f32, s).map_err(io_err(&p))?;
            }
        }
        Ok(())
    }

    fn val(&mut self, r: &ValRecord) -> Result<(), Error> {
        Self::line(
            &mut self.metrics,
            &self.metrics_path,
            serde_json::to_string(r).unwrap_or_default(),
        )?;
        let p = self.tb.path().to_path_buf();
        self.tb
            .scalar("val_kd_loss", r.val_kd_loss as f32, r.step as i64)
            .map_err(io_err(&p))?;
        self.tb
            .scalar("val_loss", r.val_loss as f32, r.step as i64)
            .map_err(io_err(&p))?;
        self.tb.flush().map_err(io_err(&p))
    }
}

/// Runs the job to `max_steps` (resuming from the experiment folder when asked) and saves the
/// student. Every rank calls it; `on` is called on rank 0 only.
///
/// # Errors
/// Any of [`Error`].
pub fn run(
    job: &Job,
    grid: &Grid,
    device: Device,
    on: &mut dyn FnMut(Event),
) -> Result<Outcome, Error> {
    let pg = &grid.tp;
    let rank0 = grid.world.rank() == 0;
    let (dp, dp_rank) = (grid.dp_size() as usize, grid.dp_rank() as usize);
    let say = |on: &mut dyn FnMut(Event), s: String| {
        if rank0 {
            on(Event::Info(s));
        }
    };
    super::ffi::keep_freed_memory();
    let m = load_models(job, grid, device)?;
    let teacher_line = match (&m.teacher, &m.cache) {
        (Some(t), _) => format!(
            "teacher {}: {} layers, hidden {}",
            job.teacher.display(),
            t.spec.num_layers,
            t.spec.hidden
        ),
        (None, Some(c)) => format!(
            "teacher cache {}: top {} logits per token ({:?}), the teacher is not run",
            job.teacher_cache
                .as_ref()
                .map_or(String::new(), |d| d.display().to_string()),
            c.manifest().k,
            c.manifest().dtype,
        ),
        (None, None) => String::new(),
    };
    say(
        on,
        format!(
            "{teacher_line}; student {}: {} layers, hidden {}; TP {} x PP {} x DP {dp}, {:?}, {device:?}",
            job.student
                .as_ref()
                .map_or("(from config)".to_string(), |p| p.display().to_string()),
            m.student.spec.num_layers,
            m.student.spec.hidden,
            job.tp,
            job.pp,
            job.precision,
        ),
    );
    let train = BlendedSamples::new(
        &job.blend,
        &job.splits,
        Split::Train,
        job.seq_length,
        (job.max_steps as usize).saturating_mul(job.global_batch),
        job.seed,
    )?;
    let val = validation_samples(job)?;
    // every sample of the run must be cached: refused now, not at the step that needs it
    if let Some(c) = &m.cache {
        c.check_covers(&train, Split::Train, train.len())?;
        if let Some(vs) = &val {
            c.check_covers(vs, Split::Validation, vs.len())?;
        }
    }
    // every rank refuses a pair the last stage does not hold, before any step
    let stages = grid.layout.pp as usize;
    for p in &job.intermediate {
        let Some(teacher) = &m.teacher else {
            return Err(Error::Setting(
                "intermediate_layer_pairs need the live teacher".to_string(),
            ));
        };
        for (site, model, what) in [
            (p.student, &m.student, "student"),
            (p.teacher, teacher, "teacher"),
        ] {
            if !site.on_last_stage(model.spec.num_layers, stages) {
                return Err(Error::Setting(format!(
                    "intermediate_layer_pairs: the {what}'s {site:?} is not {} ({} layers{}); ModelOpt computes these losses there",
                    if stages > 1 { "on the last pipeline stage" } else { "in the model" },
                    model.spec.num_layers,
                    if stages > 1 { format!(", {stages} stages") } else { String::new() },
                )));
            }
        }
    }
    // ModelOpt's projection of the student's hidden states to the teacher's size, trained
    // with the student (saved in the run checkpoints, not in the student .nemo)
    let hs = m.student.spec.hidden;
    let ht = m.teacher.as_ref().map_or(hs, |t| t.spec.hidden);
    let projection = (!job.intermediate.is_empty() && hs != ht).then(|| {
        let seed = job.seed ^ 0x6b64_5f70_726f_6a00;
        Projection::new(
            model::seeded_normal(&[ht, hs], m.student.spec.init_std, seed),
            device,
        )
    });
    let extra: Vec<NamedParam> = projection
        .iter()
        .flat_map(|p| {
            [
                NamedParam {
                    name: format!("{PROJECTION}weight"),
                    rule: Rule::Replicated,
                    tensor: p.weight.shallow_clone(),
                },
                NamedParam {
                    name: format!("{PROJECTION}bias"),
                    rule: Rule::Replicated,
                    tensor: p.bias.shallow_clone(),
                },
            ]
        })
        .collect();
    let mut opt = if job.distributed_optimizer {
        AdamW::distributed_with_extra(&m.student, &extra, job.adamw, &grid.dp)
    } else {
        AdamW::with_extra(&m.student, &extra, job.adamw)
    }
    .in_pipeline(&grid.pp);
    // this run's layout, recorded in every checkpoint it writes
    let distributed = opt.is_distributed();
    let layout = |st: TrainState| TrainState {
        world: grid.world.world() as u32,
        tp: pg.world() as u32,
        pp: grid.layout.pp as u32,
        distributed_optimizer: distributed,
        ..st
    };
    let mut hist = layout(TrainState::default());
    let ckdir = job.checkpoint_dir();
    let mut resumed_from = 0;
    if job.resume {
        if let Some((path, st, tensors, own)) =
            state::load_latest(&ckdir, grid, opt.is_distributed())?
        {
            opt.load_state(&tensors, st.step, own)?;
            let was = format!(
                "{} ranks{}",
                st.world,
                if st.distributed_optimizer {
                    ", distributed optimizer"
                } else {
                    ""
                }
            );
            say(
                on,
                format!(
                    "resumed from {} (step {}, written by {was})",
                    path.display(),
                    st.step
                ),
            );
            resumed_from = st.step;
            // the history goes on; the layout is this run's
            hist = layout(st);
        }
    }
    let mut logs = if rank0 {
        Some(Logs::open(job, &hist)?)
    } else {
        None
    };
    if hist.step == 0 && hist.val.is_empty() {
        // the baseline before any update (NeMo's sanity validation), for the logs and plot
        if let Some(vs) = &val {
            let v = validate(job, &m, grid, vs, 0)?;
            if let Some(l) = logs.as_mut() {
                l.val(&v)?;
                on(Event::Val(&v));
            }
            hist.val.push(v);
        }
    }
    let accum = job.accumulation();
    let step_tokens = (job.global_batch * job.seq_length) as f64;
    // MFU where the device peak is known (a known GPU, or NEMO_TOOL_PEAK_TFLOPS)
    let peak = super::flops::device_peak(device, m.student.kind()).map_err(Error::Setting)?;
    let step_flops = super::flops::step_flops(
        &m.student.spec,
        m.teacher.as_ref().map(|t| &t.spec),
        job.seq_length as i64,
        step_tokens,
    );
    while hist.step < job.max_steps {
        let t0 = Instant::now();
        // what the last validation recorded is not this step's
        let _ = m.student.take_moe_balance();
        opt.zero_grad();
        // Megatron's sampler: micro-step j of the global batch is micro x DP consecutive
        // samples, replica d taking the d-th micro-batch of them
        let cache = m.cache.as_ref().map(|c| (c, Split::Train));
        let micro = |j: usize| {
            let first = hist.consumed_samples as usize + (j * dp + dp_rank) * job.micro_batch;
            batch(
                &train,
                first,
                job.micro_batch,
                job.seq_length,
                job.eod_mask,
                cache,
            )
        };
        let mut sum = Parts::default();
        if grid.layout.pp > 1 {
            let batches: Vec<Batch> = (0..accum).map(micro).collect::<Result<_, _>>()?;
            sum = stage_runner(job, &m, projection.as_ref()).train_step(&grid.pp, &batches)?;
            pipeline::sync_tied_embeddings(&m.student, grid)?;
        } else {
            for j in 0..accum {
                let b = micro(j)?;
                let teacher = match (&m.teacher, &b.cached) {
                    (Some(t), _) => Teacher::Model(t),
                    (None, Some(c)) => Teacher::Cached(c),
                    (None, None) => {
                        return Err(Error::Setting(
                            "no teacher: neither a live teacher nor a teacher cache".to_string(),
                        ))
                    }
                };
                sum += job.kd.chunked_backward_full(
                    &m.student,
                    teacher,
                    &b.tokens,
                    Some(&b.labels),
                    &b.mask,
                    job.chunk_tokens,
                    job.recompute,
                    &job.intermediate,
                    projection.as_ref(),
                )?;
            }
        }
        if accum > 1 {
            opt.scale_grads(1.0 / accum as f64);
        }
        let per_micro = 1.0 / accum as f64;
        let kd_loss = opt.average_grads_and(&grid.dp, sum.total * per_micro)?;
        // only the last stage computes the loss
        let kd_loss = grid.pp.sum_f64(kd_loss)?;
        // the terms of a balanced loss, averaged the same way
        let dp_n = f64::from(grid.dp_size());
        let mean = |v: Option<f64>| -> Result<Option<f64>, Error> {
            match v {
                None => Ok(None),
                Some(v) => Ok(Some(
                    grid.pp.sum_f64(grid.dp.sum_f64(v * per_micro)? / dp_n)?,
                )),
            }
        };
        let balanced = job.kd.lm_loss_scale.is_some() || !job.intermediate.is_empty();
        let logits_loss = mean(balanced.then_some(sum.logits))?;
        // by the config, not by what this stage computed: every stage joins the collectives
        let lm_loss = mean(job.kd.lm_loss_scale.map(|_| sum.lm.unwrap_or(0.0)))?;
        let intermediate_loss =
            mean((!job.intermediate.is_empty()).then(|| sum.intermediate.unwrap_or(0.0)))?;
        // the MoE layers' load-balancing loss: mean over layers, micro-batches and replicas
        let moe_load_balancing_loss = match m.student.spec.moe {
            Some(_) => {
                let (sum, n) = m.student.take_moe_balance();
                let (sum, n) = (grid.pp.sum_f64(sum)?, grid.pp.sum_f64(n as f64)?);
                Some(grid.dp.sum_f64(sum / n.max(1.0))? / dp_n)
            }
            None => None,
        };
        let grad_norm = opt.clip(job.clip)?;
        let lr = job.schedule.lr(hist.step);
        opt.step(lr)?;
        hist.step += 1;
        hist.consumed_samples += job.global_batch as u64;
        let dt = t0.elapsed().as_secs_f64();
        let rec = StepRecord {
            step: hist.step,
            kd_loss,
            lr,
            grad_norm,
            tokens_per_s: step_tokens / dt.max(1e-9),
            mfu: peak.map(|p| step_flops / dt.max(1e-9) / (p * f64::from(grid.world.world()))),
            logits_loss,
            lm_loss,
            intermediate_loss,
            moe_load_balancing_loss,
        };
        if let Some(l) = logs.as_mut() {
            l.step(&rec)?;
            on(Event::Step(&rec));
        }
        hist.train.push(rec);
        let val_now = hist.step % job.val_check_interval == 0 || hist.step == job.max_steps;
        if val_now {
            if let Some(vs) = &val {
                let v = validate(job, &m, grid, vs, hist.step)?;
                if let Some(l) = logs.as_mut() {
                    l.val(&v)?;
                    on(Event::Val(&v));
                }
                hist.val.push(v);
            }
            if job.checkpoints {
                let p = state::save(&ckdir, grid, &opt.state_tensors(), &hist)?;
                say(on, format!("checkpoint {}", p.display()));
            }
        }
    }
    // every replica holds the same student: replica 0's TP group writes it (the distributed
    // optimizer's masters are gathered from every replica first)
    let masters = opt.full_masters()?;
    if dp_rank == 0 {
        save_student(job, &m, grid, &opt, &masters)?;
    }
    grid.world.barrier()?;
    let nemo = job.nemo_path.clone();
    say(on, format!("saved the student to {}", nemo.display()));
    let plot_path = job.plot_path();
    if rank0 {
        let train_pts: Vec<(f64, f64)> = hist
            .train
            .iter()
            .map(|r| (r.step as f64, r.kd_loss))
            .collect();
        let val_pts: Vec<(f64, f64)> = hist
            .val
            .iter()
            .map(|r| (r.step as f64, r.val_kd_loss))
            .collect();
        plot::write_png(
            &plot_path,
            "KD loss",
            "step",
            &[
                Series {
                    name: "train kd_loss".into(),
                    points: train_pts,
                    color: [31, 119, 180],
                },
                Series {
                    name: "val kd_loss".into(),
                    points: val_pts,
                    color: [214, 39, 40],
                },
            ],
        )
        .map_err(io_err(&plot_path))?;
    }
    Ok(Outcome {
        nemo_path: nemo,
        exp_dir: job.exp_dir.clone(),
        plot: plot_path,
        history: hist,
        resumed_from,
    })
}

/// Loads the models and runs one validation (for `--validate-only` and tests).
///
/// # Errors
/// As [`run`].
pub fn evaluate(job: &Job, grid: &Grid, device: Device) -> Result<Option<ValRecord>, Error> {
    let m = load_models(job, grid, device)?;
    match validation_samples(job)? {
        Some(vs) => Ok(Some(validate(job, &m, grid, &vs, 0)?)),
        None => Ok(None),
    }
}
