//! Reading one parameter's launch-TP shard from any checkpoint layout, straight from the
//! mapped checkpoint bytes into a tch tensor.
//!
//! The checkpoint is seen through [`crate::model::canonical::Canonical`], the one TP=1 global view
//! (per-rank files at any TP/PP, distributed checkpoints): a parameter is addressed by its
//! canonical name, [`crate::model::canonical::rank_slices`] gives the launch rank's slices of it
//! under its partition rule (vocab zero padding included), and their bytes are copied once,
//! into the destination tensor. Nothing larger than one tensor's slice is ever staged on the
//! host, and usually nothing is (contiguous slices are single mapped pieces).

use tch::{Kind, Tensor};

use crate::formats::torch::Dtype;
use crate::io::piece::Piece;
use crate::model::canonical::{self, Canonical};
use crate::model::checkpoint::Checkpoint;
use crate::model::layout::Rule;

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
    /// Names without the `model.` prefix, first match wins (e.g. the local-spec and TE names
    /// of a norm). Layer keys carry the global layer index (`decoder.layers.3.…`).
    pub names: Vec<String>,
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
    canon: Canonical<'a>,
    path: String,
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

const EMBEDDING: &str = "embedding.word_embeddings.weight";

impl<'a> Source<'a> {
    /// Prepares `ckpt` for reading (any TP/PP, per-rank or distributed).
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the canonical view cannot be built (inconsistent shards)
    /// or the checkpoint has no word embedding.
    pub fn new(ckpt: &'a Checkpoint) -> Result<Source<'a>, Error> {
        let path = ckpt.path().display().to_string();
        let canon = Canonical::new(ckpt).map_err(|e| Error::Unsupported {
            path: path.clone(),
            why: e.to_string(),
        })?;
        let s = Source { canon, path };
        if !s.exists(EMBEDDING) {
            return Err(Error::Unsupported {
                path: s.path,
                why: format!("no {EMBEDDING} under model., model.module., module. or the root"),
            });
        }
        Ok(s)
    }

    /// True when the name (prefix-less, per-rank naming) is stored as a tensor.
    pub fn exists(&self, name: &str) -> bool {
        self.canon.tensor(name).is_some()
    }

    /// Rows of the stored (canonical) word embedding: the checkpoint's padded vocabulary.
    ///
    /// # Errors
    /// [`Error::Missing`] when there is no word embedding.
    pub fn vocab_rows(&self) -> Result<u64, Error> {
        self.canon
            .tensor(EMBEDDING)
            .and_then(|(_, t)| t.shape.first().copied())
            .ok_or_else(|| Error::Missing {
                path: self.path.clone(),
                key: EMBEDDING.to_string(),
                tried: format!("{}{EMBEDDING}", self.canon.prefix),
            })
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
        let (name, (entry, t)) = p
            .names
            .iter()
            .find_map(|n| self.canon.tensor(n).map(|x| (n, x)))
            .ok_or_else(|| Error::Missing {
                path: self.path.clone(),
                key: p.names.first().cloned().unwrap_or_default(),
                tried: p
                    .names
                    .iter()
                    .map(|n| format!("{}{n}", self.canon.prefix))
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let key = format!("{}{name}", self.canon.prefix);
        let shape_err = |why: String| Error::Shape {
            path: self.path.clone(),
            key: key.clone(),
            why,
        };
        let (Ok(rank), Ok(tp)) = (u64::try_from(rank), u64::try_from(tp)) else {
            return Err(shape_err(format!("launch rank {rank} of TP {tp}")));
        };
        let src_kind = kind_of(t.dtype)
            .ok_or_else(|| shape_err(format!("dtype {:?} is not a float type", t.dtype)))?;
        let padded = p.padded_rows.and_then(|r| u64::try_from(r).ok());
        let (local, segments) =
            canonical::rank_slices(&key, &t.shape, t.dtype, p.rule, rank, tp, padded)
                .map_err(|e| shape_err(e.to_string()))?;
        if local.len() != p.local_shape.len()
            || local
                .iter()
                .zip(p.local_shape)
                .any(|(&a, &b)| i64::try_from(a).ok() != Some(b))
        {
            return Err(shape_err(format!(
                "stored shape {:?} gives a TP {tp} shard of {local:?}, expected {:?}",
                t.shape, p.local_shape
            )));
        }
        let pieces = self
            .canon
            .read_segments(&entry.name, t, &segments)
            .map_err(|e| Error::Read {
                path: self.path.clone(),
                key: key.clone(),
                why: e.to_string(),
            })?;
        let mut dst = Tensor::empty(p.local_shape, (kind, tch::Device::Cpu));
        // One mapped piece: copy straight from the map. Several (a row-parallel slice, a
        // stitch of shards, a DCP box spanning chunks, zero padding): gather them into one
        // buffer of this slice.
        let copied = match &pieces[..] {
            [Piece::Bytes(b)] => ffi::copy_bytes_into(&mut dst, b.as_slice(), src_kind),
            _ => ffi::copy_bytes_into(&mut dst, &crate::io::piece::concat(&pieces), src_kind),
        };
        copied.map_err(|why| Error::Read {
            path: self.path.clone(),
            key,
            why,
        })?;
        Ok(dst)
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

    /// `tiny_llama_tp1.nemo` resharded to `tp` x `pp` in `dir` (reshard is checked
    /// byte-for-byte against megatron-core elsewhere).
    fn resharded(dir: &std::path::Path, tp: u64, pp: u64) -> Checkpoint {
        let src = open("tiny_llama_tp1.nemo");
        let canon = Canonical::new(&src).unwrap_or_else(|e| panic!("{e}"));
        let plan = crate::model::plan::plan_reshard(
            &canon,
            &crate::model::plan::ReshardOptions {
                tp,
                pp,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let out = dir.join(format!("tp{tp}_pp{pp}.nemo"));
        crate::ops::reshard::write(
            &canon,
            &plan,
            &out,
            crate::ops::reshard::WriteOptions {
                force: true,
                progress: None,
                no_sync: true,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Checkpoint::open(&out).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn pipeline_parallel_sources_read_like_tp1() {
        // every parameter of the tiny Llama (2 layers, hidden 64, ffn 96, 8 heads, 2 groups),
        // read at launch TP 1 and TP 2, is the same from TP1, PP2, TP2xPP2 and the DCP
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let cks = [
            open("tiny_llama_tp1.nemo"),
            resharded(tmp.path(), 1, 2),
            resharded(tmp.path(), 2, 2),
            open("tiny_llama_dist_tp1.nemo"),
        ];
        assert_eq!(cks[2].rank_files().len(), 4);
        let srcs: Vec<Source> = cks
            .iter()
            .map(|c| Source::new(c).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        let mut params: Vec<(String, Rule, Vec<i64>)> = vec![
            (
                "embedding.word_embeddings.weight".into(),
                Rule::Vocab,
                vec![128, 64],
            ),
            ("output_layer.weight".into(), Rule::Vocab, vec![128, 64]),
            (
                "decoder.final_layernorm.weight".into(),
                Rule::Replicated,
                vec![64],
            ),
        ];
        for l in 0..2 {
            let p = |x: &str| format!("decoder.layers.{l}.{x}");
            params.extend([
                (p("input_layernorm.weight"), Rule::Replicated, vec![64]),
                (
                    p("self_attention.linear_qkv.layer_norm_weight"),
                    Rule::Replicated,
                    vec![64],
                ),
                (
                    p("self_attention.linear_qkv.weight"),
                    Rule::Qkv,
                    vec![96, 64],
                ),
                (
                    p("self_attention.linear_proj.weight"),
                    Rule::Row,
                    vec![64, 64],
                ),
                (p("pre_mlp_layernorm.weight"), Rule::Replicated, vec![64]),
                (p("mlp.linear_fc1.weight"), Rule::GatedFc1, vec![192, 64]),
                (p("mlp.linear_fc2.weight"), Rule::Row, vec![64, 96]),
            ]);
        }
        for (name, rule, global) in &params {
            for tp in [1i64, 2] {
                let mut local = global.clone();
                if let Some(d) = rule.split_dim(local.len()) {
                    local[d] /= tp;
                }
                let p = Param {
                    names: vec![name.clone()],
                    rule: *rule,
                    local_shape: &local,
                    // launch padding past the stored 128 rows reads as zeros
                    padded_rows: (*rule == Rule::Vocab).then_some(global[0]),
                };
                for rank in 0..tp {
                    let want = srcs[0]
                        .read(&p, rank, tp, Kind::Float)
                        .unwrap_or_else(|e| panic!("{e}"));
                    for (i, s) in srcs.iter().enumerate().skip(1) {
                        let got = s
                            .read(&p, rank, tp, Kind::Float)
                            .unwrap_or_else(|e| panic!("source {i}: {e}"));
                        assert!(got.equal(&want), "{name} source {i} TP {tp} rank {rank}");
                    }
                }
            }
        }
    }

    #[test]
    fn launch_vocab_padding_is_zero() {
        let ck = open("tiny_llama_tp2.nemo");
        let src = Source::new(&ck).unwrap_or_else(|e| panic!("{e}"));
        let shape = [80i64, 64];
        let p = Param {
            names: vec!["embedding.word_embeddings.weight".into()],
            rule: Rule::Vocab,
            local_shape: &shape,
            padded_rows: Some(160),
        };
        // launch TP2 rank 1 holds rows 80..160: 48 stored, 32 of padding
        let t = src
            .read(&p, 1, 2, Kind::Float)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            t.narrow(0, 48, 32).abs().sum(Kind::Float).double_value(&[]),
            0.0
        );
        assert!(t.narrow(0, 0, 48).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
