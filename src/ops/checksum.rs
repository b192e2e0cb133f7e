//! Tensor checksums, two kinds:
//!
//! * **canonical** (the default of `nemo-tool checksum`): sha256 of each
//!   logical tensor in its canonical TP=1 layout (one entry per global layer,
//!   see [`crate::model::canonical`]) with vocabulary padding rows excluded, and one
//!   model digest over the sorted per-tensor lines. The same weights give the
//!   same sums and digest at any TP/PP and in any layout; the result is a
//!   [`Manifest`] that `validate --manifest` checks.
//! * **stored** (`--stored`): sha256 over each stored tensor's logical
//!   row-major little-endian bytes as stored (per rank file, or per global
//!   tensor of a distributed checkpoint), to compare our reading with torch's.
//!
//! Both hash logical bytes: strides, storage sharing and zip layout do not matter.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::formats::numeric::Special;
use crate::formats::torch::Value;
use crate::io::piece::Piece;
use crate::model::canonical::{Axis, Canonical, EntryValue};
use crate::model::checkpoint::{Checkpoint, GlobalValue, Weights};
use crate::model::layout::Rule;

/// The `format` field of a checksum manifest.
pub const MANIFEST_FORMAT: &str = "nemo-tool-checksums/1";

/// Errors computing checksums; each names the tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor view could not be resolved.
    #[error("{member}: {key}: {source}")]
    Tensor {
        /// Member holding it.
        member: String,
        /// Tensor key.
        key: String,
        /// Why.
        #[source]
        source: crate::formats::torch::tensor::Error,
    },
    /// A distributed-checkpoint tensor could not be assembled.
    #[error("model_weights/: {key}: {source}")]
    Dist {
        /// Tensor key.
        key: String,
        /// Why.
        #[source]
        source: Box<crate::formats::dist::Error>,
    },
    /// The canonical view could not be built or read.
    #[error(transparent)]
    Canonical(#[from] Box<crate::model::canonical::Error>),
}

impl From<crate::model::canonical::Error> for Error {
    fn from(e: crate::model::canonical::Error) -> Error {
        Error::Canonical(Box::new(e))
    }
}

/// The checksum of one stored tensor or object.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StoredSum {
    /// Member (rank file), or `model_weights/` for distributed checkpoints.
    pub member: String,
    /// Key as stored.
    pub key: String,
    /// dtype name, or `object`.
    pub dtype: String,
    /// Shape as stored (global for distributed checkpoints).
    pub shape: Vec<u64>,
    /// Lowercase hex sha256 of the logical bytes (objects: of their stored bytes).
    pub sha256: String,
}

/// sha256 over a list of pieces.
pub fn sha256_pieces(pieces: &[Piece]) -> String {
    let mut h = Sha256::new();
    let zeros = [0u8; 4096];
    for p in pieces {
        match p {
            Piece::Bytes(b) => h.update(b.as_slice()),
            Piece::Zeros(mut n) => {
                while n > 0 {
                    let k = n.min(zeros.len() as u64) as usize;
                    h.update(&zeros[..k]);
                    n -= k as u64;
                }
            }
        }
    }
    hex::encode(h.finalize())
}

/// The canonical checksum of one logical tensor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TensorSum {
    /// Canonical name: `decoder.layers.<global layer>.<name>` with TE norm
    /// names, or the prefix-less key (`embedding.word_embeddings.weight`).
    pub name: String,
    /// dtype name (`bfloat16`).
    pub dtype: String,
    /// Canonical (TP=1) shape, vocab padding rows excluded.
    pub shape: Vec<u64>,
    /// Lowercase hex sha256 of the row-major bytes of that shape.
    pub sha256: String,
    /// NaN / Inf counts (float tensors, when asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub special: Option<SpecialCounts>,
}

/// NaN / Inf counts of a tensor (see [`crate::formats::numeric::Special`]).
pub type SpecialCounts = Special;

/// How many rows of the vocab-parallel tensors were hashed, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VocabRows {
    /// Rows stored (padded).
    pub stored: u64,
    /// Rows hashed (the true vocabulary when known).
    pub hashed: u64,
    /// `tokenizer:<member>`, `given`, or `trailing-zero-rows` (the true
    /// vocabulary is unknown: trailing all-zero rows were taken as padding).
    pub source: String,
}

/// The canonical checksums of a checkpoint: what `nemo-tool checksum --json`
/// prints and `validate --manifest` reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// sha256 over the sorted tensor lines (see [`model_digest`]).
    pub model_digest: String,
    /// Vocab rows hashed, for models with vocab-parallel tensors.
    #[serde(default)]
    pub vocab: Option<VocabRows>,
    /// One entry per canonical tensor, sorted by name.
    pub tensors: Vec<TensorSum>,
    /// Entries left out of the digest (opaque `_extra_state` objects, the
    /// tied output copy of a PP>1 layout), for information.
    #[serde(default)]
    pub skipped: Vec<String>,
}

/// Options for [`canonical`].
#[derive(Debug, Clone, Default)]
pub struct CanonicalOptions {
    /// The true vocabulary size, overriding the tokenizer artifact.
    pub vocab_size: Option<u64>,
    /// Count NaN / Inf in float tensors while hashing.
    pub count_special: bool,
}

/// The model digest: sha256 over `name\tdtype\tshape\tsha256\n` lines of
/// the tensors sorted by name (shape as `[a,b]`).
pub fn model_digest(tensors: &[TensorSum]) -> String {
    let mut sorted: Vec<&TensorSum> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = Sha256::new();
    for t in sorted {
        let shape: Vec<String> = t.shape.iter().map(u64::to_string).collect();
        h.update(format!(
            "{}\t{}\t[{}]\t{}\n",
            t.name,
            t.dtype,
            shape.join(","),
            t.sha256
        ));
    }
    hex::encode(h.finalize())
}

/// The true vocabulary size from a tokenizer artifact the config references:
/// `(size, member)`.
pub fn tokenizer_vocab(ckpt: &Checkpoint) -> Option<(u64, String)> {
    let refs = ckpt.config.artifact_refs();
    ckpt.artifacts
        .iter()
        .filter(|name| refs.iter().any(|r| &r.name == *name))
        .find_map(|name| {
            let bytes = ckpt.read_member(name).ok()?;
            let v = crate::model::tokenizer::vocab_size(name, bytes.as_slice()).ok()??;
            Some((v, name.clone()))
        })
}

/// The canonical name of an entry (see [`TensorSum::name`]).
pub fn canonical_name(c: &Canonical, layer: Option<u64>, name: &str) -> String {
    match layer {
        Some(l) => format!("{}{l}.{name}", c.layer_stem),
        None => name.to_string(),
    }
}

/// True for the copy of the word embeddings a tied model stores as the
/// output layer on the last stage at PP>1 (absent at PP=1: not a weight).
pub fn is_tied_copy(c: &Canonical, layer: Option<u64>, name: &str) -> bool {
    let ckpt = c.checkpoint();
    layer.is_none()
        && ckpt.config.share_embeddings_and_output_weights()
        && ckpt
            .family
            .state_dict
            .as_ref()
            .and_then(|t| t.tied_output.as_deref())
            .map(|k| ckpt.family.strip_prefix(k) == name || k == name)
            .unwrap_or(name == "output_layer.weight")
}

/// Rows of the vocab-parallel tensors that are vocabulary (not padding);
/// `None` for models without vocab-parallel tensors.
///
/// # Errors
/// Unreadable vocab tensors (the unknown-vocabulary case reads them).
pub fn vocab_rows(c: &Canonical, opts: &CanonicalOptions) -> Result<Option<VocabRows>, Error> {
    let Some(stored) = c.vocab_rows else {
        return Ok(None);
    };
    let known = match opts.vocab_size {
        Some(v) => Some((v, "given".to_string())),
        None => tokenizer_vocab(c.checkpoint()).map(|(v, m)| (v, format!("tokenizer:{m}"))),
    };
    if let Some((v, source)) = known {
        return Ok(Some(VocabRows {
            stored,
            hashed: v.min(stored),
            source,
        }));
    }
    // Unknown vocabulary: trailing rows that are zero in every vocab tensor
    // are padding (what Megatron's resharding writes).
    let mut keep = 0u64;
    for e in &c.entries {
        let EntryValue::Tensor(t) = &e.value else {
            continue;
        };
        if t.rule != Rule::Vocab || stored == 0 {
            continue;
        }
        let row_bytes = t.nbytes() / stored;
        let pieces = c.read(&e.name, t, Axis::First, 0..stored)?;
        let mut last_nonzero = None;
        let mut off = 0u64;
        for p in &pieces {
            if let Piece::Bytes(b) = p {
                if let Some(i) = b.as_slice().iter().rposition(|&x| x != 0) {
                    last_nonzero = Some(off + i as u64);
                }
            }
            off += p.len();
        }
        if let Some(i) = last_nonzero {
            keep = keep.max(i / row_bytes.max(1) + 1);
        }
    }
    Ok(Some(VocabRows {
        stored,
        hashed: keep,
        source: "trailing-zero-rows".to_string(),
    }))
}

/// Canonical checksums of every tensor and the model digest (reads every
/// payload byte once).
///
/// # Errors
/// An inconsistent checkpoint ([`Error::Canonical`]) or unreadable chunks.
pub fn canonical(c: &Canonical, opts: &CanonicalOptions) -> Result<Manifest, Error> {
    canonical_inner(c, opts, None)
}

/// [`canonical`] hashing at most `budget` bytes (bigger tensors are skipped),
/// for fuzzing.
pub fn canonical_bounded(c: &Canonical, budget: u64) -> Result<Manifest, Error> {
    canonical_inner(c, &CanonicalOptions::default(), Some(budget))
}

fn canonical_inner(
    c: &Canonical,
    opts: &CanonicalOptions,
    mut budget: Option<u64>,
) -> Result<Manifest, Error> {
    let vocab = match budget {
        Some(_) => None,
        None => vocab_rows(c, opts)?,
    };
    let mut tensors = Vec::new();
    let mut skipped = Vec::new();
    for e in &c.entries {
        let name = canonical_name(c, e.layer, &e.name);
        let EntryValue::Tensor(t) = &e.value else {
            skipped.push(name);
            continue;
        };
        if is_tied_copy(c, e.layer, &e.name) {
            skipped.push(name);
            continue;
        }
        let mut shape = t.shape.clone();
        let rows = shape.first().copied().unwrap_or(1);
        let rows = match (&vocab, t.rule) {
            (Some(v), Rule::Vocab) => v.hashed.min(rows),
            _ => rows,
        };
        if let Some(d0) = shape.first_mut() {
            *d0 = rows;
        }
        if let Some(b) = budget.as_mut() {
            let n = t.nbytes();
            if n > *b {
                continue;
            }
            *b -= n;
        }
        let pieces = c.read(&e.name, t, Axis::First, 0..rows)?;
        let mut special = Special::default();
        if opts.count_special {
            crate::formats::numeric::for_each_block(&pieces, t.dtype.size(), |b| {
                special.count(t.dtype, b)
            });
        }
        tensors.push(TensorSum {
            name,
            dtype: t.dtype.torch_name().to_string(),
            shape,
            sha256: sha256_pieces(&pieces),
            special: (opts.count_special && crate::formats::numeric::is_float(t.dtype))
                .then_some(special),
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Manifest {
        format: MANIFEST_FORMAT.to_string(),
        model_digest: model_digest(&tensors),
        vocab,
        tensors,
        skipped,
    })
}

/// Checksums of every stored tensor (reads every payload byte once).
pub fn stored(ckpt: &Checkpoint) -> Result<Vec<StoredSum>, Error> {
    let mut out = Vec::new();
    match &ckpt.weights {
        Weights::PerRank(ranks) => {
            for r in ranks {
                for (key, value) in r.entries() {
                    let Value::Tensor(t) = value else { continue };
                    let pieces = t.pieces().map_err(|source| Error::Tensor {
                        member: r.member.clone(),
                        key: key.to_string(),
                        source,
                    })?;
                    out.push(StoredSum {
                        member: r.member.clone(),
                        key: key.to_string(),
                        dtype: t.dtype.torch_name().to_string(),
                        shape: t.shape.clone(),
                        sha256: sha256_pieces(&pieces),
                    });
                }
            }
        }
        Weights::Dist(dist) => {
            for t in &dist.tensors {
                let pieces = dist
                    .read_global(ckpt.archive(), t)
                    .map_err(|source| Error::Dist {
                        key: t.key.clone(),
                        source: Box::new(source),
                    })?;
                out.push(StoredSum {
                    member: "model_weights/".to_string(),
                    key: t.key.clone(),
                    dtype: t.dtype.torch_name().to_string(),
                    shape: t.shape.clone(),
                    sha256: sha256_pieces(&pieces),
                });
            }
        }
        Weights::Global(tensors) => {
            for t in tensors {
                let GlobalValue::Tensor {
                    dtype,
                    shape,
                    pieces,
                } = &t.value
                else {
                    continue;
                };
                out.push(StoredSum {
                    member: ckpt.path().display().to_string(),
                    key: t.key.clone(),
                    dtype: dtype.torch_name().to_string(),
                    shape: shape.clone(),
                    sha256: sha256_pieces(pieces),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::bytes::ByteView;

    #[test]
    fn pieces_hash_like_their_concatenation() {
        let a = ByteView::from_vec(vec![1, 2, 3]);
        let split = sha256_pieces(&[Piece::Bytes(a), Piece::Zeros(5000)]);
        let mut whole = vec![1u8, 2, 3];
        whole.resize(5003, 0);
        let joined = sha256_pieces(&[Piece::Bytes(ByteView::from_vec(whole))]);
        assert_eq!(split, joined);
        assert_ne!(split, sha256_pieces(&[Piece::Zeros(5003)]));
    }
}
