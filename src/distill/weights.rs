//! Reading one parameter's launch-TP shard from any checkpoint layout, straight from the
//! mapped checkpoint bytes into a tch tensor.
//!
//! Every parameter is addressed by its canonical (TP=1) name and partition rule. The source
//! is seen as the canonical tensor cut into segments along the split dim (one per checkpoint
//! TP rank, or two per rank for the gated fc1's `[gate_r; up_r]`; a distributed checkpoint is
//! already canonical). The launch rank's ranges are intersected with those segments, and
//! each intersection is a strided view over the mapped storage (per-rank files) or a
//! `read_box` of the DCP chunks: its bytes are copied once, into the right slice of the
//! destination tensor. Nothing larger than one tensor's slice is ever staged on the host, and
//! usually nothing is (contiguous views are single mapped pieces).

use tch::{Kind, Tensor};

use crate::checkpoint::{Checkpoint, RankFile, Weights};
use crate::dist::DistCheckpoint;
use crate::layout::Rule;
use crate::torch::tensor::{Piece, TensorRef};
use crate::torch::Dtype;

use super::ffi;

/// Errors reading weights.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// None of the candidate keys is in the checkpoint.
    #[error("checkpoint {path}: tensor {key}: not found (tried {tried})")]
    Missing {
        /// Checkpoint path.
        path: String,
        /// Canonical name.
        key: String,
        /// Keys tried.
        tried: String,
    },
    /// A tensor exists but does not fit the architecture.
    #[error("checkpoint {path}: tensor {key}: {why}")]
    Shape {
        /// Checkpoint path.
        path: String,
        /// Key as stored.
        key: String,
        /// What does not fit.
        why: String,
    },
    /// A layout the engine cannot read.
    #[error("checkpoint {path}: {why}")]
    Unsupported {
        /// Checkpoint path.
        path: String,
        /// Why.
        why: String,
    },
    /// Reading bytes failed.
    #[error("checkpoint {path}: tensor {key}: {why}")]
    Read {
        /// Checkpoint path.
        path: String,
        /// Key as stored.
        key: String,
        /// The underlying error.
        why: String,
    },
}

/// Where a parameter lives and how it is split.
#[derive(Debug, Clone)]
pub struct Param<'a> {
    /// Canonical names without the `model.` prefix, first match wins (e.g. the local-spec and
    /// TE names of a norm). Layer keys carry the layer index (`decoder.layers.3.…`).
    pub names: Vec<String>,
    /// Decoder layer, for distributed checkpoints (stacked layers).
    pub layer: Option<usize>,
    /// Partition rule.
    pub rule: Rule,
    /// Local (launch-rank) shape to produce.
    pub local_shape: &'a [i64],
    /// For the vocab rule: the launch padded vocab (may exceed the stored rows: zero-padded).
    pub padded_rows: Option<i64>,
}

/// A checkpoint opened as a weight source.
#[derive(Debug)]
pub struct Source<'a> {
    ckpt: &'a Checkpoint,
    path: String,
    prefix: String,
    ranks: Vec<&'a RankFile>,
}

fn kind_of(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::F32 => Kind::Float,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

/// The stacked DCP key of a per-layer name: `decoder.layers.3.x` -> `decoder.layers.x`.
fn stacked(name: &str) -> String {
    let Some(rest) = name.strip_prefix("decoder.layers.") else {
        return name.to_string();
    };
    match rest.split_once('.') {
        Some((idx, tail)) if idx.bytes().all(|b| b.is_ascii_digit()) => {
            format!("decoder.layers.{tail}")
        }
        _ => name.to_string(),
    }
}

/// One stored segment of the canonical tensor along the split dim.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// Which shard (checkpoint TP rank; 0 for a DCP).
    shard: usize,
    /// Start in the canonical tensor.
    canon: i64,
    /// Start in the shard.
    src: i64,
    len: i64,
}

impl<'a> Source<'a> {
    /// Prepares `ckpt` for reading.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for pipeline-parallel per-rank checkpoints or a checkpoint
    /// without a word embedding under `model.` / `model.module.`.
    pub fn new(ckpt: &'a Checkpoint) -> Result<Source<'a>, Error> {
        let path = ckpt.path().display().to_string();
        let mut ranks: Vec<&RankFile> = ckpt.rank_files().iter().collect();
        if ranks.iter().any(|r| r.pp != 0) {
            return Err(Error::Unsupported {
                path,
                why: "pipeline-parallel checkpoints are not supported yet (reshard to PP=1 first)"
                    .to_string(),
            });
        }
        ranks.sort_by_key(|r| r.tp);
        let mut s = Source {
            ckpt,
            path,
            prefix: String::new(),
            ranks,
        };
        for p in ["model.", "model.module.", "module.", ""] {
            s.prefix = p.to_string();
            if s.exists("embedding.word_embeddings.weight") {
                return Ok(s);
            }
        }
        Err(Error::Unsupported {
            path: s.path,
            why: "no embedding.word_embeddings.weight under model., model.module., module. or the root".to_string(),
        })
    }

    fn dcp(&self) -> Option<&'a DistCheckpoint> {
        match &self.ckpt.weights {
            Weights::Dist(d) => Some(d),
            Weights::PerRank(_) => None,
        }
    }

    /// True when the canonical name is stored.
    pub fn exists(&self, name: &str) -> bool {
        match self.dcp() {
            Some(d) => d
                .tensor(&format!("{}{}", self.prefix, stacked(name)))
                .is_some(),
            None => self
                .ranks
                .first()
                .and_then(|r| r.file.root.get(&format!("{}{name}", self.prefix)))
                .and_then(|v| v.as_tensor())
                .is_some(),
        }
    }

    /// Rows of the stored (canonical) word embedding: the checkpoint's padded vocabulary.
    ///
    /// # Errors
    /// [`Error::Missing`] when there is no word embedding.
    pub fn vocab_rows(&self) -> Result<u64, Error> {
        let name = "embedding.word_embeddings.weight";
        let missing = || Error::Missing {
            path: self.path.clone(),
            key: name.to_string(),
            tried: format!("{}{name}", self.prefix),
        };
        match self.dcp() {
            Some(d) => d
                .tensor(&format!("{}{name}", self.prefix))
                .and_then(|t| t.shape.first().copied())
                .ok_or_else(missing),
            None => {
                let key = format!("{}{name}", self.prefix);
                let mut rows = 0u64;
                for r in &self.ranks {
                    let t = r
                        .file
                        .root
                        .get(&key)
                        .and_then(|v| v.as_tensor())
                        .ok_or_else(missing)?;
                    rows = rows.saturating_add(t.shape.first().copied().unwrap_or(0));
                }
                Ok(rows)
            }
        }
    }

    /// The padded vocabulary at launch TP `tp`: the stored rows rounded up to a multiple of
    /// `divisible_by · tp` (Megatron's rule; rows the checkpoint lacks are zero).
    ///
    /// # Errors
    /// As [`Source::vocab_rows`]; [`Error::Unsupported`] on overflow or a zero multiple.
    pub fn padded_vocab(&self, divisible_by: u64, tp: u64) -> Result<u64, Error> {
        let rows = self.vocab_rows()?;
        let m = divisible_by
            .checked_mul(tp)
            .filter(|m| *m > 0)
            .ok_or_else(|| Error::Unsupported {
                path: self.path.clone(),
                why: format!(
                    "make_vocab_size_divisible_by {divisible_by} x TP {tp} is not a positive size"
                ),
            })?;
        rows.div_ceil(m)
            .checked_mul(m)
            .ok_or_else(|| Error::Unsupported {
                path: self.path.clone(),
                why: "padded vocab overflows".to_string(),
            })
    }

    /// Reads the launch-rank shard of `p` for launch rank `rank` of `tp` into a new tensor of
    /// `kind` (on the CPU; move it afterwards).
    ///
    /// # Errors
    /// [`Error::Missing`], [`Error::Shape`] (stored shapes that disagree with the
    /// architecture), [`Error::Read`].
    pub fn read(&self, p: &Param, rank: i64, tp: i64, kind: Kind) -> Result<Tensor, Error> {
        let name = p
            .names
            .iter()
            .find(|n| self.exists(n))
            .ok_or_else(|| Error::Missing {
                path: self.path.clone(),
                key: p.names.first().cloned().unwrap_or_default(),
                tried: p
                    .names
                    .iter()
                    .map(|n| format!("{}{n}", self.prefix))
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let nd = p.local_shape.len();
        let dim = p.rule.split_dim(nd);
        let mut dst = Tensor::zeros(p.local_shape, (kind, tch::Device::Cpu));
        match self.dcp() {
            Some(d) => self.read_dcp(d, name, p, dim, rank, tp, &mut dst)?,
            None => self.read_ranks(name, p, dim, rank, tp, &mut dst)?,
        }
        Ok(dst)
    }

    fn shape_err(&self, key: &str, why: String) -> Error {
        Error::Shape {
            path: self.path.clone(),
            key: key.to_string(),
            why,
        }
    }

    /// The launch rank's ranges of the canonical split dim: `(canonical start, local start,
    /// len)`.
    fn targets(p: &Param, dim_len_local: i64, rank: i64, tp: i64) -> Vec<(i64, i64, i64)> {
        match p.rule {
            Rule::GatedFc1 => {
                // local [gate_r; up_r], canonical [gate; up] with F = tp * half
                let half = dim_len_local / 2;
                let f = half * tp;
                vec![(rank * half, 0, half), (f + rank * half, half, half)]
            }
            Rule::Replicated | Rule::ExtraState => vec![(0, 0, dim_len_local)],
            _ => vec![(rank * dim_len_local, 0, dim_len_local)],
        }
    }

    /// Canonical segments of a per-rank checkpoint with `k` ranks whose shards are `lens`
    /// long along the split dim.
    fn segments(rule: Rule, lens: &[i64]) -> Vec<Segment> {
        let mut out = Vec::new();
        if rule == Rule::GatedFc1 {
            let f: i64 = lens.iter().map(|l| l / 2).sum();
            let mut at = 0;
            for (j, l) in lens.iter().enumerate() {
                let h = l / 2;
                out.push(Segment {
                    shard: j,
                    canon: at,
                    src: 0,
                    len: h,
                });
                out.push(Segment {
                    shard: j,
                    canon: f + at,
                    src: h,
                    len: h,
                });
                at += h;
            }
        } else {
            let mut at = 0;
            for (j, &l) in lens.iter().enumerate() {
                out.push(Segment {
                    shard: j,
                    canon: at,
                    src: 0,
                    len: l,
                });
                at += l;
            }
        }
        out
    }

    fn read_ranks(
        &self,
        name: &str,
        p: &Param,
        dim: Option<usize>,
        rank: i64,
        tp: i64,
        dst: &mut Tensor,
    ) -> Result<(), Error> {
        let key = format!("{}{name}", self.prefix);
        let mut shards: Vec<&TensorRef> = Vec::new();
        for r in &self.ranks {
            let t = r
                .file
                .root
                .get(&key)
                .and_then(|v| v.as_tensor())
                .ok_or_else(|| self.shape_err(&key, format!("missing from {}", r.member)))?;
            shards.push(t);
        }
        let Some(d) = dim else {
            // replicated: rank 0's copy
            let t = shards
                .first()
                .ok_or_else(|| self.shape_err(&key, "no rank files".to_string()))?;
            return self.copy_view(&key, t, 0, 0, 0, dst);
        };
        let local_len = *p.local_shape.get(d).unwrap_or(&0);
        let mut lens = Vec::new();
        for t in &shards {
            if t.shape.len() != p.local_shape.len() {
                return Err(self.shape_err(
                    &key,
                    format!(
                        "stored rank {} vs expected {}",
                        t.shape.len(),
                        p.local_shape.len()
                    ),
                ));
            }
            for (i, (&s, &e)) in t.shape.iter().zip(p.local_shape).enumerate() {
                if i != d && s as i64 != e {
                    return Err(self.shape_err(
                        &key,
                        format!(
                            "stored shape {:?} does not fit local shape {:?}",
                            t.shape, p.local_shape
                        ),
                    ));
                }
            }
            lens.push(t.shape[d] as i64);
        }
        let segs = Self::segments(p.rule, &lens);
        let canon_len: i64 = lens.iter().sum();
        if p.padded_rows.is_none() && p.rule != Rule::GatedFc1 && canon_len != local_len * tp {
            return Err(self.shape_err(
                &key,
                format!("global length {canon_len} along dim {d} is not {local_len} x TP {tp}"),
            ));
        }
        for (cstart, lstart, len) in Self::targets(p, local_len, rank, tp) {
            for s in &segs {
                let lo = cstart.max(s.canon);
                let hi = (cstart + len).min(s.canon + s.len);
                if lo >= hi {
                    continue;
                }
                let t = shards[s.shard];
                let mut view = dst.narrow(d as i64, lstart + (lo - cstart), hi - lo);
                self.copy_view(&key, t, d, s.src + (lo - s.canon), hi - lo, &mut view)?;
            }
        }
        Ok(())
    }

    /// Copies `t` narrowed to `[start, start+len)` along `d` (the whole tensor when len is 0
    /// for a replicated tensor) into `dst`.
    fn copy_view(
        &self,
        key: &str,
        t: &TensorRef,
        d: usize,
        start: i64,
        len: i64,
        dst: &mut Tensor,
    ) -> Result<(), Error> {
        let mut v = t.clone();
        if len > 0 {
            let (start, len) = (start as u64, len as u64);
            let (Some(stride), Some(size)) = (v.stride.get(d).copied(), v.shape.get_mut(d)) else {
                return Err(self.shape_err(key, format!("no dim {d}")));
            };
            if start + len > *size {
                return Err(self.shape_err(
                    key,
                    format!("range {start}+{len} outside dim {d} of {size}"),
                ));
            }
            *size = len;
            v.storage_offset += start * stride;
        }
        if v.numel() != dst.numel() as u64 {
            return Err(self.shape_err(
                key,
                format!("stored shape {:?} does not fit {:?}", v.shape, dst.size()),
            ));
        }
        let kind = kind_of(v.dtype).ok_or_else(|| {
            self.shape_err(key, format!("dtype {:?} is not a float type", v.dtype))
        })?;
        let pieces = v.pieces().map_err(|e| Error::Read {
            path: self.path.clone(),
            key: key.to_string(),
            why: e.to_string(),
        })?;
        self.copy_pieces(key, &pieces, kind, dst)
    }

    fn copy_pieces(
        &self,
        key: &str,
        pieces: &[Piece],
        kind: Kind,
        dst: &mut Tensor,
    ) -> Result<(), Error> {
        let read_err = |why: String| Error::Read {
            path: self.path.clone(),
            key: key.to_string(),
            why,
        };
        // One mapped piece: copy straight from the map. Several (a strided view with long
        // runs, or a DCP box spanning chunks): gather them into one buffer of this slice.
        match pieces {
            [Piece::Bytes(b)] => ffi::copy_bytes_into(dst, b.as_slice(), kind).map_err(read_err),
            _ => ffi::copy_bytes_into(dst, &crate::torch::tensor::concat(pieces), kind)
                .map_err(read_err),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read_dcp(
        &self,
        dcp: &DistCheckpoint,
        name: &str,
        p: &Param,
        dim: Option<usize>,
        rank: i64,
        tp: i64,
        dst: &mut Tensor,
    ) -> Result<(), Error> {
        let key = format!("{}{}", self.prefix, stacked(name));
        let t = dcp
            .tensor(&key)
            .ok_or_else(|| self.shape_err(&key, "missing".to_string()))?;
        let lead = usize::from(p.layer.is_some());
        if t.shape.len() != p.local_shape.len() + lead {
            return Err(self.shape_err(
                &key,
                format!("stored shape {:?} vs local {:?}", t.shape, p.local_shape),
            ));
        }
        let global = &t.shape[lead..];
        let kind = kind_of(t.dtype).ok_or_else(|| {
            self.shape_err(&key, format!("dtype {:?} is not a float type", t.dtype))
        })?;
        let mut offsets = vec![0u64; t.shape.len()];
        let mut sizes = t.shape.clone();
        if let Some(l) = p.layer {
            offsets[0] = l as u64;
            sizes[0] = 1;
        }
        let read = |offsets: &[u64], sizes: &[u64], dst: &mut Tensor| -> Result<(), Error> {
            let pieces = dcp
                .read_box(self.ckpt.archive(), t, offsets, sizes)
                .map_err(|e| Error::Read {
                    path: self.path.clone(),
                    key: key.clone(),
                    why: e.to_string(),
                })?;
            self.copy_pieces(&key, &pieces, kind, dst)
        };
        let Some(d) = dim else {
            return read(&offsets, &sizes, dst);
        };
        let canon_len = global[d] as i64;
        let local_len = *p.local_shape.get(d).unwrap_or(&0);
        for (cstart, lstart, len) in Self::targets(p, local_len, rank, tp) {
            let hi = (cstart + len).min(canon_len);
            if cstart >= hi {
                continue; // vocab rows beyond the stored padding stay zero
            }
            offsets[d + lead] = cstart as u64;
            sizes[d + lead] = (hi - cstart) as u64;
            let mut view = dst.narrow(d as i64, lstart, hi - cstart);
            read(&offsets, &sizes, &mut view)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(rel: &str) -> Checkpoint {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/mcore/llama/nemo")
            .join(rel);
        Checkpoint::open(&p).unwrap_or_else(|e| panic!("{e}"))
    }

    fn param<'a>(name: &str, rule: Rule, shape: &'a [i64]) -> Param<'a> {
        Param {
            names: vec![name.to_string()],
            layer: Some(0),
            rule,
            local_shape: shape,
            padded_rows: None,
        }
    }

    #[test]
    fn tp2_shards_reassemble_from_tp1_tp2_and_dcp() {
        // launch TP2 rank 1 of the gated fc1 [48 gate; 48 up] from three layouts: identical
        let shape = [96i64, 64];
        let p = param(
            "decoder.layers.0.mlp.linear_fc1.weight",
            Rule::GatedFc1,
            &shape,
        );
        let read = |rel: &str| {
            let ck = open(rel);
            let src = Source::new(&ck).unwrap_or_else(|e| panic!("{e}"));
            src.read(&p, 1, 2, Kind::Float)
                .unwrap_or_else(|e| panic!("{rel}: {e}"))
        };
        let a = read("tiny_llama_tp1.nemo");
        assert!(a.equal(&read("tiny_llama_tp2.nemo")));
        assert!(a.equal(&read("tiny_llama_dist_tp1.nemo")));
        // and equals the canonical rows [48..96) and [144..192)
        let full = {
            let ck = open("tiny_llama_tp1.nemo");
            let src = Source::new(&ck).unwrap_or_else(|e| panic!("{e}"));
            let fs = [192i64, 64];
            src.read(
                &param(
                    "decoder.layers.0.mlp.linear_fc1.weight",
                    Rule::GatedFc1,
                    &fs,
                ),
                0,
                1,
                Kind::Float,
            )
            .unwrap_or_else(|e| panic!("{e}"))
        };
        assert!(a.equal(&Tensor::cat(
            &[full.narrow(0, 48, 48), full.narrow(0, 144, 48)],
            0
        )));
        let ck = open("tiny_llama_tp2.nemo");
        assert_eq!(
            Source::new(&ck).and_then(|s| s.padded_vocab(32, 2)).ok(),
            Some(128)
        );
    }

    #[test]
    fn missing_tensor_names_what_was_tried() {
        let ck = open("tiny_llama_tp1.nemo");
        let src = Source::new(&ck).unwrap_or_else(|e| panic!("{e}"));
        let shape = [64i64];
        let e = src.read(
            &param("decoder.layers.0.nope.weight", Rule::Replicated, &shape),
            0,
            1,
            Kind::Float,
        );
        let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("model.decoder.layers.0.nope.weight"), "{msg}");
    }

    #[test]
    fn shape_mismatch_is_refused() {
        let ck = open("tiny_llama_tp2.nemo");
        let src = Source::new(&ck).unwrap_or_else(|e| panic!("{e}"));
        // hidden 64 stored, 32 asked
        let shape = [48i64, 32];
        let e = src.read(
            &param(
                "decoder.layers.0.self_attention.linear_qkv.weight",
                Rule::Qkv,
                &shape,
            ),
            0,
            2,
            Kind::Float,
        );
        assert!(matches!(e, Err(Error::Shape { .. })), "{e:?}");
    }

    #[test]
    fn stacked_names() {
        assert_eq!(
            stacked("decoder.layers.12.mlp.linear_fc1.weight"),
            "decoder.layers.mlp.linear_fc1.weight"
        );
        assert_eq!(
            stacked("decoder.final_layernorm.weight"),
            "decoder.final_layernorm.weight"
        );
    }

    #[test]
    fn gated_segments_interleave_ranks() {
        // TP2 ranks each [gate_r (2); up_r (2)] -> canonical [g0 g1 | u0 u1]
        let s = Source::segments(Rule::GatedFc1, &[4, 4]);
        let v: Vec<_> = s.iter().map(|s| (s.shard, s.canon, s.src, s.len)).collect();
        assert_eq!(
            v,
            vec![(0, 0, 0, 2), (0, 4, 2, 2), (1, 2, 0, 2), (1, 6, 2, 2)]
        );
    }

    #[test]
    fn gated_targets_take_both_halves() {
        let shape = [4i64, 3];
        let p = Param {
            names: vec![],
            layer: None,
            rule: Rule::GatedFc1,
            local_shape: &shape,
            padded_rows: None,
        };
        // launch TP2 rank 1, local rows 4 = [gate 2; up 2] of F = 4
        assert_eq!(Source::targets(&p, 4, 1, 2), vec![(2, 0, 2), (6, 2, 2)]);
    }
}
