//! Synthetic Megatron-Core GPT checkpoints, for tests and benchmarks: any
//! shape (tiny to Llama-70B), any TP/PP, data either deterministic pseudo-
//! random bytes or holes (a sparse file: a 140 GB model in a few MB of disk).
//! Written with nemo-tool's own writers, in the per-rank layout NeMo uses.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;

use crate::formats::tar_write::TarWriter;
use crate::formats::torch::tensor::{row_major_strides, StorageRef, TensorKind, TensorRef};
use crate::formats::torch::value::{Construct, Global, Object};
use crate::formats::torch::{Dtype, Value};
use crate::io::bytes::ByteView;
use crate::io::output::OutputFile;
use crate::io::piece::Piece;
use crate::model::checkpoint::Variant;
use crate::model::layout::{renumber_layer, Family, Rule};

/// The architecture of a synthetic model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Transformer layers.
    pub layers: u64,
    /// Hidden size.
    pub hidden: u64,
    /// FFN hidden size (per half when gated).
    pub ffn: u64,
    /// Attention heads.
    pub heads: u64,
    /// Query groups (`heads` for MHA).
    pub groups: u64,
    /// Head dim.
    pub kv_channels: u64,
    /// Tokenizer vocabulary (before padding).
    pub vocab: u64,
    /// `make_vocab_size_divisible_by`.
    pub divisible_by: u64,
    /// Gated (SwiGLU) MLP.
    pub gated: bool,
    /// Linear biases.
    pub bias: bool,
    /// RMSNorm (else LayerNorm, which has biases).
    pub rmsnorm: bool,
    /// Tied input/output embeddings.
    pub tied: bool,
    /// Element type of every weight.
    pub dtype: Dtype,
}

impl Spec {
    /// Llama-2/3-70B: 80 layers, hidden 8192, ffn 28672, 64 heads, 8 groups, vocab 128256, bf16.
    pub fn llama_70b() -> Spec {
        Spec {
            layers: 80,
            hidden: 8192,
            ffn: 28672,
            heads: 64,
            groups: 8,
            kv_channels: 128,
            vocab: 128256,
            divisible_by: 128,
            gated: true,
            bias: false,
            rmsnorm: true,
            tied: false,
            dtype: Dtype::BF16,
        }
    }

    /// A tiny GQA Llama for tests.
    pub fn tiny() -> Spec {
        Spec {
            layers: 4,
            hidden: 64,
            ffn: 96,
            heads: 8,
            groups: 4,
            kv_channels: 8,
            vocab: 100,
            divisible_by: 16,
            gated: true,
            bias: false,
            rmsnorm: true,
            tied: false,
            dtype: Dtype::F32,
        }
    }

    /// Padded vocabulary at tensor-parallel size `tp`.
    pub fn padded_vocab(&self, tp: u64) -> u64 {
        let m = self.divisible_by * tp;
        self.vocab.div_ceil(m) * m
    }

    /// `model_config.yaml` text for this model at `tp`/`pp`.
    pub fn config_yaml(&self, tp: u64, pp: u64) -> String {
        format!(
            "mcore_gpt: true\nname: megatron_gpt\nnum_layers: {}\nhidden_size: {}\nffn_hidden_size: {}\n\
num_attention_heads: {}\nnum_query_groups: {}\nkv_channels: {}\nnormalization: {}\nactivation: {}\n\
bias: {}\nshare_embeddings_and_output_weights: {}\nposition_embedding_type: rope\n\
make_vocab_size_divisible_by: {}\noverride_vocab_size: null\ntensor_model_parallel_size: {tp}\n\
pipeline_model_parallel_size: {pp}\nprecision: {}\ntransformer_engine: true\n\
tokenizer:\n  library: huggingface\n  type: synthetic/vocab-{}\n",
            self.layers,
            self.hidden,
            self.ffn,
            self.heads,
            self.groups,
            self.kv_channels,
            if self.rmsnorm { "rmsnorm" } else { "layernorm" },
            if self.gated { "fast-swiglu" } else { "gelu" },
            self.bias,
            self.tied,
            self.divisible_by,
            match self.dtype {
                Dtype::BF16 => "bf16",
                Dtype::F16 => "16",
                _ => "32",
            },
            self.vocab,
        )
    }

    /// The state dict of rank (`t`, `p`) at `tp`/`pp`: (key, local shape), or
    /// `None` shape for an `_extra_state` entry (stored as `None`).
    pub fn rank_keys(&self, tp: u64, pp: u64, p: u64) -> Vec<(String, Option<Vec<u64>>)> {
        let (h, d) = (self.hidden, self.kv_channels);
        let qkv = (self.heads + 2 * self.groups) * d / tp;
        let fc1 = if self.gated {
            2 * self.ffn / tp
        } else {
            self.ffn / tp
        };
        let mut keys: Vec<(String, Option<Vec<u64>>)> = Vec::new();
        let mut t = |k: &str, s: Option<Vec<u64>>| keys.push((format!("model.{k}"), s));
        if p == 0 {
            t(
                "embedding.word_embeddings.weight",
                Some(vec![self.padded_vocab(tp) / tp, h]),
            );
        }
        for l in 0..self.layers / pp {
            let pre = format!("decoder.layers.{l}.");
            let norm = |t: &mut dyn FnMut(&str, Option<Vec<u64>>), name: &str| {
                t(&format!("{pre}{name}_weight"), Some(vec![h]));
                if !self.rmsnorm {
                    t(&format!("{pre}{name}_bias"), Some(vec![h]));
                }
            };
            norm(&mut t, "self_attention.linear_qkv.layer_norm");
            t(
                &format!("{pre}self_attention.linear_qkv.weight"),
                Some(vec![qkv, h]),
            );
            if self.bias {
                t(
                    &format!("{pre}self_attention.linear_qkv.bias"),
                    Some(vec![qkv]),
                );
            }
            t(
                &format!("{pre}self_attention.linear_qkv._extra_state"),
                None,
            );
            t(
                &format!("{pre}self_attention.linear_proj.weight"),
                Some(vec![h, self.heads * d / tp]),
            );
            if self.bias {
                t(
                    &format!("{pre}self_attention.linear_proj.bias"),
                    Some(vec![h]),
                );
            }
            t(
                &format!("{pre}self_attention.linear_proj._extra_state"),
                None,
            );
            norm(&mut t, "mlp.linear_fc1.layer_norm");
            t(&format!("{pre}mlp.linear_fc1.weight"), Some(vec![fc1, h]));
            if self.bias {
                t(&format!("{pre}mlp.linear_fc1.bias"), Some(vec![fc1]));
            }
            t(&format!("{pre}mlp.linear_fc1._extra_state"), None);
            t(
                &format!("{pre}mlp.linear_fc2.weight"),
                Some(vec![h, self.ffn / tp]),
            );
            if self.bias {
                t(&format!("{pre}mlp.linear_fc2.bias"), Some(vec![h]));
            }
            t(&format!("{pre}mlp.linear_fc2._extra_state"), None);
        }
        if p + 1 == pp {
            t("decoder.final_layernorm.weight", Some(vec![h]));
            if !self.rmsnorm {
                t("decoder.final_layernorm.bias", Some(vec![h]));
            }
            if !self.tied || pp > 1 {
                t(
                    "output_layer.weight",
                    Some(vec![self.padded_vocab(tp) / tp, h]),
                );
            }
            t("output_layer._extra_state", None);
        }
        keys
    }
}

/// How tensor bytes are filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Zeros, written as holes: the file is sparse.
    Sparse,
    /// Deterministic pseudo-random bytes from this seed (finite values for float dtypes).
    Random(u64),
}

/// Deterministic bytes for one tensor: small finite floats / small ints.
fn random_bytes(dtype: Dtype, numel: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let n = numel as usize;
    let mut out = Vec::with_capacity(n * dtype.size());
    for _ in 0..n {
        let r = next();
        let v = ((r >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0;
        match dtype {
            Dtype::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
            Dtype::F64 => out.extend_from_slice(&v.to_le_bytes()),
            Dtype::F16 => out.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
            Dtype::BF16 => out.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
            _ => out.extend_from_slice(&r.to_le_bytes()[..dtype.size()]),
        }
    }
    out
}

fn tensor(dtype: Dtype, shape: &[u64], key: &str, fill: Fill) -> TensorRef {
    let numel: u64 = shape.iter().product();
    let nbytes = numel * dtype.size() as u64;
    let storage = match fill {
        Fill::Sparse => StorageRef::from_pieces(key, vec![Piece::Zeros(nbytes)]),
        Fill::Random(seed) => {
            let h = key.bytes().fold(seed ^ 0x9e37_79b9_7f4a_7c15, |a, b| {
                a.rotate_left(5) ^ u64::from(b)
            });
            StorageRef::from_view(key, ByteView::from_vec(random_bytes(dtype, numel, h)))
        }
    };
    TensorRef {
        dtype,
        shape: shape.to_vec(),
        stride: row_major_strides(shape),
        storage_offset: 0,
        storage,
        requires_grad: false,
        kind: TensorKind::Plain,
    }
}

/// Rank `t` of `tp`'s piece of a deterministic global (TP=1) tensor, cut by
/// the mcore partition rules, so that the same [`Spec`] and seed give the same
/// model at every TP/PP: replicated tensors are equal on every rank, and a
/// reshard of the TP=a file equals the TP=b file. The global data depends
/// only on the global key (global layer number); vocab rows past the true
/// vocabulary are zero (as after any NeMo reshard, nemo-format.md §3.4).
fn rank_tensor(
    spec: &Spec,
    rules: &Family,
    tp: u64,
    t: u64,
    global_key: &str,
    local: &[u64],
    seed: u64,
) -> TensorRef {
    let dtype = spec.dtype;
    let es = dtype.size();
    let rule = rules
        .lookup(global_key)
        .map(|m| {
            rules.resolve(
                m.rule,
                if spec.gated { "fast-swiglu" } else { "gelu" },
                spec.gated,
            )
        })
        .unwrap_or(Rule::Replicated);
    let global = crate::model::layout::global_shape(rule, local, tp, false);
    let numel = |s: &[u64]| s.iter().product::<u64>();
    let row: usize = (numel(global.get(1..).unwrap_or(&[])) as usize) * es;
    let h = global_key
        .bytes()
        .fold(seed ^ 0x9e37_79b9_7f4a_7c15, |a, b| {
            a.rotate_left(5) ^ u64::from(b)
        });
    let data = if rule == Rule::Vocab {
        let real = spec.vocab.min(global.first().copied().unwrap_or(0));
        let mut g = random_bytes(dtype, real * row as u64 / es as u64, h);
        g.resize(numel(&global) as usize * es, 0);
        g
    } else {
        random_bytes(dtype, numel(&global), h)
    };
    let rows = local.first().copied().unwrap_or(1) as usize;
    let bytes = match rule {
        Rule::Row if local.len() >= 2 => {
            let (gw, lw) = (
                global[global.len() - 1] as usize * es,
                local[local.len() - 1] as usize * es,
            );
            data.chunks(gw)
                .flat_map(|r| r[t as usize * lw..(t as usize + 1) * lw].to_vec())
                .collect()
        }
        Rule::GatedFc1 => {
            let half = global[0] as usize / 2;
            let n = rows / 2;
            let (g0, u0) = (t as usize * n, half + t as usize * n);
            let mut v = data[g0 * row..(g0 + n) * row].to_vec();
            v.extend_from_slice(&data[u0 * row..(u0 + n) * row]);
            v
        }
        Rule::Replicated | Rule::ExtraState => data,
        _ if local.is_empty() => data,
        _ => data[t as usize * rows * row..(t as usize + 1) * rows * row].to_vec(),
    };
    TensorRef {
        dtype,
        shape: local.to_vec(),
        stride: row_major_strides(local),
        storage_offset: 0,
        storage: StorageRef::from_view(global_key, ByteView::from_vec(bytes)),
        requires_grad: false,
        kind: TensorKind::Plain,
    }
}

/// A file writer that turns runs of zero bytes into holes (seeks), so sparse
/// models cost no disk. Sets the final length on `finish`.
struct SparseFile {
    file: File,
    pos: u64,
    len: u64,
}

impl Write for SparseFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Page-sized pieces, so zero runs inside mixed buffers become holes too.
        for part in buf.chunks(4096) {
            if part.iter().all(|b| *b == 0) {
                self.pos += part.len() as u64;
                self.file.seek(SeekFrom::Start(self.pos))?;
            } else {
                self.file.write_all(part)?;
                self.pos += part.len() as u64;
            }
        }
        self.len = self.len.max(self.pos);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl crate::io::sink::Sink for SparseFile {}

impl Seek for SparseFile {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = self.file.seek(to)?;
        Ok(self.pos)
    }
}

/// Writes a synthetic `.nemo` at `tp`/`pp` to `out` (replacing it).
pub fn write_nemo(spec: &Spec, tp: u64, pp: u64, fill: Fill, out: &Path) -> io::Result<()> {
    let mut of = OutputFile::create(out, true).map_err(io::Error::other)?;
    let sparse = SparseFile {
        file: of.file().try_clone()?,
        pos: 0,
        len: 0,
    };
    let mut tar = TarWriter::new(crate::io::sink::BlockWriter::new(sparse));
    let cfg = spec.config_yaml(tp, pp);
    tar.append_dir("").map_err(io::Error::other)?;
    tar.append_pieces("model_config.yaml", cfg.len() as u64, [cfg.as_bytes()])
        .map_err(io::Error::other)?;
    let variant = Variant::for_sizes(tp, pp);
    let rules = Family::load("mcore-gpt").map_err(io::Error::other)?;
    for p in 0..pp {
        for t in 0..tp {
            let member = variant.rank_member(t, p);
            if let Some((dir, _)) = member.split_once('/') {
                tar.append_dir(dir).map_err(io::Error::other)?;
            }
            let mut od = Object::new(
                Global::new("collections", "OrderedDict"),
                Construct::Reduce,
                vec![],
            );
            for (key, shape) in spec.rank_keys(tp, pp, p) {
                let v = match shape {
                    Some(s) => Value::Tensor(Box::new(match fill {
                        Fill::Sparse => tensor(spec.dtype, &s, &key, fill),
                        Fill::Random(seed) => {
                            let global_key = match rules.lookup(&key).and_then(|m| m.layer) {
                                Some(l) => renumber_layer(&key, p * (spec.layers / pp) + l)
                                    .unwrap_or_else(|| key.clone()),
                                // tied: the last stage's output layer is a copy of the embedding
                                None if spec.tied && key == "model.output_layer.weight" => {
                                    "model.embedding.word_embeddings.weight".to_string()
                                }
                                None => key.clone(),
                            };
                            rank_tensor(spec, &rules, tp, t, &global_key, &s, seed)
                        }
                    })),
                    None => Value::None,
                };
                od.items.push((Value::Str(key), v));
            }
            let root = Value::Object(Box::new(od));
            tar.append_streamed(&member, |w| {
                crate::formats::torch::file::save(w, "model_weights", &root)
                    .map(|_| ())
                    .map_err(io::Error::other)
            })
            .map_err(io::Error::other)?;
        }
    }
    let mut buf = tar.finish().map_err(io::Error::other)?;
    buf.flush()?;
    let sparse = buf.into_inner()?;
    sparse.file.set_len(sparse.len)?;
    drop(sparse);
    of.commit().map_err(io::Error::other)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_vocab_matches_megatron() {
        let s = Spec::llama_70b();
        assert_eq!(s.padded_vocab(1), 128256);
        assert_eq!(s.padded_vocab(8), 129024);
    }

    #[test]
    fn llama_70b_tp8_has_about_a_thousand_tensors() {
        let s = Spec::llama_70b();
        let n: usize = (0..1).map(|p| s.rank_keys(8, 1, p).len()).sum();
        assert!((800..1000).contains(&n), "{n}");
    }
}
