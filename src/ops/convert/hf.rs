//! Reading a Hugging Face Llama-shaped folder (Llama, Mistral, Qwen2, Qwen3: `config.json`,
//! safetensors shards, tokenizer files) as whole megatron-core tensors at TP=1
//! (nemo-format.md §4.1: fused QKV per query group, its bias likewise, fc1 = `[gate; up]`,
//! norms — Qwen3's per-head `q_norm`/`k_norm` as `q_layernorm`/`k_layernorm` — and embeddings
//! as they are), and the inverse: the HF tensors of a named model.

use std::collections::HashMap;
use std::path::Path;

use crate::formats::safetensors::{self, WriteTensor};
use crate::formats::torch::value::Value;
use crate::io::bytes::ByteView;
use crate::model::checkpoint::{GlobalTensor, GlobalValue};

use super::hf_config::{Family, LlamaArch};
use super::named::NamedModel;
use super::tensor::{self, cat_rows, interleave_qkv, resize_rows, split_qkv, Flat, Heads};

/// Files besides weights and `config.json` that travel with a model: kept
/// byte for byte as `.nemo` artifacts and restored on the way back.
pub const SIDE_FILES: &[&str] = &[
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
];

/// Errors reading or mapping an HF model; each names the file or tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The weights did not parse.
    #[error(transparent)]
    Safetensors(#[from] safetensors::Error),
    /// `config.json` did not map.
    #[error(transparent)]
    Config(#[from] super::hf_config::Error),
    /// Tensor arithmetic.
    #[error(transparent)]
    Tensor(#[from] tensor::Error),
    /// A tensor the mapping needs is absent.
    #[error("{dir}: tensor `{name}` is missing")]
    Missing {
        /// The folder.
        dir: String,
        /// The tensor.
        name: String,
    },
    /// A tensor the mapping does not know (it would be lost).
    #[error("{dir}: unexpected tensor `{name}` (not part of this model family's mapping)")]
    Unexpected {
        /// The folder.
        dir: String,
        /// The tensor.
        name: String,
    },
    /// A tensor appears in two files.
    #[error("{dir}: tensor `{name}` is stored twice")]
    Duplicate {
        /// The folder.
        dir: String,
        /// The tensor.
        name: String,
    },
}

/// An HF model folder, read.
#[derive(Debug)]
pub struct HfModel {
    /// The architecture from `config.json`.
    pub arch: LlamaArch,
    /// The model at TP=1 under megatron-core keys (vocab tensors unpadded),
    /// in state-dict order: what [`crate::model::checkpoint::Checkpoint::from_global`] takes.
    pub tensors: Vec<GlobalTensor>,
    /// Side files present (name, bytes), in [`SIDE_FILES`] order.
    pub side_files: Vec<(String, ByteView)>,
    /// `_name_or_path`, if `config.json` has one.
    pub name_or_path: Option<String>,
    /// Non-fatal findings.
    pub warnings: Vec<String>,
}

/// The Hugging Face module of a layer's experts and router: Mixtral's `block_sparse_moe`,
/// Qwen3-MoE's `mlp`.
fn moe_module(family: Family, layer: u64) -> String {
    match family {
        Family::Mixtral => format!("model.layers.{layer}.block_sparse_moe"),
        _ => format!("model.layers.{layer}.mlp"),
    }
}

/// The Hugging Face name of a layer's router.
fn router_name(family: Family, layer: u64) -> String {
    format!("{}.gate.weight", moe_module(family, layer))
}

/// Expert `e`'s gate, up and down projections (Mixtral's `w1`, `w3`, `w2`).
fn expert_names(family: Family, layer: u64, e: u64) -> [String; 3] {
    let m = moe_module(family, layer);
    let names = match family {
        Family::Mixtral => ["w1", "w3", "w2"],
        _ => ["gate_proj", "up_proj", "down_proj"],
    };
    names.map(|w| format!("{m}.experts.{e}.{w}.weight"))
}

/// Gemma's norm after attention and after the MLP, under NeMo 2's (and Megatron-Bridge's)
/// names: a `post_layernorm` inside the row-parallel projection.
const GEMMA_POST_ATTN: &str = "self_attention.linear_proj.post_layernorm.weight";
const GEMMA_POST_MLP: &str = "mlp.linear_fc2.post_layernorm.weight";

/// The HF norm before the MLP: Llama's `post_attention_layernorm`, Gemma's
/// `pre_feedforward_layernorm` (its `post_attention_layernorm` follows attention).
fn pre_mlp_norm(arch: &LlamaArch) -> &'static str {
    match arch.gemma {
        Some(_) => "pre_feedforward_layernorm.weight",
        None => "post_attention_layernorm.weight",
    }
}

fn heads(arch: &LlamaArch) -> Heads {
    Heads {
        heads: arch.heads,
        groups: arch.groups,
        head_dim: arch.head_dim,
    }
}

/// Reads `dir`: config, weights (mapped, not copied) and side files.
///
/// # Errors
/// [`Error`] for unreadable files, unknown models, missing or unexpected tensors.
pub fn read_dir(dir: &Path) -> Result<HfModel, Error> {
    let d = dir.display().to_string();
    let cfg_path = dir.join("config.json");
    let cfg = std::fs::read(&cfg_path).map_err(|source| Error::Io {
        file: cfg_path.display().to_string(),
        source,
    })?;
    let arch = LlamaArch::from_hf(&cfg)?;
    let name_or_path = serde_json::from_slice::<serde_json::Value>(&cfg)
        .ok()
        .and_then(|v| v.get("_name_or_path")?.as_str().map(str::to_string));
    let mut warnings = Vec::new();
    let mut all: HashMap<String, Flat> = HashMap::new();
    for (_, st) in safetensors::open_dir(dir)? {
        for t in st.tensors {
            let f = Flat::new(
                &t.name,
                t.dtype,
                t.shape,
                vec![crate::io::piece::Piece::Bytes(t.data)],
            )?;
            if all.insert(t.name.clone(), f).is_some() {
                return Err(Error::Duplicate {
                    dir: d.clone(),
                    name: t.name,
                });
            }
        }
    }
    let tensors = global_from_hf(&d, &arch, &mut all)?;
    let mut left: Vec<String> = all.into_keys().collect();
    left.sort();
    for name in left {
        // Rotary inverse frequencies are derived from the config, not weights.
        if name.ends_with("rotary_emb.inv_freq") {
            warnings.push(format!("ignored `{name}` (recomputed from rope_theta)"));
            continue;
        }
        return Err(Error::Unexpected { dir: d, name });
    }
    let mut side_files = Vec::new();
    for name in SIDE_FILES {
        let p = dir.join(name);
        if p.is_file() {
            let bytes = std::fs::read(&p).map_err(|source| Error::Io {
                file: p.display().to_string(),
                source,
            })?;
            side_files.push((name.to_string(), ByteView::from_vec(bytes)));
        }
    }
    Ok(HfModel {
        arch,
        tensors,
        side_files,
        name_or_path,
        warnings,
    })
}

/// Moves the HF tensors out of `all` into whole megatron-core tensors
/// (state-dict order), with the `None` extra states a fresh mcore model has.
fn global_from_hf(
    dir: &str,
    arch: &LlamaArch,
    all: &mut HashMap<String, Flat>,
) -> Result<Vec<GlobalTensor>, Error> {
    let mut take = |name: &str| {
        all.remove(name).ok_or_else(|| Error::Missing {
            dir: dir.to_string(),
            name: name.to_string(),
        })
    };
    let out = std::cell::RefCell::new(Vec::new());
    let push = |key: String, t: Flat| {
        out.borrow_mut().push(GlobalTensor {
            key,
            value: GlobalValue::Tensor {
                dtype: t.dtype,
                shape: t.shape.clone(),
                pieces: t.pieces().to_vec(),
            },
        })
    };
    let none = |key: String| GlobalTensor {
        key,
        value: GlobalValue::Object(Value::None),
    };
    // an extra state at this point of the state dict (the experts' interleave with weights)
    let push_none = |key: String| out.borrow_mut().push(none(key));
    let h = heads(arch);
    push(
        "model.embedding.word_embeddings.weight".into(),
        take("model.embed_tokens.weight")?,
    );
    let mut objects = Vec::new();
    for l in 0..arch.num_layers {
        let hf = |s: &str| format!("model.layers.{l}.{s}");
        let mc = |s: &str| format!("model.decoder.layers.{l}.{s}");
        push(
            mc("input_layernorm.weight"),
            take(&hf("input_layernorm.weight"))?,
        );
        push(
            mc("self_attention.linear_proj.weight"),
            take(&hf("self_attn.o_proj.weight"))?,
        );
        if arch.bias {
            push(
                mc("self_attention.linear_proj.bias"),
                take(&hf("self_attn.o_proj.bias"))?,
            );
        }
        if arch.gemma.is_some() {
            push(
                mc(GEMMA_POST_ATTN),
                take(&hf("post_attention_layernorm.weight"))?,
            );
        }
        for kind in ["weight", "bias"] {
            if kind == "bias" && !(arch.bias || arch.qkv_bias) {
                continue;
            }
            let q = take(&hf(&format!("self_attn.q_proj.{kind}")))?;
            let k = take(&hf(&format!("self_attn.k_proj.{kind}")))?;
            let v = take(&hf(&format!("self_attn.v_proj.{kind}")))?;
            let name = mc(&format!("self_attention.linear_qkv.{kind}"));
            let fused = interleave_qkv(&name, h, &q, &k, &v)?;
            push(name, fused);
        }
        if arch.qk_layernorm {
            push(
                mc("self_attention.q_layernorm.weight"),
                take(&hf("self_attn.q_norm.weight"))?,
            );
            push(
                mc("self_attention.k_layernorm.weight"),
                take(&hf("self_attn.k_norm.weight"))?,
            );
        }
        push(
            mc("pre_mlp_layernorm.weight"),
            take(&hf(pre_mlp_norm(arch)))?,
        );
        if let Some(moe) = &arch.moe {
            // SequentialMLP state-dict order: the router, then each expert's fc1, its extra
            // state, fc2, its extra state
            push(mc("mlp.router.weight"), take(&router_name(arch.family, l))?);
            for e in 0..moe.experts {
                let [g, u, d] = expert_names(arch.family, l, e);
                let x = |m: &str| mc(&format!("mlp.experts.local_experts.{e}.{m}"));
                let fc1 = cat_rows(&x("linear_fc1.weight"), &take(&g)?, &take(&u)?)?;
                push(x("linear_fc1.weight"), fc1);
                push_none(x("linear_fc1._extra_state"));
                push(x("linear_fc2.weight"), take(&d)?);
                push_none(x("linear_fc2._extra_state"));
            }
            for m in ["self_attention.linear_proj", "self_attention.linear_qkv"] {
                objects.push(none(mc(&format!("{m}._extra_state"))));
            }
            continue;
        }
        for kind in ["weight", "bias"] {
            if kind == "bias" && !arch.bias {
                continue;
            }
            let g = take(&hf(&format!("mlp.gate_proj.{kind}")))?;
            let u = take(&hf(&format!("mlp.up_proj.{kind}")))?;
            let name = mc(&format!("mlp.linear_fc1.{kind}"));
            let fc1 = cat_rows(&name, &g, &u)?;
            push(name, fc1);
        }
        push(
            mc("mlp.linear_fc2.weight"),
            take(&hf("mlp.down_proj.weight"))?,
        );
        if arch.bias {
            push(mc("mlp.linear_fc2.bias"), take(&hf("mlp.down_proj.bias"))?);
        }
        if arch.gemma.is_some() {
            push(
                mc(GEMMA_POST_MLP),
                take(&hf("post_feedforward_layernorm.weight"))?,
            );
        }
        for m in [
            "self_attention.linear_proj",
            "self_attention.linear_qkv",
            "mlp.linear_fc1",
            "mlp.linear_fc2",
        ] {
            objects.push(none(mc(&format!("{m}._extra_state"))));
        }
    }
    push(
        "model.decoder.final_layernorm.weight".into(),
        take("model.norm.weight")?,
    );
    if arch.tied {
        // Some tied checkpoints still store lm_head (equal to the embedding).
        all.remove("lm_head.weight");
    } else {
        push("model.output_layer.weight".into(), take("lm_head.weight")?);
    }
    let mut out = out.into_inner();
    out.extend(objects);
    out.push(none("model.output_layer._extra_state".into()));
    Ok(out)
}

/// The HF tensors of a named model, vocab tensors trimmed (or padded)
/// to `arch.vocab_size` rows, in transformers' module order.
///
/// # Errors
/// [`Error::Missing`] when the model lacks a tensor; shape errors.
pub fn hf_tensors(canon: &NamedModel, arch: &LlamaArch) -> Result<Vec<WriteTensor>, Error> {
    let get = |name: &str| {
        canon.tensor(name).ok_or_else(|| Error::Missing {
            dir: "(checkpoint)".into(),
            name: name.to_string(),
        })
    };
    let mut out = Vec::new();
    let mut push = |t: Flat| {
        out.push(WriteTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            pieces: t.pieces().to_vec(),
        })
    };
    let v = arch.vocab_size;
    push(resize_rows(
        get("model.embedding.word_embeddings.weight")?,
        "model.embed_tokens.weight",
        v,
    )?);
    let h = heads(arch);
    for l in 0..arch.num_layers {
        let hf = |s: &str| format!("model.layers.{l}.{s}");
        let mc = |s: &str| format!("model.decoder.layers.{l}.{s}");
        let same = |from: &str, to: &str| -> Result<Flat, Error> {
            let t = get(&mc(from))?;
            Ok(t.renamed(hf(to), t.shape.clone())?)
        };
        push(same("input_layernorm.weight", "input_layernorm.weight")?);
        for kind in ["weight", "bias"] {
            if kind == "bias" && !(arch.bias || arch.qkv_bias) {
                continue;
            }
            let qkv = get(&mc(&format!("self_attention.linear_qkv.{kind}")))?;
            let names =
                ["q_proj", "k_proj", "v_proj"].map(|p| hf(&format!("self_attn.{p}.{kind}")));
            let [q, k, vv] = split_qkv(qkv, h, [&names[0], &names[1], &names[2]])?;
            push(q);
            push(k);
            push(vv);
        }
        push(same(
            "self_attention.linear_proj.weight",
            "self_attn.o_proj.weight",
        )?);
        if arch.bias {
            push(same(
                "self_attention.linear_proj.bias",
                "self_attn.o_proj.bias",
            )?);
        }
        if arch.qk_layernorm {
            push(same(
                "self_attention.q_layernorm.weight",
                "self_attn.q_norm.weight",
            )?);
            push(same(
                "self_attention.k_layernorm.weight",
                "self_attn.k_norm.weight",
            )?);
        }
        // fc1 = [gate; up] -> the two halves under their HF names
        let halves = |fc1: &Flat, names: [String; 2]| -> Result<[Flat; 2], Error> {
            let f = fc1.shape.first().copied().unwrap_or(0) / 2;
            let mut half = fc1.shape.clone();
            if let Some(r) = half.first_mut() {
                *r = f;
            }
            let [g, u] = names;
            Ok([
                Flat::new(g, fc1.dtype, half.clone(), fc1.rows(0, f)?)?,
                Flat::new(u, fc1.dtype, half, fc1.rows(f, 2 * f)?)?,
            ])
        };
        if let Some(moe) = &arch.moe {
            let r = get(&mc("mlp.router.weight"))?;
            push(r.renamed(router_name(arch.family, l), r.shape.clone())?);
            for e in 0..moe.experts {
                let [g, u, d] = expert_names(arch.family, l, e);
                let x = |m: &str| mc(&format!("mlp.experts.local_experts.{e}.{m}"));
                let [gt, ut] = halves(get(&x("linear_fc1.weight"))?, [g, u])?;
                push(gt);
                push(ut);
                let fc2 = get(&x("linear_fc2.weight"))?;
                push(fc2.renamed(d, fc2.shape.clone())?);
            }
        } else {
            for kind in ["weight", "bias"] {
                if kind == "bias" && !arch.bias {
                    continue;
                }
                let fc1 = get(&mc(&format!("mlp.linear_fc1.{kind}")))?;
                let names = ["gate_proj", "up_proj"].map(|p| hf(&format!("mlp.{p}.{kind}")));
                let [g, u] = halves(fc1, names)?;
                push(g);
                push(u);
            }
            push(same("mlp.linear_fc2.weight", "mlp.down_proj.weight")?);
            if arch.bias {
                push(same("mlp.linear_fc2.bias", "mlp.down_proj.bias")?);
            }
        }
        push(same("pre_mlp_layernorm.weight", pre_mlp_norm(arch))?);
        if arch.gemma.is_some() {
            push(same(GEMMA_POST_ATTN, "post_attention_layernorm.weight")?);
            push(same(GEMMA_POST_MLP, "post_feedforward_layernorm.weight")?);
        }
    }
    let norm = get("model.decoder.final_layernorm.weight")?;
    push(norm.renamed("model.norm.weight", norm.shape.clone())?);
    if !arch.tied {
        push(resize_rows(
            get("model.output_layer.weight")?,
            "lm_head.weight",
            v,
        )?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_hf() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mcore/llama/hf")
    }

    #[test]
    fn fixture_hf_maps_to_the_tp1_fixture_tensors() {
        use crate::model::checkpoint::{Checkpoint, CONFIG_MEMBER};
        let m = read_dir(&fixture_hf()).unwrap();
        let arch = m.arch.clone();
        let tp1 = Checkpoint::open(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo"),
        )
        .unwrap();
        // The HF tensors under the same model's config, read by the core view.
        let config = tp1.read_member(CONFIG_MEMBER).unwrap();
        let archive = crate::formats::archive::Archive::assembled(
            fixture_hf(),
            vec![(CONFIG_MEMBER.to_string(), config)],
        )
        .unwrap();
        let ck = Checkpoint::from_global(archive, m.tensors).unwrap();
        let ours = NamedModel::from_checkpoint(&ck).unwrap();
        let want = NamedModel::from_checkpoint(&tp1).unwrap();
        let names = |c: &NamedModel| c.entries.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&ours), names(&want));
        for e in &want.entries {
            let super::super::named::Item::Tensor(t) = &e.item else {
                continue;
            };
            let a = crate::io::piece::concat(ours.tensor(&e.name).unwrap().pieces());
            let b = crate::io::piece::concat(t.pieces());
            // Vocab tensors: the fixture pads 100 -> 128 rows.
            assert_eq!(a[..], b[..a.len()], "{}", e.name);
        }
        // And back to HF: byte-identical to the fixture's safetensors tensors.
        let hf = hf_tensors(&ours, &arch).unwrap();
        let orig = safetensors::open_dir(&fixture_hf()).unwrap();
        let orig: HashMap<_, _> = orig[0]
            .1
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        assert_eq!(hf.len(), orig.len());
        for t in &hf {
            let o = orig[&t.name];
            assert_eq!((t.dtype, &t.shape), (o.dtype, &o.shape), "{}", t.name);
            assert_eq!(
                crate::io::piece::concat(&t.pieces),
                o.data.as_slice(),
                "{}",
                t.name
            );
        }
    }

    #[test]
    fn missing_and_unexpected_tensors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            fixture_hf().join("config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        let st = safetensors::open_dir(&fixture_hf()).unwrap().remove(0).1;
        let write = |tensors: Vec<WriteTensor>| {
            let mut f = std::fs::File::create(dir.path().join("model.safetensors")).unwrap();
            safetensors::write(&mut f, "m", &tensors, &Default::default()).unwrap();
        };
        let as_write = |t: &safetensors::StTensor| WriteTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            pieces: vec![crate::io::piece::Piece::Bytes(t.data.clone())],
        };
        let mut ts: Vec<_> = st
            .tensors
            .iter()
            .filter(|t| t.name != "model.norm.weight")
            .map(as_write)
            .collect();
        write(ts.clone());
        let e = read_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&e, Error::Missing { name, .. } if name == "model.norm.weight"),
            "{e}"
        );
        ts = st.tensors.iter().map(as_write).collect();
        let mut extra = ts[0].clone();
        extra.name = "model.extra.weight".into();
        ts.push(extra);
        write(ts);
        let e = read_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&e, Error::Unexpected { name, .. } if name == "model.extra.weight"),
            "{e}"
        );
        let e = read_dir(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
    }
}
