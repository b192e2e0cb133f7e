//! A distillation job resolved from the run configuration (conf/distill.yaml plus overrides):
//! every key `nemo-tool distill` honours, checked once before anything is loaded, with the
//! same constraints as NeMo's script (teacher required, `trainer.devices × trainer.num_nodes`
//! = world size = TP × PP × DP, `global_batch_size` a multiple of `micro_batch_size × DP`,
//! no virtual pipeline).

use std::path::PathBuf;

use super::hidden_loss::Pair;
use super::loss::{self, KdLoss, LossKind};
use super::model::Recompute;
use super::optim::AdamWConfig;
use crate::distill::runconfig::{self, RunConfig};
use crate::distill::sampling::Blend;
use crate::distill::schedule::CosineAnnealing;

/// Errors resolving the job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config key has a missing or wrong-typed value.
    #[error(transparent)]
    Config(#[from] runconfig::Error),
    /// A value that is well-typed but not usable.
    #[error("config key `{key}` = {value}: {why}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Its value.
        value: String,
        /// Why.
        why: String,
    },
    /// The KD loss options.
    #[error(transparent)]
    Loss(#[from] loss::Error),
    /// The data blend.
    #[error(transparent)]
    Data(#[from] crate::distill::sampling::Error),
}

/// `++model.kd.<key>=<value>` for every key of ModelOpt's distillation YAML at `file` that
/// `cfg` leaves null (a key set on the command line wins over the file).
fn modelopt_overrides(file: &std::path::Path, cfg: &RunConfig) -> Result<Vec<String>, Error> {
    const KEYS: [&str; 6] = [
        "logit_layers",
        "intermediate_layer_pairs",
        "skip_lm_loss",
        "kd_loss_scale",
        "logit_kl_temperature",
        "logit_kl_topk",
    ];
    let bad = |why: String| invalid("model.kd.config", file.display(), why);
    let text = std::fs::read_to_string(file).map_err(|e| bad(e.to_string()))?;
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = match doc {
        serde_yaml_ng::Value::Mapping(m) => m,
        serde_yaml_ng::Value::Null => serde_yaml_ng::Mapping::new(),
        _ => {
            return Err(bad(
                "expected a mapping of ModelOpt distillation keys".into()
            ))
        }
    };
    let mut out = Vec::new();
    for (k, v) in map {
        let key = k.as_str().unwrap_or_default().to_string();
        if !KEYS.contains(&key.as_str()) {
            return Err(bad(format!(
                "unknown key `{key}` (ModelOpt's keys: {})",
                KEYS.join(", ")
            )));
        }
        let set = cfg
            .get(&format!("model.kd.{key}"))
            .is_some_and(|x| !x.is_null());
        if !set && !v.is_null() {
            let json = serde_json::to_string(&v).map_err(|e| bad(e.to_string()))?;
            out.push(format!("++model.kd.{key}={json}"));
        }
    }
    Ok(out)
}

fn invalid(key: &'static str, value: impl ToString, why: impl Into<String>) -> Error {
    Error::Invalid {
        key,
        value: value.to_string(),
        why: why.into(),
    }
}

/// Training arithmetic precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// fp32 everywhere (`trainer.precision=32`).
    Fp32,
    /// bf16 compute, fp32 master weights and optimizer state (`bf16`, `bf16-mixed`; PyTorch
    /// Lightning treats `bf16` as `bf16-mixed`).
    Bf16Mixed,
}

/// Everything the trainer needs.
#[derive(Debug, Clone)]
pub struct Job {
    /// Student checkpoint; `None` initialises the student from `model_yaml`.
    pub student: Option<PathBuf>,
    /// Teacher checkpoint.
    pub teacher: PathBuf,
    /// Where the distilled student goes.
    pub nemo_path: PathBuf,
    /// `model.tensor_model_parallel_size`.
    pub tp: u64,
    /// `model.pipeline_model_parallel_size`.
    pub pp: u64,
    /// The data-parallel size: world size / (TP × PP).
    pub dp: u64,
    /// `model.micro_batch_size`.
    pub micro_batch: usize,
    /// `model.global_batch_size`.
    pub global_batch: usize,
    /// `model.data.seq_length`.
    pub seq_length: usize,
    /// `trainer.max_steps`.
    pub max_steps: u64,
    /// `trainer.val_check_interval` (steps).
    pub val_check_interval: u64,
    /// `trainer.limit_val_batches` (global batches per validation; 0 disables it).
    pub limit_val_batches: u64,
    /// `trainer.log_every_n_steps` (plain log lines; the terminal line updates every step).
    pub log_every_n_steps: u64,
    /// `trainer.gradient_clip_val` (`None`/0: off).
    pub clip: Option<f64>,
    /// `trainer.precision`.
    pub precision: Precision,
    /// `trainer.accelerator` is `cpu` (else CUDA when available).
    pub force_cpu: bool,
    /// Optimizer.
    pub adamw: AdamWConfig,
    /// Megatron's distributed optimizer (ZeRO-1 over DP): `model.optim.name` is
    /// `distributed_fused_adam` or `mcore_distributed_optim`.
    pub distributed_optimizer: bool,
    /// `optim.lr` and `optim.sched`.
    pub schedule: CosineAnnealing,
    /// `model.kd`.
    pub kd: KdLoss,
    /// `model.kd.intermediate_layer_pairs` (ModelOpt's hidden-state losses).
    pub intermediate: Vec<Pair>,
    /// `model.kd.chunk_tokens`, as sequence positions per chunk.
    pub chunk_tokens: i64,
    /// `model.kd.teacher_cache`: the teacher's top-k logits read from this cache.
    pub teacher_cache: Option<PathBuf>,
    /// Activation recompute of the student (`model.activations_checkpoint_*`).
    pub recompute: Recompute,
    /// `model.data.data_prefix`.
    pub blend: Blend,
    /// `model.data.splits_string`.
    pub splits: String,
    /// `model.seed`.
    pub seed: u64,
    /// Tokens excluded from the loss (`data.eod_mask_loss` with `data.eod_token_id`).
    pub eod_mask: Option<i64>,
    /// The experiment folder.
    pub exp_dir: PathBuf,
    /// `exp_manager.resume_if_exists`.
    pub resume: bool,
    /// `exp_manager.create_checkpoint_callback`: periodic checkpoints at each validation.
    pub checkpoints: bool,
    /// `model.tokenizer.model` when it names a file on disk.
    pub tokenizer_file: Option<PathBuf>,
    /// The `model` section as YAML: the student's config when it is initialised from scratch.
    pub model_yaml: String,
}

impl Job {
    /// Resolves `cfg` for a launch of `world` processes.
    ///
    /// # Errors
    /// Missing required keys, wrong types, values out of range, unsupported parallelism.
    pub fn resolve(cfg: &RunConfig, world: u64) -> Result<Job, Error> {
        fn req<T>(k: &str, v: Option<T>) -> Result<T, runconfig::Error> {
            RunConfig::require(k, v)
        }
        let path = |k: &str| -> Result<Option<PathBuf>, Error> {
            Ok(cfg
                .str(k)?
                .filter(|s| !s.is_empty() && s != "null")
                .map(PathBuf::from))
        };
        let teacher = req(
            "model.kd_teacher_restore_from_path",
            path("model.kd_teacher_restore_from_path")?,
        )?;
        let nemo_path = req("model.nemo_path", path("model.nemo_path")?)?;
        let student = path("model.restore_from_path")?;

        let tp = cfg.u64("model.tensor_model_parallel_size")?.unwrap_or(1);
        let pp = cfg.u64("model.pipeline_model_parallel_size")?.unwrap_or(1);
        if pp == 0 {
            return Err(invalid(
                "model.pipeline_model_parallel_size",
                pp,
                "must be at least 1",
            ));
        }
        if let Some(v) = cfg.u64("model.virtual_pipeline_model_parallel_size")? {
            return Err(invalid(
                "model.virtual_pipeline_model_parallel_size",
                v,
                "must be null (interleaved pipelines are not supported, as in NeMo's script)",
            ));
        }
        let devices = cfg.u64("trainer.devices")?.unwrap_or(1);
        let nodes = cfg.u64("trainer.num_nodes")?.unwrap_or(1);
        if devices.saturating_mul(nodes) != world {
            return Err(invalid(
                "trainer.devices",
                devices,
                format!(
                    "devices x num_nodes ({devices} x {nodes}) must equal the number of processes launched ({world}); launch with torchrun --nproc_per_node={devices}"
                ),
            ));
        }
        if tp == 0 || world % tp.saturating_mul(pp) != 0 {
            return Err(invalid(
                "model.tensor_model_parallel_size",
                tp,
                format!(
                    "tensor x pipeline parallel size ({tp} x {pp}) must divide the world size {world} (world = tensor x pipeline x data parallel size)"
                ),
            ));
        }
        let dp = world / (tp * pp);
        let micro_batch = req("model.micro_batch_size", cfg.u64("model.micro_batch_size")?)?;
        let global_batch = req(
            "model.global_batch_size",
            cfg.u64("model.global_batch_size")?,
        )?;
        if micro_batch == 0
            || global_batch == 0
            || global_batch % micro_batch.saturating_mul(dp) != 0
        {
            return Err(invalid(
                "model.global_batch_size",
                global_batch,
                format!(
                    "must be a positive multiple of micro_batch_size ({micro_batch}) x data parallel size ({dp})"
                ),
            ));
        }
        let seq_length = req("model.data.seq_length", cfg.u64("model.data.seq_length")?)?;
        if seq_length < 2 {
            return Err(invalid(
                "model.data.seq_length",
                seq_length,
                "must be at least 2",
            ));
        }
        let max_steps = req("trainer.max_steps", cfg.u64("trainer.max_steps")?)?;
        if max_steps == 0 {
            return Err(invalid("trainer.max_steps", 0, "must be positive"));
        }
        let val_check_interval = match cfg.get("trainer.val_check_interval") {
            Some(serde_yaml_ng::Value::Number(n)) if n.is_f64() => {
                let f = n.as_f64().unwrap_or(1.0);
                if !(f > 0.0 && f <= 1.0) {
                    return Err(invalid(
                        "trainer.val_check_interval",
                        f,
                        "a fraction must be in (0, 1]; or give a step count",
                    ));
                }
                ((max_steps as f64 * f).round() as u64).max(1)
            }
            _ => cfg
                .u64("trainer.val_check_interval")?
                .unwrap_or(max_steps)
                .max(1),
        };
        let limit_val_batches =
            match cfg.get("trainer.limit_val_batches") {
                Some(serde_yaml_ng::Value::Number(n)) if n.is_f64() => return Err(invalid(
                    "trainer.limit_val_batches",
                    n,
                    "give a number of batches (a fraction of the validation set is not supported)",
                )),
                _ => cfg.u64("trainer.limit_val_batches")?.unwrap_or(0),
            };
        let precision =
            match cfg.str("trainer.precision")?.as_deref() {
                None | Some("32") | Some("32-true") => Precision::Fp32,
                Some("bf16") | Some("bf16-mixed") | Some("bf16-true") => Precision::Bf16Mixed,
                Some(p) => return Err(invalid(
                    "trainer.precision",
                    p,
                    "supported: 32, bf16, bf16-mixed (fp16 needs loss scaling, not implemented)",
                )),
            };
        let accel = cfg.str("trainer.accelerator")?.unwrap_or_default();
        let clip = cfg.f64("trainer.gradient_clip_val")?.filter(|c| *c > 0.0);

        let lr = req("model.optim.lr", cfg.f64("model.optim.lr")?)?;
        let betas = cfg
            .list("model.optim.betas")?
            .unwrap_or_else(|| vec!["0.9".into(), "0.999".into()]);
        let beta = |i: usize| -> Result<f64, Error> {
            betas
                .get(i)
                .and_then(|b| b.parse::<f64>().ok())
                .filter(|b| (0.0..1.0).contains(b))
                .ok_or_else(|| {
                    invalid(
                        "model.optim.betas",
                        format!("{betas:?}"),
                        "two numbers in [0, 1)",
                    )
                })
        };
        let opt_name = cfg.str("model.optim.name")?.unwrap_or_default();
        if !matches!(
            opt_name.as_str(),
            "" | "fused_adam"
                | "adamw"
                | "adam"
                | "distributed_fused_adam"
                | "mcore_distributed_optim"
        ) {
            return Err(invalid(
                "model.optim.name",
                opt_name,
                "only AdamW (fused_adam, adamw, distributed_fused_adam) is implemented",
            ));
        }
        let distributed_optimizer = matches!(
            opt_name.as_str(),
            "distributed_fused_adam" | "mcore_distributed_optim"
        );
        let adamw = AdamWConfig {
            weight_decay: cfg.f64("model.optim.weight_decay")?.unwrap_or(0.0),
            betas: (beta(0)?, beta(1)?),
            eps: cfg.f64("model.optim.eps")?.unwrap_or(1e-8),
        };
        let sched_name = cfg
            .str("model.optim.sched.name")?
            .unwrap_or_else(|| "CosineAnnealing".into());
        if sched_name != "CosineAnnealing" {
            return Err(invalid(
                "model.optim.sched.name",
                sched_name,
                "only CosineAnnealing is implemented",
            ));
        }
        let schedule = CosineAnnealing {
            base_lr: lr,
            warmup_steps: cfg.u64("model.optim.sched.warmup_steps")?.unwrap_or(0),
            constant_steps: cfg.u64("model.optim.sched.constant_steps")?.unwrap_or(0),
            max_steps,
            min_lr: cfg.f64("model.optim.sched.min_lr")?.unwrap_or(0.0),
        };

        // ModelOpt's distillation YAML: the file's keys fill the `model.kd.*` ones left null
        let kd_file = path("model.kd.config")?;
        let mut merged;
        let cfg = match &kd_file {
            Some(f) => {
                merged = cfg.clone();
                merged.apply(&modelopt_overrides(f, cfg)?)?;
                &merged
            }
            None => cfg,
        };
        if let Some(layers) = cfg.list("model.kd.logit_layers")? {
            if layers != ["output_layer", "output_layer"] {
                return Err(invalid(
                    "model.kd.logit_layers",
                    format!("{layers:?}"),
                    "only [output_layer, output_layer] (the logits) is supported",
                ));
            }
        }
        let mut intermediate = Vec::new();
        if let Some(v) = cfg
            .get("model.kd.intermediate_layer_pairs")
            .filter(|v| !v.is_null())
        {
            let shown = serde_json::to_string(v).unwrap_or_default();
            let entries = v.as_sequence().ok_or_else(|| {
                invalid(
                    "model.kd.intermediate_layer_pairs",
                    &shown,
                    "expected a list of [student_layer, teacher_layer(, cosine|mse)]",
                )
            })?;
            for e in entries {
                let parts: Vec<String> = e
                    .as_sequence()
                    .map(|s| {
                        s.iter()
                            .map(|x| x.as_str().unwrap_or_default().to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                let pair = Pair::parse(&parts)
                    .map_err(|why| invalid("model.kd.intermediate_layer_pairs", &shown, why))?;
                intermediate.push(pair);
            }
        }

        let skip_lm_loss = cfg.bool("model.kd.skip_lm_loss")?.unwrap_or(true);
        let kd_loss_scale = cfg.f64("model.kd.kd_loss_scale")?.unwrap_or(1.0);
        if !(kd_loss_scale > 0.0 && kd_loss_scale.is_finite()) {
            return Err(invalid(
                "model.kd.kd_loss_scale",
                kd_loss_scale,
                "must be positive",
            ));
        }
        let temperature = match cfg.f64("model.kd.logit_kl_temperature")? {
            Some(t) => t,
            None => cfg.f64("model.kd.temperature")?.unwrap_or(1.0),
        };
        let kind = match cfg.str("model.kd.loss")?.as_deref().unwrap_or("kl") {
            "kl" | "forward_kl" | "LogitsKLLoss" => LossKind::ForwardKl,
            "reverse_kl" => LossKind::ReverseKl,
            "jsd" => LossKind::Jsd {
                beta: cfg.f64("model.kd.jsd_beta")?.unwrap_or(0.5),
            },
            "topk_kl" | "topk" => LossKind::TopK {
                k: i64::try_from(cfg.u64("model.kd.top_k")?.unwrap_or(0)).unwrap_or(0),
            },
            other => {
                return Err(invalid(
                    "model.kd.loss",
                    other,
                    "expected kl, reverse_kl, jsd or topk_kl",
                ))
            }
        };
        let kind = match cfg.u64("model.kd.logit_kl_topk")? {
            Some(k) => LossKind::ModeloptTopK {
                k: i64::try_from(k).unwrap_or(i64::MAX),
            },
            None => kind,
        };
        let kd = KdLoss::new(kind, temperature)?
            .with_temperature_squared(cfg.bool("model.kd.temperature_squared")?.unwrap_or(false))
            .with_lm_loss((!skip_lm_loss).then_some(kd_loss_scale));
        let recompute = {
            let gran = cfg.str("model.activations_checkpoint_granularity")?;
            let method = cfg.str("model.activations_checkpoint_method")?;
            let n = cfg
                .u64("model.activations_checkpoint_num_layers")?
                .unwrap_or(1);
            match gran.as_deref() {
                None | Some("") | Some("None") | Some("null") => Recompute::None,
                Some("selective") => Recompute::Selective,
                Some("full") => {
                    if n == 0 {
                        return Err(invalid(
                            "model.activations_checkpoint_num_layers",
                            n,
                            "must be at least 1",
                        ));
                    }
                    match method.as_deref() {
                        Some("uniform") => Recompute::Uniform(n as usize),
                        Some("block") => Recompute::Block(n as usize),
                        other => {
                            return Err(invalid(
                                "model.activations_checkpoint_method",
                                other.unwrap_or("null"),
                                "must be uniform or block with granularity full",
                            ))
                        }
                    }
                }
                Some(other) => {
                    return Err(invalid(
                        "model.activations_checkpoint_granularity",
                        other,
                        "must be null, selective or full",
                    ))
                }
            }
        };
        if !intermediate.is_empty() && !matches!(recompute, Recompute::None | Recompute::Selective)
        {
            return Err(invalid(
                "model.kd.intermediate_layer_pairs",
                format!("{} pairs", intermediate.len()),
                "not with full activation recompute (the captured outputs would not be kept); set activations_checkpoint_granularity to null or selective",
            ));
        }
        let teacher_cache = path("model.kd.teacher_cache")?;
        if let Some(dir) = &teacher_cache {
            if !matches!(kd.kind, LossKind::ModeloptTopK { .. }) {
                return Err(invalid(
                    "model.kd.teacher_cache",
                    dir.display(),
                    "a teacher cache holds the teacher's top-k logits: it serves ModelOpt's top-k loss, set model.kd.logit_kl_topk",
                ));
            }
            if !intermediate.is_empty() {
                return Err(invalid(
                    "model.kd.teacher_cache",
                    dir.display(),
                    "intermediate_layer_pairs need the live teacher's hidden states (the cache holds logits only)",
                ));
            }
        }
        let chunk_tokens = cfg.u64("model.kd.chunk_tokens")?.unwrap_or(2048).max(1);
        let chunk_tokens = (chunk_tokens / micro_batch).max(1) as i64;

        let prefixes = req(
            "model.data.data_prefix",
            cfg.list("model.data.data_prefix")?,
        )?;
        let blend = Blend::parse(&prefixes)?;
        let splits = cfg
            .str("model.data.splits_string")?
            .unwrap_or_else(|| "98,1,1".into());
        let eod_mask = if cfg.bool("model.data.eod_mask_loss")?.unwrap_or(false) {
            let id = cfg.u64("model.data.eod_token_id")?.ok_or_else(|| {
                invalid(
                    "model.data.eod_token_id",
                    "null",
                    "eod_mask_loss needs the end-of-document token id (nemo-tool does not run the tokenizer)",
                )
            })?;
            Some(
                i64::try_from(id)
                    .map_err(|_| invalid("model.data.eod_token_id", id, "too large"))?,
            )
        } else {
            None
        };

        let name = cfg
            .str("name")?
            .unwrap_or_else(|| "megatron_llama_distill".into());
        let exp_dir = match cfg.str("exp_manager.explicit_log_dir")? {
            Some(d) => PathBuf::from(d),
            None => {
                let base = cfg
                    .str("exp_manager.exp_dir")?
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("nemo_experiments"));
                let n = cfg.str("exp_manager.name")?.unwrap_or(name);
                base.join(n)
            }
        };
        let tokenizer_file = cfg
            .str("model.tokenizer.model")?
            .filter(|m| !m.starts_with("nemo:"))
            .map(PathBuf::from);
        if let Some(t) = &tokenizer_file {
            if !t.is_file() {
                return Err(invalid(
                    "model.tokenizer.model",
                    t.display(),
                    "no such file",
                ));
            }
        }
        let model_yaml = cfg
            .get("model")
            .map(|m| serde_yaml_ng::to_string(m).unwrap_or_default())
            .unwrap_or_default();
        Ok(Job {
            student,
            teacher,
            nemo_path,
            tp,
            pp,
            dp,
            micro_batch: micro_batch as usize,
            global_batch: global_batch as usize,
            seq_length: seq_length as usize,
            max_steps,
            val_check_interval,
            limit_val_batches,
            log_every_n_steps: cfg.u64("trainer.log_every_n_steps")?.unwrap_or(10).max(1),
            clip,
            precision,
            force_cpu: accel == "cpu",
            adamw,
            distributed_optimizer,
            schedule,
            kd,
            intermediate,
            chunk_tokens,
            teacher_cache,
            recompute,
            blend,
            splits,
            seed: cfg.u64("model.seed")?.unwrap_or(1234),
            eod_mask,
            exp_dir,
            resume: cfg.bool("exp_manager.resume_if_exists")?.unwrap_or(false),
            checkpoints: cfg
                .bool("exp_manager.create_checkpoint_callback")?
                .unwrap_or(true),
            tokenizer_file,
            model_yaml,
        })
    }

    /// Micro-batches each data-parallel rank runs per optimizer step.
    pub fn accumulation(&self) -> usize {
        self.global_batch / (self.micro_batch * self.dp as usize)
    }

    /// Checkpoint folder inside the experiment folder.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.exp_dir.join("checkpoints")
    }

    /// The plot of train and validation KD loss.
    pub fn plot_path(&self) -> PathBuf {
        self.exp_dir.join("kd_loss.png")
    }

    /// Per-step metrics, one JSON object per line.
    pub fn metrics_path(&self) -> PathBuf {
        self.exp_dir.join("metrics.jsonl")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RunConfig {
        let mut c = RunConfig::distill_default();
        c.apply(&[
            "model.kd_teacher_restore_from_path=t.nemo".to_string(),
            "model.nemo_path=out.nemo".to_string(),
            "model.data.data_prefix=[1.0,data/x]".to_string(),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        c
    }

    fn with(extra: &[&str]) -> RunConfig {
        let mut c = base();
        let v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        c.apply(&v).unwrap_or_else(|e| panic!("{e}"));
        c
    }

    #[test]
    fn reads_modelopts_distillation_yaml_and_its_keys() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f = dir.path().join("distill.yaml");
        std::fs::write(
            &f,
            "logit_layers: [\"output_layer\", \"output_layer\"]\nintermediate_layer_pairs: []\n\
             skip_lm_loss: false\nkd_loss_scale: 2.5\nlogit_kl_temperature: 1.5\nlogit_kl_topk: 64\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let file = format!("model.kd.config={}", f.display());
        let j = Job::resolve(&with(&[&file]), 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(j.kd.kind, LossKind::ModeloptTopK { k: 64 });
        assert_eq!(j.kd.temperature, 1.5);
        assert_eq!(j.kd.lm_loss_scale, Some(2.5));
        // a key given on the command line wins over the file
        let j = Job::resolve(
            &with(&[
                &file,
                "model.kd.skip_lm_loss=true",
                "model.kd.logit_kl_temperature=2",
            ]),
            1,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((j.kd.lm_loss_scale, j.kd.temperature), (None, 2.0));
        // the defaults: NeMo's KL, no LM loss, no T^2
        let j = Job::resolve(&base(), 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(j.kd.kind, LossKind::ForwardKl);
        assert_eq!(
            (j.kd.lm_loss_scale, j.kd.temperature_squared),
            (None, false)
        );
        let e = |c: RunConfig| {
            Job::resolve(&c, 1)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(e(with(&["model.kd.logit_layers=[a,b]"])).contains("output_layer"));
        assert!(e(with(&["model.kd.intermediate_layer_pairs=[[a,b]]"]))
            .contains("not a capturable module"));
        assert!(e(with(&[
            "model.kd.intermediate_layer_pairs=[[decoder.final_layernorm,decoder.final_layernorm,l1]]"
        ]))
        .contains("unknown intermediate loss `l1`"));
        let j = Job::resolve(
            &with(&["model.kd.intermediate_layer_pairs=[[decoder.final_layernorm,decoder.final_layernorm],[decoder.layers.0.input_layernorm,decoder.layers.1.input_layernorm,mse]]"]),
            1,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        use crate::distill::hidden_loss::{HiddenLoss, Site};
        assert_eq!(j.intermediate.len(), 2);
        assert_eq!(
            (
                j.intermediate[1].student,
                j.intermediate[1].teacher,
                j.intermediate[1].loss
            ),
            (Site::InputNorm(0), Site::InputNorm(1), HiddenLoss::Mse)
        );
        assert_eq!(j.intermediate[0].loss, HiddenLoss::Cosine);
        assert!(e(with(&["model.kd.kd_loss_scale=0"])).contains("must be positive"));
        std::fs::write(&f, "logit_kl_topk: 4\nbogus: 1\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(e(with(&[&file])).contains("unknown key `bogus`"));
    }

    #[test]
    fn resolves_the_defaults_like_nemo() {
        let j = Job::resolve(&base(), 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(j.student, None);
        assert_eq!(j.accumulation(), 8);
        assert_eq!(j.precision, Precision::Fp32);
        assert_eq!(j.adamw.betas, (0.9, 0.95));
        assert_eq!(j.schedule.warmup_steps, 50);
        assert_eq!(j.kd.kind, LossKind::ForwardKl);
        assert_eq!(
            j.exp_dir,
            PathBuf::from("nemo_experiments/megatron_llama_distill")
        );
        assert_eq!(j.blend.entries, vec![(1.0, "data/x".to_string())]);
    }

    #[test]
    fn student_none_means_init_from_config() {
        let j = Job::resolve(&with(&["model.restore_from_path=None"]), 1)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(j.student, None);
        let j = Job::resolve(&with(&["model.restore_from_path=s.nemo"]), 1)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(j.student, Some(PathBuf::from("s.nemo")));
    }

    #[test]
    fn refuses_unsupported_parallelism_and_values() {
        let e = |c: RunConfig, w| {
            Job::resolve(&c, w)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        // world 1 cannot hold two stages; world 4 at TP2 x PP2 is DP 1, at TP1 x PP2 DP 2
        assert!(e(with(&["model.pipeline_model_parallel_size=2"]), 1).contains("pipeline"));
        assert!(e(
            with(&["trainer.devices=6", "model.pipeline_model_parallel_size=4"]),
            6
        )
        .contains("tensor x pipeline parallel size (1 x 4) must divide the world size 6"));
        let j = Job::resolve(
            &with(&[
                "trainer.devices=4",
                "model.pipeline_model_parallel_size=2",
                "model.tensor_model_parallel_size=2",
            ]),
            4,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((j.tp, j.pp, j.dp), (2, 2, 1));
        let j = Job::resolve(
            &with(&["trainer.devices=4", "model.pipeline_model_parallel_size=2"]),
            4,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((j.tp, j.pp, j.dp, j.accumulation()), (1, 2, 2, 4));
        assert!(e(with(&["model.virtual_pipeline_model_parallel_size=2"]), 1).contains("null"));
        assert!(e(base(), 2).contains("trainer.devices"));
        assert!(e(
            with(&["trainer.devices=3", "model.tensor_model_parallel_size=2"]),
            3
        )
        .contains("tensor_model_parallel_size"));
        // DP 2: 8 samples per step split 2 ways of micro-batch 1
        let j = Job::resolve(&with(&["trainer.devices=2"]), 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((j.tp, j.dp, j.accumulation()), (1, 2, 4));
        assert!(e(
            with(&[
                "trainer.devices=4",
                "model.global_batch_size=6",
                "model.micro_batch_size=1"
            ]),
            4
        )
        .contains("data parallel size (4)"));
        assert!(e(with(&["trainer.precision=16"]), 1).contains("precision"));
        assert!(e(
            with(&["model.global_batch_size=3", "model.micro_batch_size=2"]),
            1
        )
        .contains("global_batch_size"));
        assert!(e(with(&["model.kd.loss=mse"]), 1).contains("model.kd.loss"));
        assert!(
            e(with(&["model.activations_checkpoint_granularity=full"]), 1)
                .contains("model.activations_checkpoint_method")
        );
        assert!(
            e(with(&["model.activations_checkpoint_granularity=most"]), 1)
                .contains("model.activations_checkpoint_granularity")
        );
        let j = Job::resolve(
            &with(&[
                "model.activations_checkpoint_granularity=full",
                "model.activations_checkpoint_method=block",
                "model.activations_checkpoint_num_layers=2",
            ]),
            1,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(j.recompute, Recompute::Block(2));
        assert!(e(with(&["model.data.eod_mask_loss=true"]), 1).contains("eod_token_id"));
        let mut c = RunConfig::distill_default();
        c.apply(&["model.nemo_path=x".to_string()])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(e(c, 1).contains("kd_teacher_restore_from_path"));
    }

    #[test]
    fn bf16_spellings_and_experiment_folder() {
        let j = Job::resolve(
            &with(&[
                "trainer.precision=bf16",
                "exp_manager.explicit_log_dir=runs/kd_x",
                "trainer.val_check_interval=0.5",
                "trainer.max_steps=10",
            ]),
            1,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(j.precision, Precision::Bf16Mixed);
        assert_eq!(j.exp_dir, PathBuf::from("runs/kd_x"));
        assert_eq!(j.val_check_interval, 5);
    }
}
