//! The checkpoint folders today's trainers save, read as NeMo 1 archives:
//!
//! - **NeMo 2**: `context/` (`model.yaml`, `io.json`, `nemo_tokenizer/`) and `weights/` (a
//!   megatron-core distributed checkpoint, keys `module.*`);
//! - **Megatron-Bridge**: `iter_NNNNNNN/` with a distributed checkpoint (keys without a
//!   prefix), `run_config.yaml`, `train_state.pt` and `tokenizer/`;
//! - **Megatron-LM**: `latest_checkpointed_iteration.txt` naming `iter_NNNNNNN/` (or
//!   `release/`), holding a distributed checkpoint whose `common.pt` pickles the run's
//!   `args`, or legacy `mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt` files (`args`, `model`,
//!   optimizer and RNG state in one pickle).
//!
//! [`open`] builds an assembled archive in NeMo 1's names, sharing the files' mapped bytes:
//! `model_config.yaml` translated from the source's config ([`config`]), tokenizer files as
//! artifacts, the weights under `model_weights/` or `mp_rank_XX/` / `tp_rank_XX_pp_rank_YYY/`
//! `model_weights.ckpt`. `Checkpoint::open` then reads it as any
//! `.nemo`; its key normalisation turns `module.` and unprefixed keys into `model.` and
//! unwraps the `model` entry of a `model_optim_rng.pt`. Nothing is converted on disk.

pub mod config;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::formats::archive::Archive;
use crate::formats::torch::pickle::Policy;
use crate::formats::torch::Value;
use crate::io::bytes::ByteView;

use config::Fields;

/// Errors reading a foreign checkpoint folder; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{path}: {why}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The folder is recognised but its content is not as documented.
    #[error("{path}: {why}")]
    Invalid {
        /// The file or folder.
        path: PathBuf,
        /// What differs.
        why: String,
    },
    /// A variant not read yet.
    #[error("{path}: {why}")]
    Unsupported {
        /// The file or folder.
        path: PathBuf,
        /// What is not supported, and what to do.
        why: String,
    },
    /// The assembled archive.
    #[error(transparent)]
    Archive(#[from] crate::formats::archive::Error),
}

/// Which trainer saved the folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// NeMo 2 (`context/` + `weights/`).
    Nemo2,
    /// Megatron-Bridge (`run_config.yaml` in the iteration folder).
    MegatronBridge,
    /// Megatron-LM (`args` pickled in the checkpoint).
    MegatronLm,
}

impl Format {
    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Nemo2 => "nemo2",
            Format::MegatronBridge => "megatron-bridge",
            Format::MegatronLm => "megatron-lm",
        }
    }
}

/// What was found, for `inspect` and the converters.
#[derive(Debug, Clone, Serialize)]
pub struct Source {
    /// The trainer.
    pub format: Format,
    /// The weights' on-disk form: `torch_dist`, `zarr` or `legacy` (`model_optim_rng.pt`).
    pub weights: String,
    /// The folder opened.
    pub root: PathBuf,
    /// The folder holding the weights (`weights/`, `iter_0000100/`).
    pub weights_dir: PathBuf,
    /// The training iteration, when the folder records one.
    pub iteration: Option<u64>,
    /// Whether optimizer state is present (it is never read).
    pub optimizer: bool,
    /// Where the architecture was read (`context/model.yaml`, `run_config.yaml`, the `args`
    /// of a file).
    pub config_from: String,
    /// The tokenizer: a folder or file found (its files are the artifacts), or what the
    /// config names (a hub id, a path on the training machine).
    pub tokenizer: Option<String>,
    /// Findings worth telling the user.
    pub notes: Vec<String>,
}

/// The pickle allowlist for `model_optim_rng.pt` and `common.pt`: torch's weights-only set plus
/// the globals megatron-core registers as safe for its checkpoints (`safe_globals.py`), all
/// kept as inert records: the `argparse.Namespace` of the run's args, numpy's RNG state
/// (both module spellings), `signal.Signals`, megatron-core's enums and optimizer config.
pub fn mlm_policy() -> Policy {
    let mut p = Policy::torch()
        .allow_global("argparse", "Namespace")
        .allow_global("types", "SimpleNamespace")
        .allow_global("pathlib", "PosixPath")
        .allow_global("pathlib", "PurePosixPath")
        .allow_global("signal", "Signals")
        .allow_global("torch._C", "Generator")
        .allow_global("numpy", "ndarray")
        .allow_global("numpy", "dtype")
        .allow_global("numpy.dtypes", "UInt32DType")
        .allow_global("numpy.dtypes", "Float64DType")
        .allow_global("megatron.core.enums", "ModelType")
        .allow_global("megatron.core.optimizer", "OptimizerConfig")
        .allow_global(
            "megatron.core.optimizer.optimizer_config",
            "OptimizerConfig",
        );
    for m in ["numpy.core.multiarray", "numpy._core.multiarray"] {
        p = p.allow_global(m, "_reconstruct").allow_global(m, "scalar");
    }
    for n in [
        "AttnBackend",
        "AttnMaskType",
        "CudaGraphModule",
        "CudaGraphScope",
        "InferenceCudaGraphScope",
    ] {
        p = p.allow_global("megatron.core.transformer.enums", n);
    }
    for n in ["RerunDiagnostic", "RerunMode", "RerunState"] {
        p = p.allow_global("megatron.core.rerun_state_machine", n);
    }
    p
}

/// A folder this module reads, before anything is parsed.
#[derive(Debug, Clone)]
enum Kind {
    /// NeMo 2: the checkpoint folder.
    Nemo2,
    /// A Megatron-LM / Bridge iteration folder and its iteration from the tracker.
    Iteration {
        dir: PathBuf,
        iteration: Option<u64>,
    },
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Read {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

/// The tracker file Megatron-LM and Megatron-Bridge write beside their iteration folders.
pub const TRACKER: &str = "latest_checkpointed_iteration.txt";

/// `iter_0000100` -> 100.
fn iteration_of(dir: &Path) -> Option<u64> {
    let name = dir.file_name()?.to_str()?;
    name.strip_prefix("iter_")?.parse().ok()
}

/// Whether `path` is a folder this module reads (and which), or `None` (then it is a `.nemo`
/// or not a checkpoint at all).
fn detect(path: &Path) -> Result<Option<Kind>, Error> {
    if !path.is_dir() {
        return Ok(None);
    }
    if path.join("context/model.yaml").is_file() && path.join("weights").is_dir() {
        return Ok(Some(Kind::Nemo2));
    }
    let tracker = path.join(TRACKER);
    if tracker.is_file() {
        let text = std::fs::read_to_string(&tracker).map_err(|e| read_err(&tracker, e))?;
        let t = text.trim();
        let (sub, iteration) = if t == "release" {
            ("release".to_string(), Some(0))
        } else {
            let n: u64 = t.parse().map_err(|_| Error::Invalid {
                path: tracker.clone(),
                why: format!("expected an iteration number or `release`, found {t:?}"),
            })?;
            (format!("iter_{n:07}"), Some(n))
        };
        let dir = path.join(&sub);
        if !dir.is_dir() {
            return Err(Error::Invalid {
                path: tracker,
                why: format!("names {sub}/, which does not exist"),
            });
        }
        return Ok(Some(Kind::Iteration { dir, iteration }));
    }
    let is_iter = iteration_of(path).is_some()
        || path.file_name().is_some_and(|n| n == "release")
        || path.join("run_config.yaml").is_file()
        || legacy_ranks(path).is_ok_and(|r| !r.is_empty());
    if is_iter {
        return Ok(Some(Kind::Iteration {
            dir: path.to_path_buf(),
            iteration: iteration_of(path),
        }));
    }
    Ok(None)
}

/// Maps a file (an empty file is an empty view: it cannot be mapped).
fn map(path: &Path) -> Result<ByteView, Error> {
    let file = std::fs::File::open(path).map_err(|e| read_err(path, e))?;
    let len = file.metadata().map_err(|e| read_err(path, e))?.len();
    if len == 0 {
        return Ok(ByteView::from_vec(Vec::new()));
    }
    let m = crate::io::mmap::map_file(&file).map_err(|e| read_err(path, e))?;
    Ok(ByteView::from_mapped_file(m, file))
}

/// Every regular file under `dir`, as (path relative to `dir` with `/`, absolute path),
/// sorted; `skip` names top-level entries left out.
pub fn files_under(dir: &Path, skip: &[&str]) -> Result<Vec<(String, PathBuf)>, Error> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<(String, PathBuf)>) -> std::io::Result<()> {
        for e in std::fs::read_dir(d)? {
            let e = e?;
            let p = e.path();
            let t = e.file_type()?;
            if t.is_dir() {
                walk(root, &p, out)?;
            } else if t.is_file() {
                if let Ok(rel) = p.strip_prefix(root) {
                    let rel: Vec<_> = rel.iter().map(|c| c.to_string_lossy()).collect();
                    out.push((rel.join("/"), p.clone()));
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out).map_err(|e| read_err(dir, e))?;
    out.retain(|(rel, _)| {
        let top = rel.split('/').next().unwrap_or(rel);
        !skip.contains(&top)
    });
    out.sort();
    Ok(out)
}

/// The NeMo 1 `tokenizer:` section and its artifacts for a set of tokenizer files (name,
/// bytes): a SentencePiece `tokenizer.model`, else Hugging Face files (`vocab.json` +
/// `merges.txt` referenced, `tokenizer.json` and the rest carried); `name` is the Hugging
/// Face `type` (a hub id or folder name).
pub fn tokenizer_section(
    files: &[(String, ByteView)],
    name: Option<&str>,
) -> (String, Vec<(String, ByteView)>) {
    use crate::model::checkpoint::names::artifact_name;
    let mut artifacts = Vec::new();
    let mut refs = Vec::new();
    for (n, bytes) in files {
        let member = artifact_name(n, bytes.as_slice());
        refs.push((n.clone(), format!("nemo:{member}")));
        artifacts.push((member, bytes.clone()));
    }
    let r = |n: &str| {
        refs.iter()
            .find(|(x, _)| x == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "null".into())
    };
    let yaml = if files.iter().any(|(n, _)| n == "tokenizer.model") {
        format!(
            "  library: sentencepiece\n  type: null\n  model: {}\n  vocab_file: null\n  merge_file: null\n  delimiter: null\n  sentencepiece_legacy: false\n",
            r("tokenizer.model")
        )
    } else {
        let ty = name
            .map(|s| serde_json::to_string(s).unwrap_or_default())
            .unwrap_or_else(|| "null".into());
        format!(
            "  library: huggingface\n  type: {ty}\n  model: null\n  vocab_file: {}\n  merge_file: {}\n  delimiter: null\n  use_fast: true\n",
            r("vocab.json"),
            r("merges.txt")
        )
    };
    (yaml, artifacts)
}

/// The tokenizer files of a folder (top level only: what `save_pretrained` writes).
fn tokenizer_files(dir: &Path) -> Result<Vec<(String, ByteView)>, Error> {
    let mut out = Vec::new();
    for (rel, p) in files_under(dir, &[])? {
        if !rel.contains('/') {
            out.push((rel, map(&p)?));
        }
    }
    Ok(out)
}

/// An opened foreign folder: the archive in NeMo 1 names, and what was found.
#[derive(Debug)]
pub struct Opened {
    /// The assembled archive.
    pub archive: Archive,
    /// The source.
    pub source: Source,
}

/// Opens `path` if it is a folder this module reads; `None` otherwise.
///
/// # Errors
/// [`Error`] for a recognised folder that cannot be read as documented.
pub fn open(path: &Path) -> Result<Option<Opened>, Error> {
    match detect(path)? {
        None => Ok(None),
        Some(Kind::Nemo2) => open_nemo2(path).map(Some),
        Some(Kind::Iteration { dir, iteration }) => open_iteration(path, &dir, iteration).map(Some),
    }
}

/// The mapping under `key` of a YAML document, or an error naming the file.
fn yaml_doc(path: &Path) -> Result<serde_yaml_ng::Value, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| read_err(path, e))?;
    serde_yaml_ng::from_str(&text).map_err(|e| Error::Invalid {
        path: path.to_path_buf(),
        why: format!("not YAML: {e}"),
    })
}

fn open_nemo2(root: &Path) -> Result<Opened, Error> {
    let yaml_path = root.join("context/model.yaml");
    let doc = yaml_doc(&yaml_path)?;
    let section = doc.get("config").ok_or_else(|| Error::Invalid {
        path: yaml_path.clone(),
        why: "no `config:` mapping".into(),
    })?;
    let fields = Fields::from_yaml_section(section);
    let mut notes = Vec::new();
    // the tokenizer: a folder or file under context/ named by the tokenizer's config
    let tok = doc.get("tokenizer");
    let named = tok.and_then(|t| {
        ["pretrained_model_name", "model_path", "vocab_file"]
            .iter()
            .find_map(|k| t.get(*k).and_then(|v| v.as_str()).map(String::from))
    });
    let (tok_files, tok_where) = match &named {
        Some(n) => {
            let p = root.join("context").join(n);
            if p.is_dir() {
                (tokenizer_files(&p)?, Some(format!("context/{n}")))
            } else if p.is_file() {
                let file = p
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (vec![(file, map(&p)?)], Some(format!("context/{n}")))
            } else {
                notes.push(format!(
                    "the tokenizer `{n}` is not in context/ (a hub id or a path elsewhere): no tokenizer files carried"
                ));
                (Vec::new(), Some(n.clone()))
            }
        }
        None => (Vec::new(), None),
    };
    let hf_name = named.as_deref().map(|n| n.rsplit('/').next().unwrap_or(n));
    let (tok_yaml, artifacts) = tokenizer_section(&tok_files, hf_name);
    let text = fields
        .nemo1_yaml(&tok_yaml, None)
        .map_err(|why| Error::Invalid {
            path: yaml_path.clone(),
            why,
        })?;
    let weights_dir = root.join("weights");
    let mut files = vec![(
        crate::model::checkpoint::names::CONFIG_MEMBER.to_string(),
        ByteView::from_vec(text.into_bytes()),
    )];
    files.extend(artifacts);
    let weights = dist_members(&weights_dir, &mut files)?;
    let optimizer = dist_has_optimizer(&weights_dir);
    let iteration = root
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split("step=").nth(1))
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok());
    Ok(Opened {
        archive: Archive::assembled(root, files)?,
        source: Source {
            format: Format::Nemo2,
            weights,
            root: root.to_path_buf(),
            weights_dir,
            iteration,
            optimizer,
            config_from: "context/model.yaml".into(),
            tokenizer: tok_where,
            notes,
        },
    })
}

/// Adds the files of a distributed checkpoint folder as `model_weights/*` members; returns
/// its backend name.
fn dist_members(dir: &Path, files: &mut Vec<(String, ByteView)>) -> Result<String, Error> {
    let skip = [
        "run_config.yaml",
        "train_state.pt",
        "tokenizer",
        "hf",
        "modelopt_state",
        "context",
    ];
    let all = files_under(dir, &skip)?;
    if !all
        .iter()
        .any(|(r, _)| r == ".metadata" || r == "metadata.json")
    {
        return Err(Error::Invalid {
            path: dir.to_path_buf(),
            why: "no distributed checkpoint here (neither .metadata nor metadata.json)".into(),
        });
    }
    let mut backend = "torch_dist".to_string();
    for (rel, p) in all {
        let bytes = map(&p)?;
        if rel == "metadata.json" {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes.as_slice()) {
                if let Some(b) = v.get("sharded_backend").and_then(|b| b.as_str()) {
                    backend = b.to_string();
                }
            }
        }
        files.push((format!("model_weights/{rel}"), bytes));
    }
    Ok(backend)
}

/// Whether a distributed checkpoint folder holds optimizer state: its `.metadata` names
/// `optimizer.` keys (scanned in the mapped bytes: the keys are pickled strings).
fn dist_has_optimizer(dir: &Path) -> bool {
    map(&dir.join(".metadata")).is_ok_and(|b| b.as_slice().windows(10).any(|w| w == b"optimizer."))
}

/// `mp_rank_TT[_PPP[_EEE]]` folders holding `model_optim_rng.pt`: (name, numbers).
fn legacy_ranks(dir: &Path) -> Result<Vec<(String, Vec<u64>)>, Error> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for e in rd {
        let e = e.map_err(|e| read_err(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("mp_rank_") else {
            continue;
        };
        let nums: Option<Vec<u64>> = rest.split('_').map(|s| s.parse().ok()).collect();
        if let Some(nums) = nums {
            if e.path().join(LEGACY_FILE).is_file() && (1..=3).contains(&nums.len()) {
                out.push((name, nums));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The common (non-sharded) state of a distributed checkpoint folder and where it was:
/// `common.pt` (megatron-core up to 0.18), else the DCP object `common_state/shard_0_1`
/// (0.19+, `torch.save([state])`).
fn common_state(dir: &Path) -> Result<(Option<Value>, &'static str), Error> {
    let common = dir.join("common.pt");
    if common.is_file() {
        let f = crate::formats::torch::file::load_metadata(map(&common)?, &mlm_policy())
            .map_err(|e| read_err(&common, e))?;
        return Ok((Some(f.root), "common.pt"));
    }
    let archive = Archive::open(dir)?;
    let dist =
        crate::formats::dist::DistCheckpoint::open(&archive, "").map_err(|e| read_err(dir, e))?;
    let Some(o) = dist
        .objects
        .iter()
        .find(|o| o.key.starts_with("common_state/"))
    else {
        return Ok((None, "common.pt or common_state/"));
    };
    let bytes = dist
        .read_object_bytes(&archive, o)
        .map_err(|e| read_err(dir, format!("{}: {e}", o.key)))?;
    let load = |b: ByteView| {
        crate::formats::torch::file::load_metadata(b, &mlm_policy())
            .map(|f| f.root)
            .map_err(|e| read_err(dir, format!("{}: {e}", o.key)))
    };
    let mut state = load(bytes)?;
    // torch's DCP writer pickles a BytesIO value around the bytes megatron-core gave it
    for _ in 0..4 {
        let inner = match &state {
            Value::Object(b) if b.class.is("_io", "BytesIO") => match b.state.as_ref() {
                Some(Value::Tuple(t)) => match t.first() {
                    Some(Value::Bytes(x)) => Some(x.clone()),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        };
        match inner {
            Some(x) => state = load(ByteView::from_vec(x))?,
            None => break,
        }
    }
    if let Value::List(v) = &state {
        if let [one] = v.as_slice() {
            state = one.clone();
        }
    }
    Ok((Some(state), "common_state/"))
}

/// The member under which expert-parallel rank `e` (> 0) of the file `member` is assembled:
/// `mp_rank_00/model_weights.ckpt` -> `mp_rank_00/model_weights.ep001.ckpt`.
/// `Checkpoint::open` merges such members into the EP-0 file, experts renumbered.
pub fn ep_member(member: &str, e: u64) -> String {
    let stem = member.strip_suffix(".ckpt").unwrap_or(member);
    format!("{stem}.ep{e:03}.ckpt")
}

/// The per-rank file of a legacy Megatron-LM checkpoint.
pub const LEGACY_FILE: &str = "model_optim_rng.pt";

/// The attribute dict of a pickled `argparse.Namespace`.
fn namespace_items(v: &Value) -> Option<&[(Value, Value)]> {
    match v {
        Value::Object(o) if o.class.name == "Namespace" || o.class.name == "SimpleNamespace" => {
            o.state.as_ref()?.dict_items()
        }
        _ => None,
    }
}

fn open_iteration(
    root: &Path,
    dir: &Path,
    tracker_iteration: Option<u64>,
) -> Result<Opened, Error> {
    let mut notes = Vec::new();
    let ranks = legacy_ranks(dir)?;
    let run_config = dir.join("run_config.yaml");
    let mut files: Vec<(String, ByteView)> = Vec::new();
    let (fields, config_from, format, weights, optimizer, iteration);
    if !ranks.is_empty() {
        // legacy: the args of the first rank's file
        let first = dir.join(&ranks[0].0).join(LEGACY_FILE);
        let f = crate::formats::torch::file::load_metadata(map(&first)?, &mlm_policy())
            .map_err(|e| read_err(&first, e))?;
        let args = f
            .root
            .get("args")
            .and_then(namespace_items)
            .ok_or_else(|| Error::Invalid {
                path: first.clone(),
                why: "no `args` (an argparse.Namespace): not a Megatron-LM checkpoint".into(),
            })?;
        let version = match f.root.get("checkpoint_version") {
            Some(Value::Float(v)) => *v,
            Some(Value::Int(v)) => *v as f64,
            _ => 0.0,
        };
        if version < 2.0 {
            return Err(Error::Unsupported {
                path: first,
                why: format!(
                    "checkpoint_version {version}: before 2.0 Megatron-LM ordered fused QKV rows differently; re-save it with a current Megatron-LM"
                ),
            });
        }
        let fl = Fields::from_mlm_args(args);
        let (tp, pp, ep) = (
            fl.u64("tensor_model_parallel_size").unwrap_or(1),
            fl.u64("pipeline_model_parallel_size").unwrap_or(1),
            fl.u64("expert_model_parallel_size").unwrap_or(1),
        );
        if fl.u64("virtual_pipeline_model_parallel_size").unwrap_or(1) > 1 {
            return Err(Error::Unsupported {
                path: dir.to_path_buf(),
                why: "virtual pipeline stages (model0, model1, ... per file): not read yet".into(),
            });
        }
        // mp_rank_TT[_PPP][_EEE]: the PP part only when PP > 1, the EP part only when EP > 1
        let want = 1 + usize::from(pp > 1) + usize::from(ep > 1);
        for (name, nums) in &ranks {
            let (t, p, e) = match (nums.as_slice(), pp > 1) {
                ([t], _) if want == 1 => (*t, 0, 0),
                ([t, p], true) if want == 2 => (*t, *p, 0),
                ([t, e], false) if want == 2 => (*t, 0, *e),
                ([t, p, e], _) if want == 3 => (*t, *p, *e),
                _ => {
                    return Err(Error::Invalid {
                        path: dir.join(name),
                        why: format!(
                        "does not fit the args' TP={tp} PP={pp} EP={ep} (expected mp_rank_TT{}{})",
                        if pp > 1 { "_PPP" } else { "" },
                        if ep > 1 { "_EEE" } else { "" }
                    ),
                    })
                }
            };
            let member =
                crate::model::checkpoint::detect::Variant::for_sizes(tp, pp).rank_member(t, p);
            // expert-parallel ranks beside the EP-0 file, merged on open (see `ep_member`)
            let member = if e == 0 {
                member
            } else {
                ep_member(&member, e)
            };
            files.push((member, map(&dir.join(name).join(LEGACY_FILE))?));
        }
        if ranks.len() as u64 != tp * pp * ep {
            return Err(Error::Invalid {
                path: dir.to_path_buf(),
                why: format!(
                    "{} rank folders for the args' TP={tp} x PP={pp} x EP={ep}",
                    ranks.len()
                ),
            });
        }
        optimizer = f.root.get("optimizer").is_some()
            || dir.join(&ranks[0].0).join("distrib_optim.pt").is_file();
        iteration = match f.root.get("iteration") {
            Some(Value::Int(i)) => u64::try_from(*i).ok(),
            _ => tracker_iteration,
        };
        config_from = format!("args in {}/{LEGACY_FILE}", ranks[0].0);
        format = Format::MegatronLm;
        weights = "legacy".to_string();
        // the ranks are read as one model holding every expert
        fields = fl.with("expert_model_parallel_size", config::Field::Int(1));
    } else {
        weights = dist_members(dir, &mut files)?;
        optimizer = dist_has_optimizer(dir);
        iteration = tracker_iteration;
        if run_config.is_file() {
            let doc = yaml_doc(&run_config)?;
            let section = doc.get("model").ok_or_else(|| Error::Invalid {
                path: run_config.clone(),
                why: "no `model:` mapping".into(),
            })?;
            fields = Fields::from_yaml_section(section);
            config_from = "run_config.yaml".into();
            format = Format::MegatronBridge;
        } else {
            let (common, from) = common_state(dir)?;
            let Some(args) = common
                .as_ref()
                .and_then(|c| c.get("args"))
                .and_then(namespace_items)
            else {
                return Err(Error::Unsupported {
                    path: dir.to_path_buf(),
                    why: format!(
                        "no run_config.yaml and no `args` in {from}: the architecture is unknown (give a folder with either)"
                    ),
                });
            };
            fields = Fields::from_mlm_args(args);
            config_from = format!("args in {from}");
            format = Format::MegatronLm;
        }
    }
    // the tokenizer: Bridge's tokenizer/ folder, else what the args name
    let tok_dir = dir.join("tokenizer");
    let (tok_files, tok_where) = if tok_dir.is_dir() {
        (
            tokenizer_files(&tok_dir)?,
            Some(format!(
                "{}/tokenizer",
                dir.file_name().unwrap_or_default().to_string_lossy()
            )),
        )
    } else {
        let named = fields
            .str("tokenizer_model")
            .or_else(|| fields.str("vocab_file"))
            .map(String::from);
        if let Some(n) = &named {
            notes.push(format!(
                "the tokenizer is named by the args (`{n}`), not stored in the checkpoint: no tokenizer files carried"
            ));
        }
        (Vec::new(), named)
    };
    let (tok_yaml, artifacts) = tokenizer_section(&tok_files, None);
    // Megatron-LM's args record the padded vocabulary; nothing else states the true one
    let override_vocab = if tok_files.is_empty() {
        fields.u64("padded_vocab_size")
    } else {
        None
    };
    let what = if config_from == "run_config.yaml" {
        run_config.clone()
    } else {
        dir.to_path_buf()
    };
    let text = fields
        .nemo1_yaml(&tok_yaml, override_vocab)
        .map_err(|why| Error::Invalid { path: what, why })?;
    files.insert(
        0,
        (
            crate::model::checkpoint::names::CONFIG_MEMBER.to_string(),
            ByteView::from_vec(text.into_bytes()),
        ),
    );
    files.extend(artifacts);
    if optimizer {
        notes.push("optimizer state present: not read (weights only)".into());
    }
    Ok(Opened {
        archive: Archive::assembled(root, files)?,
        source: Source {
            format,
            weights,
            root: root.to_path_buf(),
            weights_dir: dir.to_path_buf(),
            iteration,
            optimizer,
            config_from,
            tokenizer: tok_where,
            notes,
        },
    })
}
