//! The four conversions end to end: HF folder -> `.nemo` at any TP/PP,
//! `.nemo` -> HF folder (sharded safetensors), `.nemo` -> torch_dist `.nemo`,
//! and `.nemo` -> per-rank `.nemo` at any TP/PP (the reshard planner).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::formats::safetensors::{self, WriteTensor};
use crate::formats::torch::dtype::Dtype;
use crate::io::bytes::ByteView;
use crate::io::output::OutputDir;
use crate::io::piece::Piece;
use crate::model::checkpoint::{Checkpoint, GlobalValue, CONFIG_MEMBER};

use super::hf::{self, SIDE_FILES};
use super::hf_config::{nemo_config_yaml, LlamaArch, NemoTarget};
use super::named::{Item, NamedModel};
use super::tensor::{cast_of, stream_pieces};

/// Errors of a conversion; each wraps the step's own error, which names
/// the file, member or tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the HF folder.
    #[error(transparent)]
    Hf(#[from] hf::Error),
    /// Config mapping.
    #[error(transparent)]
    Config(#[from] super::hf_config::Error),
    /// Opening the `.nemo`.
    #[error(transparent)]
    Checkpoint(#[from] crate::model::checkpoint::Error),
    /// Building the named model.
    #[error(transparent)]
    NamedModel(#[from] super::named::Error),
    /// Tensor arithmetic.
    #[error(transparent)]
    Tensor(#[from] super::tensor::Error),
    /// Writing safetensors.
    #[error(transparent)]
    Safetensors(#[from] safetensors::Error),
    /// Creating or committing the output.
    #[error(transparent)]
    Output(#[from] crate::io::output::Error),
    /// Writing the distributed checkpoint.
    #[error(transparent)]
    Dist(#[from] super::dist_out::Error),
    /// Planning the per-rank layout.
    #[error(transparent)]
    Plan(Box<crate::model::plan::Error>),
    /// Writing the per-rank layout.
    #[error(transparent)]
    Reshard(Box<crate::ops::reshard::Error>),
    /// A request that cannot be honoured exactly.
    #[error("{0}")]
    Invalid(String),
    /// I/O on an output file.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// `map_err` for a failed write or read of `file`.
pub(super) fn io_err(file: &Path) -> impl Fn(io::Error) -> Error + '_ {
    move |source| Error::Io {
        file: file.display().to_string(),
        source,
    }
}

/// Writes `ck`'s artifacts (tokenizer files) into `dir` under their original names, as the
/// folder formats keep them; returns those names.
pub(super) fn write_artifacts<'a>(ck: &'a Checkpoint, dir: &Path) -> Result<Vec<&'a str>, Error> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut names = Vec::with_capacity(ck.artifacts.len());
    for a in &ck.artifacts {
        let name = artifact_original(a);
        let b = ck
            .read_member(a)
            .map_err(|e| Error::Invalid(format!("{a}: {e}")))?;
        let to = dir.join(name);
        std::fs::write(&to, b.as_slice()).map_err(io_err(&to))?;
        names.push(name);
    }
    Ok(names)
}

/// `convert --from hf` options.
#[derive(Debug, Clone)]
pub struct FromHf {
    /// Tensor-parallel size.
    pub tp: u64,
    /// Pipeline-parallel size.
    pub pp: u64,
    /// Cast to this type (default: keep).
    pub dtype: Option<Dtype>,
    /// `make_vocab_size_divisible_by` (default: NeMo's converter's choice, Vp(1) = V).
    pub vocab_divisor: Option<u64>,
    /// Replace the output.
    pub force: bool,
    /// Skip the fsync before the rename (atomic, not durable).
    pub no_sync: bool,
}

/// What a conversion wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The output path.
    pub output: PathBuf,
    /// What was converted (`hf -> nemo`, ...).
    pub direction: String,
    /// TP size of the output (1 for HF).
    pub tp: u64,
    /// PP size of the output (1 for HF).
    pub pp: u64,
    /// Tensors written.
    pub tensors: usize,
    /// Output files written (rank files, safetensors shards, DCP files).
    pub files: usize,
    /// Artifact / tokenizer files carried over.
    pub artifacts: Vec<String>,
    /// The vocabulary: true size and rows stored.
    pub vocab: (u64, u64),
    /// Non-fatal findings.
    pub warnings: Vec<String>,
}

pub use crate::model::checkpoint::write::{artifact_name, artifact_original};

/// The one dtype of every (name, dtype) tensor, or the requested cast.
fn model_dtype<'a>(
    tensors: impl IntoIterator<Item = (&'a str, Dtype)>,
    want: Option<Dtype>,
) -> Result<Dtype, Error> {
    let mut found: Option<Dtype> = None;
    for (name, dtype) in tensors {
        cast_of(name, dtype, want)?;
        match found {
            Some(d) if d != dtype && want.is_none() => {
                return Err(Error::Invalid(format!(
                    "mixed dtypes ({d} and {dtype} at `{name}`): pass --dtype"
                )))
            }
            _ => found = Some(dtype),
        }
    }
    want.or(found)
        .ok_or_else(|| Error::Invalid("the model has no tensors".into()))
}

/// The tensors of a named model as (name, dtype).
fn dtypes_of(canon: &NamedModel) -> impl Iterator<Item = (&str, Dtype)> {
    canon.entries.iter().filter_map(|e| match &e.item {
        Item::Tensor(t) => Some((e.name.as_str(), t.dtype)),
        Item::Object(_) => None,
    })
}

/// An HF folder read as a TP=1 checkpoint: a generated NeMo config, the tokenizer files as
/// artifacts, the whole tensors mapped without a copy.
pub struct HfCheckpoint {
    /// The checkpoint.
    pub ck: Checkpoint,
    /// The true vocabulary (HF `vocab_size`).
    pub vocab: u64,
    /// Embedding rows a per-rank `.nemo` at `opts.tp` gets.
    pub vocab_rows: u64,
    /// Artifact members.
    pub artifacts: Vec<String>,
    /// Non-fatal findings.
    pub warnings: Vec<String>,
}

/// Reads the HF folder `dir` as a checkpoint ([`HfCheckpoint`]), its config written for
/// `opts.tp` x `opts.pp`.
///
/// # Errors
/// [`Error`] for a folder or config that cannot be mapped exactly.
pub fn hf_checkpoint(dir: &Path, opts: &FromHf) -> Result<HfCheckpoint, Error> {
    let m = hf::read_dir(dir)?;
    let mut warnings = m.warnings.clone();
    let dtype = model_dtype(
        m.tensors.iter().filter_map(|t| match &t.value {
            GlobalValue::Tensor { dtype, .. } => Some((t.key.as_str(), *dtype)),
            GlobalValue::Object(_) => None,
        }),
        opts.dtype,
    )?;
    let v = m.arch.vocab_size;
    // The tokenizer's own count decides whether NeMo would size the
    // embedding right by itself; if not, `override_vocab_size` pins it.
    let tok_vocab = m
        .side_files
        .iter()
        .find_map(|(n, b)| tokenizer_vocab(n, b.as_slice()));
    let override_vocab_size = (tok_vocab != Some(v)).then_some(v);
    let divisor = opts
        .vocab_divisor
        .unwrap_or_else(|| m.arch.natural_divisor());
    if divisor == 0 {
        return Err(Error::Invalid(
            "--vocab-divisible-by must be at least 1".into(),
        ));
    }
    let vocab_rows = match override_vocab_size {
        Some(v) => v,
        None => v.div_ceil(divisor * opts.tp) * divisor * opts.tp,
    };
    if override_vocab_size.is_some() {
        warnings.push(format!(
            "tokenizer vocabulary ({}) differs from vocab_size {v}: wrote override_vocab_size: {v}",
            tok_vocab
                .map(|x| x.to_string())
                .unwrap_or_else(|| "unknown".into())
        ));
    }
    let (tokenizer_yaml, artifacts) =
        crate::model::foreign::tokenizer_section(&m.side_files, m.name_or_path.as_deref());
    let config = nemo_config_yaml(
        &m.arch,
        &NemoTarget {
            tp: opts.tp,
            pp: opts.pp,
            vocab_divisor: divisor,
            override_vocab_size,
            tokenizer_yaml,
            dtype,
        },
    );
    let mut files = vec![(
        CONFIG_MEMBER.to_string(),
        ByteView::from_vec(config.into_bytes()),
    )];
    files.extend(artifacts.iter().cloned());
    let archive = crate::formats::archive::Archive::assembled(dir, files)
        .map_err(|e| Error::Checkpoint(e.into()))?;
    let ck = Checkpoint::from_global(archive, m.tensors)?;
    Ok(HfCheckpoint {
        ck,
        vocab: v,
        vocab_rows,
        artifacts: artifacts.into_iter().map(|(n, _)| n).collect(),
        warnings,
    })
}

/// HF folder -> `.nemo` (per-rank layout at `opts.tp` x `opts.pp`).
///
/// # Errors
/// [`Error`]; the output appears only on success.
pub fn hf_to_nemo(dir: &Path, out: &Path, opts: &FromHf) -> Result<Summary, Error> {
    // The HF folder as a TP=1 checkpoint, written like any reshard: the one planner and
    // per-rank writer.
    let h = hf_checkpoint(dir, opts)?;
    let mut warnings = h.warnings;
    let (s, _) = write_per_rank(
        &h.ck,
        out,
        opts.tp,
        opts.pp,
        opts.dtype,
        Some(h.vocab),
        opts.force,
        opts.no_sync,
    )?;
    warnings.extend(s.warnings);
    Ok(Summary {
        output: s.output,
        direction: "hf -> nemo".into(),
        tp: s.tp,
        pp: s.pp,
        tensors: s.tensors,
        files: s.rank_files,
        artifacts: h.artifacts,
        vocab: (h.vocab, h.vocab_rows),
        warnings,
    })
}

/// Plans and writes `ck` as a per-rank `.nemo` at `tp` x `pp`.
#[allow(clippy::too_many_arguments)]
fn write_per_rank(
    ck: &Checkpoint,
    out: &Path,
    tp: u64,
    pp: u64,
    dtype: Option<Dtype>,
    vocab_size: Option<u64>,
    force: bool,
    no_sync: bool,
) -> Result<(crate::ops::reshard::Summary, crate::model::plan::Plan), Error> {
    let canon = crate::model::canonical::Canonical::new(ck)
        .map_err(|e| Error::Invalid(format!("{}: {e}", ck.path().display())))?;
    let plan = crate::model::plan::plan_reshard(
        &canon,
        &crate::model::plan::ReshardOptions {
            tp,
            pp,
            dtype,
            allow_partial_query_groups: false,
            vocab_size,
        },
    )
    .map_err(|e| Error::Plan(Box::new(e)))?;
    let s = crate::ops::reshard::write(
        &canon,
        &plan,
        out,
        crate::ops::reshard::WriteOptions {
            force,
            progress: None,
            no_sync,
        },
    )
    .map_err(|e| Error::Reshard(Box::new(e)))?;
    Ok((s, plan))
}

/// `convert --to hf` options.
#[derive(Debug, Clone)]
pub struct ToHf {
    /// Largest safetensors shard, in bytes of tensor data.
    pub shard_size: u64,
    /// Cast to this type (default: keep).
    pub dtype: Option<Dtype>,
    /// Replace the output.
    pub force: bool,
}

/// The true vocabulary of a `.nemo`: `override_vocab_size`, else the
/// tokenizer artifact's count; `None` when neither says.
pub fn true_vocab(ck: &Checkpoint) -> Option<u64> {
    if let Some(v) = ck.config.override_vocab_size() {
        return Some(v);
    }
    let from_refs = ck.config.artifact_refs().iter().find_map(|r| {
        let b = ck.read_member(&r.name).ok()?;
        tokenizer_vocab(artifact_original(&r.name), b.as_slice())
    });
    from_refs.or_else(|| {
        ck.artifacts
            .iter()
            .filter(|a| artifact_original(a) == "tokenizer.json")
            .find_map(|a| {
                let b = ck.read_member(a).ok()?;
                tokenizer_vocab("tokenizer.json", b.as_slice())
            })
    })
}

/// The vocabulary a tokenizer file defines: SentencePiece pieces, or for an
/// HF `tokenizer.json` one more than the highest id of its vocabulary and
/// added tokens (added special tokens live outside `model.vocab`).
pub fn tokenizer_vocab(name: &str, bytes: &[u8]) -> Option<u64> {
    match name {
        "tokenizer.model" => crate::model::tokenizer::vocab_size(name, bytes)
            .ok()
            .flatten(),
        "tokenizer.json" => {
            let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
            let vocab = v.get("model")?.get("vocab")?.as_object()?;
            let mut top = vocab.values().filter_map(|x| x.as_u64()).max()?;
            if let Some(added) = v.get("added_tokens").and_then(|a| a.as_array()) {
                for t in added {
                    if let Some(id) = t.get("id").and_then(|x| x.as_u64()) {
                        top = top.max(id);
                    }
                }
            }
            top.checked_add(1)
        }
        _ => None,
    }
}

/// `.nemo` (any layout) -> HF folder.
///
/// # Errors
/// [`Error`]; the folder appears only on success.
pub fn nemo_to_hf(input: &Path, out: &Path, opts: &ToHf) -> Result<Summary, Error> {
    let ck = Checkpoint::open(input)?;
    let canon = NamedModel::from_checkpoint(&ck)?;
    let mut warnings = ck.warnings.clone();
    let rows = canon
        .tensor("model.embedding.word_embeddings.weight")
        .and_then(|t| t.shape.first().copied())
        .ok_or_else(|| Error::Invalid("no word embedding in the checkpoint".into()))?;
    let v = match true_vocab(&ck) {
        Some(v) if v <= rows => v,
        Some(v) => {
            return Err(Error::Invalid(format!(
                "the tokenizer has {v} tokens but the embedding only {rows} rows"
            )))
        }
        None => {
            warnings.push(format!(
                "true vocabulary unknown (no override_vocab_size, no readable tokenizer artifact): kept all {rows} rows"
            ));
            rows
        }
    };
    let dtype = model_dtype(dtypes_of(&canon), opts.dtype)?;
    let mut arch = LlamaArch::from_nemo(&ck.config, v)?;
    arch.dtype = Some(dtype);
    // Side files: artifacts whose original name is a known HF file.
    let mut side: Vec<(String, ByteView)> = Vec::new();
    for a in &ck.artifacts {
        let orig = artifact_original(a);
        if SIDE_FILES.contains(&orig) && !side.iter().any(|(n, _)| n == orig) {
            let b = ck
                .read_member(a)
                .map_err(|e| Error::Invalid(format!("{a}: {e}")))?;
            side.push((orig.to_string(), b));
        }
    }
    if let Some((_, g)) = side.iter().find(|(n, _)| n == "generation_config.json") {
        if let Ok(serde_json::Value::Object(o)) = serde_json::from_slice(g.as_slice()) {
            for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
                if let Some(x) = o.get(k) {
                    arch.token_ids.insert(k.to_string(), x.clone());
                }
            }
        }
    }
    let tensors = hf::hf_tensors(&canon, &arch)?;
    let mut header_tensors = Vec::with_capacity(tensors.len());
    let mut casts = Vec::with_capacity(tensors.len());
    for t in &tensors {
        let cast = cast_of(&t.name, t.dtype, Some(dtype))?;
        let n = super::tensor::nbytes(dtype, &t.shape).unwrap_or(0);
        header_tensors.push(WriteTensor {
            name: t.name.clone(),
            dtype,
            shape: t.shape.clone(),
            pieces: vec![Piece::Zeros(n)],
        });
        casts.push(cast);
    }
    let plan = safetensors::plan_shards(&header_tensors, opts.shard_size.max(1));
    let dir = OutputDir::create(out, opts.force)?;
    let mut md = std::collections::BTreeMap::new();
    md.insert("format".to_string(), "pt".to_string());
    for (name, idx) in &plan.files {
        let path = dir.path().join(name);
        let f = std::fs::File::create(&path).map_err(io_err(&path))?;
        let mut w = crate::io::sink::BlockWriter::new(f);
        let sel: Vec<WriteTensor> = idx
            .iter()
            .filter_map(|&i| header_tensors.get(i).cloned())
            .collect();
        let h = safetensors::header(name, &sel, &md)?;
        w.write_all(&h).map_err(io_err(&path))?;
        for &i in idx {
            let (Some(t), Some(cast)) = (tensors.get(i), casts.get(i)) else {
                continue;
            };
            stream_pieces(&t.pieces, *cast, &mut crate::io::sink::Record(&mut w))
                .map_err(io_err(&path))?;
        }
        w.flush().map_err(io_err(&path))?;
    }
    let write_text = |name: &str, bytes: &[u8]| -> Result<(), Error> {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).map_err(io_err(&path))
    };
    if plan.files.len() > 1 {
        write_text(
            safetensors::INDEX_FILE,
            safetensors::index_json(&header_tensors, &plan).as_bytes(),
        )?;
    }
    write_text("config.json", arch.to_hf_json().as_bytes())?;
    for (n, b) in &side {
        write_text(n, b.as_slice())?;
    }
    let output = dir.commit()?;
    Ok(Summary {
        output,
        direction: "nemo -> hf".into(),
        tp: 1,
        pp: 1,
        tensors: tensors.len(),
        files: plan.files.len(),
        artifacts: side.into_iter().map(|(n, _)| n).collect(),
        vocab: (v, v),
        warnings,
    })
}

/// `.nemo` -> `.nemo` with a torch_dist `model_weights/` folder; `ep`, when given, becomes
/// `expert_model_parallel_size` (the folder holds every expert whole, so it loads at any
/// expert-parallel size: only the config says which).
///
/// # Errors
/// [`Error`]; [`Error::Invalid`] for `ep` on a dense model or one not dividing the experts.
/// The output appears only on success.
pub fn nemo_to_dist(
    input: &Path,
    out: &Path,
    ep: Option<u64>,
    force: bool,
) -> Result<Summary, Error> {
    let ck = Checkpoint::open(input)?;
    let canon = NamedModel::from_checkpoint(&ck)?;
    let config = match ep {
        None => ck.config.text().to_string(),
        Some(ep) => {
            let experts = ck
                .config
                .get("num_moe_experts")
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            if ep == 0 || (ep > 1 && (experts == 0 || experts % ep != 0)) {
                return Err(Error::Invalid(format!(
                    "--ep {ep}: expert parallelism splits the experts over ranks, so it must divide num_moe_experts ({experts})"
                )));
            }
            ck.config
                .with_updates(&[("expert_model_parallel_size", &ep.to_string())])
                .map_err(|e| Error::Invalid(format!("model_config.yaml: {e}")))?
        }
    };
    let s = super::dist_out::write(&ck, &canon, &config, out, force)?;
    let rows = canon
        .tensor("model.embedding.word_embeddings.weight")
        .and_then(|t| t.shape.first().copied())
        .unwrap_or(0);
    Ok(Summary {
        output: s.output,
        direction: "nemo -> dist".into(),
        tp: ck.config.tensor_model_parallel_size(),
        pp: ck.config.pipeline_model_parallel_size(),
        tensors: s.tensors,
        files: 4,
        artifacts: ck.artifacts.clone(),
        vocab: (true_vocab(&ck).unwrap_or(rows), rows),
        warnings: s.warnings,
    })
}

/// `.nemo` (any layout) -> per-rank `.nemo` at `tp` x `pp` (the reshard plan).
///
/// # Errors
/// [`Error`]; the output appears only on success.
pub fn nemo_to_per_rank(
    input: &Path,
    out: &Path,
    tp: u64,
    pp: u64,
    dtype: Option<Dtype>,
    force: bool,
) -> Result<Summary, Error> {
    let ck = Checkpoint::open(input)?;
    let (s, plan) = write_per_rank(&ck, out, tp, pp, dtype, None, force, false)?;
    let rows = plan
        .vocab
        .as_ref()
        .map(|v| (v.true_vocab.unwrap_or(v.source_rows), v.target_rows))
        .unwrap_or((0, 0));
    let mut warnings = s.warnings;
    if ck.source.as_ref().is_some_and(|s| s.optimizer) {
        warnings.push("optimizer state dropped (weights only)".into());
    }
    Ok(Summary {
        output: s.output,
        direction: format!("{} -> per-rank", source_name(&ck)),
        tp: s.tp,
        pp: s.pp,
        tensors: s.tensors,
        files: s.rank_files,
        artifacts: ck.artifacts.clone(),
        vocab: rows,
        warnings,
    })
}

/// The input's format for summaries (`nemo`, `hf`, `nemo2`, `megatron-lm`, ...).
pub fn source_name(ck: &Checkpoint) -> &'static str {
    match &ck.source {
        Some(s) => s.format.name(),
        None if matches!(ck.weights, crate::model::checkpoint::Weights::Global(_)) => "hf",
        None => "nemo",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_dtypes_need_a_cast() {
        use super::super::named::Entry;
        use super::super::tensor::Flat;
        let t = |name: &str, dtype: Dtype| Entry {
            name: name.into(),
            item: Item::Tensor(
                Flat::new(
                    name,
                    dtype,
                    vec![2],
                    vec![Piece::Zeros(2 * dtype.size() as u64)],
                )
                .unwrap(),
            ),
        };
        let c = NamedModel {
            entries: vec![t("a", Dtype::F32), t("b", Dtype::BF16)],
        };
        let e = model_dtype(dtypes_of(&c), None).unwrap_err();
        assert!(
            matches!(&e, Error::Invalid(m) if m.contains("mixed dtypes")),
            "{e}"
        );
        assert_eq!(
            model_dtype(dtypes_of(&c), Some(Dtype::F16)).unwrap(),
            Dtype::F16
        );
        let ints = NamedModel {
            entries: vec![t("i", Dtype::I64)],
        };
        assert!(model_dtype(dtypes_of(&ints), Some(Dtype::F16)).is_err());
    }

    #[test]
    fn tokenizer_json_vocab_counts_added_tokens() {
        let j = br#"{"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": [{"id": 5, "content": "<x>"}]}"#;
        assert_eq!(tokenizer_vocab("tokenizer.json", j), Some(6));
        assert_eq!(tokenizer_vocab("tokenizer.json", b"{}"), None);
        assert_eq!(tokenizer_vocab("merges.txt", b""), None);
    }

    #[test]
    fn artifact_names_round_trip() {
        let n = artifact_name("tokenizer.model", b"abc");
        assert_eq!(n.len(), 32 + 1 + "tokenizer.model".len());
        assert_eq!(artifact_original(&n), "tokenizer.model");
        assert_eq!(
            artifact_original("79b7d2d99291075a58045d29d6b0b3cc_tokenizer.model"),
            "tokenizer.model"
        );
        assert_eq!(
            artifact_original("my_tokenizer.model"),
            "my_tokenizer.model"
        );
    }
}
