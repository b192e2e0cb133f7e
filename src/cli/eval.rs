//! `nemo-tool eval`: LM loss / perplexity of a checkpoint on a dataset or on given tokens, the
//! KD losses against a teacher, and raw logits (`--logits-out`). Runs at any TP under
//! `torchrun --no-python --nproc_per_node=$TP`, or at TP1 alone. Design: docs/eval.md.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use nemo_tool::distill::eval::{self, Options};
use nemo_tool::distill::model::{Gpt, InitFrom};
use nemo_tool::distill::parallel::{Backend, Launch, ProcessGroup};
use nemo_tool::distill::sampling::{Blend, BlendedSamples, Split};
use nemo_tool::distill::spec::GptSpec;
use nemo_tool::distill::weights::Source;
use nemo_tool::io::output::OutputFile;
use nemo_tool::model::checkpoint::Checkpoint;
use tch::{Device, Kind};

/// `eval` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
nemo-tool eval student.nemo --data data/val --seq-length 512 --samples 64 --teacher teacher.nemo\n  \
nemo-tool eval model.nemo --tokens tokens.json --logits-out logits.npy\n  \
nemo-tool eval teacher.nemo --data data/train --seq-length 512 --split train,validation --samples 20000,64 --teacher-cache kd_cache --topk 64\n  \
torchrun --no-python --nproc_per_node=2 nemo-tool eval model.nemo --data 0.7 a 0.3 b --json")]
pub struct Args {
    /// The checkpoint to evaluate (.nemo file or extracted folder, any layout).
    pub model: PathBuf,
    /// Dataset prefix, or a blend `W1 PREFIX1 W2 PREFIX2 ...` (as model.data.data_prefix).
    #[arg(long, num_args = 1.., conflicts_with = "tokens")]
    pub data: Option<Vec<String>>,
    /// Token ids instead of a dataset: a JSON list of lists or a .npy int array [batch, seq].
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    /// Write the full padded-vocab float32 logits [batch, seq, vocab] of --tokens as .npy.
    #[arg(long, requires = "tokens")]
    pub logits_out: Option<PathBuf>,
    /// Teacher checkpoint: also report its LM loss and the KD losses of MODEL against it.
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Dataset split: train, validation or test (with --teacher-cache, a comma-separated list).
    #[arg(long, default_value = "validation")]
    pub split: String,
    /// Train/validation/test document split (as model.data.splits_string).
    #[arg(long, default_value = "98,1,1")]
    pub splits_string: String,
    /// Tokens per window (windows have seq-length + 1 tokens).
    #[arg(long, default_value_t = 512)]
    pub seq_length: usize,
    /// Windows to evaluate from the dataset (with --teacher-cache, one count per split, as
    /// many as the distillation run draws: global_batch_size x max_steps for train).
    #[arg(long, default_value = "64", value_delimiter = ',')]
    pub samples: Vec<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 4)]
    pub micro_batch: usize,
    /// Sequence positions whose logits are computed at once (bounds the [batch, chunk, vocab/TP]
    /// fp32 logits of each model; 0: the whole sequence).
    #[arg(long, default_value_t = 128)]
    pub chunk: usize,
    /// Sampling seed (the same seed gives the same windows at every TP).
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Temperature of the KD losses (logits / T, no T² factor).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// β of the JSD loss (teacher weight of the mixture).
    #[arg(long, default_value_t = 0.5)]
    pub jsd_beta: f64,
    /// k of the top-k KD loss, and the logits kept per token in a --teacher-cache.
    #[arg(long, visible_alias = "topk", default_value_t = 8)]
    pub top_k: i64,
    /// Write an offline teacher cache of MODEL (the teacher) to this folder: its top-k logits
    /// and their ids for every window of the --data splits, for `distill
    /// model.kd.teacher_cache=DIR` (docs/eval.md).
    #[arg(long, requires = "data", conflicts_with_all = ["teacher", "logits_out", "dump_windows"])]
    pub teacher_cache: Option<PathBuf>,
    /// How a --teacher-cache stores the logits: fp32 (exact), bf16 or fp16 (6 bytes per entry
    /// with the id).
    #[arg(long, default_value = "bf16", value_parser = ["fp32", "bf16", "fp16"])]
    pub cache_dtype: String,
    /// Records (windows) per --teacher-cache shard file.
    #[arg(long, default_value_t = 1024)]
    pub shard_records: u64,
    /// Restrict the LM-loss softmax to the first N vocabulary columns (e.g. the tokenizer's
    /// size, as Hugging Face computes it). Default: the padded vocabulary, as NeMo does.
    #[arg(long)]
    pub true_vocab: Option<i64>,
    /// Weights and activations: fp32 or bf16.
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "bf16"])]
    pub precision: String,
    /// Device: auto (CUDA with NCCL when available, else CPU with Gloo), cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    pub device: String,
    /// Write the evaluated windows (seq-length + 1 tokens each) as a JSON list of lists.
    #[arg(long)]
    pub dump_windows: Option<PathBuf>,
    /// Print the numbers as JSON.
    #[arg(long)]
    pub json: bool,
    /// Replace existing --logits-out / --dump-windows files or --teacher-cache folder.
    #[arg(long)]
    pub force: bool,
}

fn build_model(path: &Path, pg: &ProcessGroup, kind: Kind, dev: Device) -> anyhow::Result<Gpt> {
    let ck = Checkpoint::open(path).with_context(|| format!("opening {}", path.display()))?;
    let src = Source::new(&ck).with_context(|| format!("{}", path.display()))?;
    let tp = pg.world() as u64;
    let vocab = src
        .padded_vocab(ck.config.make_vocab_size_divisible_by(), tp)
        .with_context(|| format!("{}", path.display()))?;
    let spec = GptSpec::from_config(&ck.config, tp, vocab)
        .with_context(|| format!("{}", path.display()))?;
    Gpt::new(spec, &InitFrom::Checkpoint(&src), pg, kind, dev, false)
        .with_context(|| format!("building the model of {}", path.display()))
}

/// Runs `eval`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let launch = Launch::from_env().context("reading the torchrun environment")?;
    let cuda = match a.device.as_str() {
        "cpu" => false,
        "cuda" => {
            if !tch::Cuda::is_available() {
                bail!("--device cuda: CUDA is not available (built without the `cuda` feature, or no GPU)");
            }
            true
        }
        _ => tch::Cuda::is_available(),
    };
    let (dev, backend) = if cuda {
        (
            Device::Cuda(launch.local_rank.max(0) as usize),
            Backend::Nccl,
        )
    } else {
        (Device::Cpu, Backend::Gloo)
    };
    let kind = if a.precision == "bf16" {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let pg = ProcessGroup::init(&launch, backend).context("creating the process group")?;
    let lead = pg.rank() == 0;
    // Outputs are claimed before the work (an existing file without --force fails fast),
    // by rank 0 only: every rank computes, one writes.
    let create = |p: &Option<PathBuf>| -> anyhow::Result<Option<OutputFile>> {
        match p {
            Some(p) if lead => Ok(Some(OutputFile::create(p, a.force)?)),
            _ => Ok(None),
        }
    };
    let windows_out = create(&a.dump_windows)?;
    let logits_out = create(&a.logits_out)?;
    let kd = eval::kd_losses(a.temperature, a.jsd_beta, a.top_k)?;

    let model = build_model(&a.model, &pg, kind, dev)?;
    let vocab = model.spec.padded_vocab;
    let splits = a
        .split
        .split(',')
        .map(|s| {
            Split::parse(s.trim())
                .with_context(|| format!("--split {s:?}: expected train, validation or test"))
        })
        .collect::<anyhow::Result<Vec<Split>>>()?;
    if let Some(dir) = &a.teacher_cache {
        return write_cache(&a, dir, &pg, &model, &splits);
    }
    if splits.len() != 1 || a.samples.len() != 1 {
        bail!("--split and --samples take one value each (lists are for --teacher-cache)");
    }
    let samples_n = a.samples[0];
    let teacher = match &a.teacher {
        Some(t) => {
            let m = build_model(t, &pg, kind, dev)?;
            if m.spec.padded_vocab != vocab {
                bail!(
                    "teacher {}: padded vocabulary {} differs from the model's {} ({}): KD needs the same vocabulary",
                    t.display(),
                    m.spec.padded_vocab,
                    vocab,
                    a.model.display()
                );
            }
            Some(m)
        }
        None => None,
    };
    let limit = match a.true_vocab {
        Some(n) if n < 1 || n > vocab => {
            bail!("--true-vocab {n} must be in 1..={vocab} (the padded vocabulary)")
        }
        Some(n) => n,
        None => vocab,
    };

    let (what, windows) = match (&a.tokens, &a.data) {
        (Some(p), _) => {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let what = p.display().to_string();
            (what.clone(), eval::parse_tokens(&what, &bytes)?)
        }
        (None, Some(items)) => {
            let blend = Blend::parse(items).context("--data")?;
            let samples = BlendedSamples::new(
                &blend,
                &a.splits_string,
                splits[0],
                a.seq_length,
                samples_n,
                a.seed,
            )
            .with_context(|| format!("reading the dataset {}", items.join(" ")))?;
            let w: Vec<Vec<i64>> = (0..samples_n).map(|i| samples.get(i).1).collect();
            (format!("dataset {}", items.join(" ")), w)
        }
        (None, None) => bail!("give --data PREFIX|BLEND or --tokens FILE"),
    };
    eval::check_ids(&what, &windows, limit)?;
    if let Some(mut f) = windows_out {
        serde_json::to_writer(&mut f, &windows)
            .with_context(|| format!("writing {}", f.target().display()))?;
        f.commit()?;
    }
    if a.logits_out.is_some() {
        eval::write_logits(logits_out, &model, &windows, a.micro_batch)?;
    }

    let tty = lead && !a.json && std::io::stderr().is_terminal();
    let mut progress = |done: usize, total: usize| {
        if tty {
            eprint!("\reval: {done}/{total} sequences");
            if done == total {
                eprintln!();
            }
        }
    };
    let opts = Options {
        micro_batch: a.micro_batch,
        chunk: a.chunk,
        true_vocab: a.true_vocab,
        kd,
    };
    let windows_ok = windows.first().map_or(0, Vec::len) >= 2;
    let report = if windows_ok {
        Some(eval::evaluate(
            &model,
            teacher.as_ref(),
            &windows,
            &opts,
            &mut progress,
        )?)
    } else {
        None
    };
    pg.barrier().context("final barrier")?;
    if !lead {
        return Ok(ExitCode::SUCCESS);
    }
    #[derive(serde::Serialize)]
    struct Out<'a> {
        model: String,
        teacher: Option<String>,
        source: &'a str,
        tp: i32,
        device: String,
        precision: &'a str,
        padded_vocab: i64,
        softmax_vocab: i64,
        temperature: f64,
        jsd_beta: f64,
        top_k: i64,
        #[serde(flatten)]
        report: Option<&'a eval::Report>,
        logits_out: Option<String>,
    }
    let out = Out {
        model: a.model.display().to_string(),
        teacher: a.teacher.as_ref().map(|t| t.display().to_string()),
        source: &what,
        tp: pg.world(),
        device: format!("{dev:?}"),
        precision: &a.precision,
        padded_vocab: vocab,
        softmax_vocab: limit,
        temperature: a.temperature,
        jsd_beta: a.jsd_beta,
        top_k: a.top_k,
        report: report.as_ref(),
        logits_out: a.logits_out.as_ref().map(|p| p.display().to_string()),
    };
    if a.json {
        super::print_json(&out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut o = std::io::stdout().lock();
    writeln!(
        o,
        "model {} (TP{}, {dev:?}, {}), {what}",
        out.model, out.tp, a.precision
    )?;
    if let Some(r) = &report {
        writeln!(
            o,
            "{} sequences, {} target tokens, softmax over {limit} of {vocab} columns",
            r.sequences, r.tokens
        )?;
        writeln!(
            o,
            "lm loss     {:.6}  perplexity {:.4}",
            r.lm_loss, r.perplexity
        )?;
        if let (Some(l), Some(p)) = (r.teacher_lm_loss, r.teacher_perplexity) {
            writeln!(o, "teacher     {l:.6}  perplexity {p:.4}")?;
            writeln!(
                o,
                "kd loss (T={}, jsd beta={}, top-k k={}):",
                a.temperature, a.jsd_beta, a.top_k
            )?;
            for (k, v) in &r.kd_loss {
                writeln!(o, "  {k:<11} {v:.6}")?;
            }
        }
    }
    if let Some(p) = &a.logits_out {
        writeln!(o, "logits written to {}", p.display())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `--teacher-cache DIR`: MODEL is the teacher; every window of each split's samples is run
/// through it and its top-k logits written to DIR (rank 0 writes; every rank computes).
fn write_cache(
    a: &Args,
    dir: &Path,
    pg: &ProcessGroup,
    model: &Gpt,
    splits: &[Split],
) -> anyhow::Result<ExitCode> {
    use nemo_tool::distill::teacher_cache::{self, WriteOptions};
    use nemo_tool::formats::kd_cache::ValueType;
    let lead = pg.rank() == 0;
    if a.samples.len() != splits.len() {
        bail!(
            "--samples has {} counts for {} splits: give one per --split entry",
            a.samples.len(),
            splits.len()
        );
    }
    if dir.exists() && !a.force {
        bail!("{}: exists (use --force to replace it)", dir.display());
    }
    let items = a.data.as_deref().unwrap_or_default();
    let blend = Blend::parse(items).context("--data")?;
    let ck =
        Checkpoint::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let tokenizer = teacher_cache::tokenizer_fingerprint(&ck, None);
    let vocab = u64::try_from(model.spec.padded_vocab).unwrap_or(0);
    let mut source = teacher_cache::source(
        &blend,
        &a.splits_string,
        a.seq_length,
        a.seed,
        vocab,
        &tokenizer,
    )?;
    let mut parts = Vec::new();
    let mut counts = serde_json::Map::new();
    for (&sp, &n) in splits.iter().zip(&a.samples) {
        let s = BlendedSamples::new(&blend, &a.splits_string, sp, a.seq_length, n, a.seed)
            .with_context(|| format!("reading the dataset {} ({})", items.join(" "), sp.name()))?;
        counts.insert(sp.name().to_string(), serde_json::json!(n));
        parts.push((sp, s));
    }
    // what was cached, for people (a run's check compares only the keys it sets)
    if let Some(o) = source.as_object_mut() {
        o.insert("samples".into(), serde_json::Value::Object(counts));
        o.insert(
            "teacher".into(),
            serde_json::json!(a.model.display().to_string()),
        );
    }
    let dtype = ValueType::parse(&a.cache_dtype).context("--cache-dtype")?;
    let opts = WriteOptions {
        k: a.top_k,
        seq_length: a.seq_length,
        dtype,
        micro_batch: a.micro_batch,
        chunk: a.chunk,
        per_shard: a.shard_records,
        force: a.force,
    };
    let tty = lead && !a.json && std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let mut progress = |done: usize, total: usize| {
        if tty {
            eprint!("\reval: teacher cache {done}/{total} windows");
            if done == total {
                eprintln!();
            }
        }
    };
    let manifest = teacher_cache::write(dir, model, &parts, source, &opts, &mut progress)?;
    pg.barrier().context("final barrier")?;
    let Some(m) = manifest else {
        return Ok(ExitCode::SUCCESS);
    };
    let records: u64 = m.shards.iter().map(|s| s.records).sum();
    let bytes = records * m.record_bytes() as u64;
    let per_token = m.record_bytes() as f64 / f64::from(m.seq_length.max(1));
    #[derive(serde::Serialize)]
    struct Out {
        teacher_cache: String,
        model: String,
        tp: i32,
        k: u32,
        dtype: String,
        seq_length: u32,
        records: u64,
        shards: usize,
        bytes: u64,
        bytes_per_token: f64,
        seconds: f64,
    }
    let out = Out {
        teacher_cache: dir.display().to_string(),
        model: a.model.display().to_string(),
        tp: pg.world(),
        k: m.k,
        dtype: a.cache_dtype.clone(),
        seq_length: m.seq_length,
        records,
        shards: m.shards.len(),
        bytes,
        bytes_per_token: per_token,
        seconds: started.elapsed().as_secs_f64(),
    };
    if a.json {
        super::print_json(&out)?;
    } else {
        println!(
            "teacher cache {}: {} windows of {} tokens, top {} logits per token ({}), {} shard(s), {} bytes ({:.1} bytes/token), {:.1}s",
            out.teacher_cache, out.records, out.seq_length, out.k, out.dtype, out.shards, out.bytes, out.bytes_per_token, out.seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}
