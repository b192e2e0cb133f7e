//! Hugging Face `config.json` <-> NeMo `model_config.yaml` for the Llama-shaped families
//! (nemo-format.md §4.4; formats-next §2.4): Llama, Mistral, Qwen2 and Qwen3. The
//! architecture keys, `head_dim` as `kv_channels`, `rope_theta` as `rotary_base`, Llama-3 rope
//! scaling as `scale_positional_embedding` + its factors, linear scaling as
//! `seq_len_interpolation_factor`, `rms_norm_eps`, tied embeddings and biases; Qwen2's Q/K/V
//! biases as `qkv_bias`, Qwen3's per-head Q/K RMSNorm as `qk_layernorm`, Mistral's sliding
//! window `W` as megatron-core's `window_size: [W - 1, 0]` (a query sees itself and the `W - 1`
//! keys before it). The NeMo side is written as the megatron_gpt keys the fixture checkpoints
//! carry (local layer spec, `mcore_gpt: true`). Anything a family does that these keys cannot
//! say (per-layer windows, an output-projection bias without MLP biases) is refused.

use serde_json::{json, Map, Value};

use crate::formats::torch::dtype::Dtype;
use crate::model::config::ModelConfig;

/// Errors mapping configs; each names the key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required key is missing or has the wrong type.
    #[error("config.json: `{key}`: {why}")]
    Key {
        /// The key.
        key: String,
        /// What was wrong.
        why: String,
    },
    /// The model is not one this converter knows how to map exactly.
    #[error("config.json: unsupported model: {why}")]
    Unsupported {
        /// Why.
        why: String,
    },
    /// A NeMo config key is missing or unusable.
    #[error("model_config.yaml: `{key}`: {why}")]
    Nemo {
        /// The key.
        key: String,
        /// What was wrong.
        why: String,
    },
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// None.
    None,
    /// Position interpolation by `factor`.
    Linear {
        /// The factor.
        factor: f64,
    },
    /// Llama-3.1 frequency-dependent scaling.
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: u64,
    },
}

/// A Hugging Face model family this converter maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `LlamaForCausalLM`.
    Llama,
    /// `MistralForCausalLM`: Llama plus a sliding window.
    Mistral,
    /// `Qwen2ForCausalLM`: Llama plus Q/K/V biases.
    Qwen2,
    /// `Qwen3ForCausalLM`: Llama plus per-head Q/K RMSNorm.
    Qwen3,
    /// `MixtralForCausalLM`: Mistral with mixture-of-experts MLPs.
    Mixtral,
    /// `Qwen3MoeForCausalLM`: Qwen3 with mixture-of-experts MLPs.
    Qwen3Moe,
    /// `Gemma2ForCausalLM`: zero-centred norms, post-norms, GeGLU, scaled embeddings,
    /// soft-capped scores and logits, every second layer windowed.
    Gemma2,
    /// `Gemma3ForCausalLM` (`gemma3_text`): Gemma 2 plus per-head Q/K norms and a local RoPE
    /// base for the windowed layers.
    Gemma3,
}

impl Family {
    /// `model_type` in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Mixtral => "mixtral",
            Family::Qwen3Moe => "qwen3_moe",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3_text",
        }
    }

    /// The transformers class.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Mixtral => "MixtralForCausalLM",
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    fn parse(model_type: &str) -> Option<Family> {
        [
            Family::Llama,
            Family::Mistral,
            Family::Qwen2,
            Family::Qwen3,
            Family::Mixtral,
            Family::Qwen3Moe,
            Family::Gemma2,
            Family::Gemma3,
        ]
        .into_iter()
        .find(|f| f.model_type() == model_type)
    }
}

/// Mixture-of-experts MLPs (every layer), as megatron-core's MoELayer with SequentialMLP
/// experts computes them.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeArch {
    /// Experts per layer (`num_local_experts` / `num_experts`).
    pub experts: u64,
    /// Experts per token (`num_experts_per_tok`).
    pub topk: u64,
    /// An expert's MLP size (Mixtral `intermediate_size`, Qwen3-MoE `moe_intermediate_size`).
    pub ffn: u64,
    /// Softmax over every expert, then the top k, not renormalised (Qwen3-MoE with
    /// `norm_topk_prob: false`); else the top-k probabilities renormalised (Mixtral).
    pub pre_softmax: bool,
    /// `router_aux_loss_coef`.
    pub aux_loss_coeff: f64,
}

/// What Gemma 2 and 3 add to the Llama shape.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmaArch {
    /// `query_pre_attn_scalar`: attention scores are scaled by `1/sqrt(it)`.
    pub query_pre_attn_scalar: f64,
    /// `attn_logit_softcapping`.
    pub attn_softcap: Option<f64>,
    /// `final_logit_softcapping`.
    pub final_softcap: Option<f64>,
    /// Per layer: windowed (`sliding_attention`) or not (`full_attention`).
    pub windowed: Vec<bool>,
    /// Gemma 3: the windowed layers' RoPE base (`rope_local_base_freq`).
    pub local_rope_theta: Option<f64>,
}

impl GemmaArch {
    /// megatron-core's `window_attn_skip_freq` for this pattern: `N` when every layer whose
    /// 1-based number is not a multiple of `N` is windowed, else the 0/1 list.
    pub fn skip_freq_yaml(&self) -> String {
        let n = self.windowed.len() as u64;
        let fits = |f: u64| (1..=n).all(|l| self.windowed[(l - 1) as usize] == (l % f != 0));
        match (2..=n.max(2)).find(|&f| fits(f)) {
            Some(f) => f.to_string(),
            None => {
                let v: Vec<&str> = self
                    .windowed
                    .iter()
                    .map(|&w| if w { "1" } else { "0" })
                    .collect();
                format!("[{}]", v.join(", "))
            }
        }
    }
}

/// The architecture of a Llama-shaped model, as both sides need it.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaArch {
    /// The Hugging Face family.
    pub family: Family,
    /// Transformer layers.
    pub num_layers: u64,
    /// Hidden size.
    pub hidden_size: u64,
    /// MLP hidden size (per gate/up half).
    pub ffn_hidden_size: u64,
    /// Attention heads.
    pub heads: u64,
    /// KV heads / query groups.
    pub groups: u64,
    /// Channels per head.
    pub head_dim: u64,
    /// The true vocabulary (HF `vocab_size`).
    pub vocab_size: u64,
    /// Maximum sequence length.
    pub max_position_embeddings: u64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Input and output embeddings shared.
    pub tied: bool,
    /// Linear layers have biases (attention and MLP alike).
    pub bias: bool,
    /// Q, K and V have biases (Qwen2), without the other linear layers'.
    pub qkv_bias: bool,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3).
    pub qk_layernorm: bool,
    /// Sliding-window attention over this many positions (the query's own included).
    pub sliding_window: Option<u64>,
    /// Mixture-of-experts MLPs (Mixtral, Qwen3-MoE).
    pub moe: Option<MoeArch>,
    /// Gemma 2 / 3 specifics.
    pub gemma: Option<GemmaArch>,
    /// `initializer_range`.
    pub init_std: f64,
    /// Weight dtype, if stated.
    pub dtype: Option<Dtype>,
    /// Token ids (`bos_token_id`, `eos_token_id`, `pad_token_id`) as stated.
    pub token_ids: Map<String, Value>,
}

fn get_u64(c: &Map<String, Value>, key: &str) -> Result<u64, Error> {
    c.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| Error::Key {
            key: key.into(),
            why: "missing or not a non-negative integer".into(),
        })
}

fn opt_u64(c: &Map<String, Value>, key: &str) -> Result<Option<u64>, Error> {
    match c.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| Error::Key {
            key: key.into(),
            why: format!("not a non-negative integer: {v}"),
        }),
    }
}

fn opt_f64(c: &Map<String, Value>, key: &str) -> Result<Option<f64>, Error> {
    match c.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| Error::Key {
            key: key.into(),
            why: format!("not a number: {v}"),
        }),
    }
}

fn opt_bool(c: &Map<String, Value>, key: &str) -> Result<Option<bool>, Error> {
    match c.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| Error::Key {
            key: key.into(),
            why: format!("not a boolean: {v}"),
        }),
    }
}

/// torch dtype names as transformers writes them (`bfloat16`).
fn dtype_from_hf(name: &str) -> Option<Dtype> {
    Dtype::from_torch_name(name)
}

impl LlamaArch {
    /// Reads a transformers `config.json` (4.x `rope_scaling`/`rope_theta` or
    /// 5.x `rope_parameters`).
    ///
    /// # Errors
    /// [`Error::Key`] for missing/mistyped keys, [`Error::Unsupported`] for
    /// models whose mapping would not be exact.
    pub fn from_hf(text: &[u8]) -> Result<LlamaArch, Error> {
        let v: Value = serde_json::from_slice(text).map_err(|e| Error::Key {
            key: "<root>".into(),
            why: format!("not JSON: {e}"),
        })?;
        let c = v.as_object().ok_or_else(|| Error::Key {
            key: "<root>".into(),
            why: "not an object".into(),
        })?;
        let model_type = c.get("model_type").and_then(Value::as_str).unwrap_or("");
        let family = Family::parse(model_type).ok_or_else(|| Error::Unsupported {
            why: format!(
                "model_type `{model_type}` (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, mixtral and qwen3_moe are mapped)"
            ),
        })?;
        let is_gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
        // Gemma names it hidden_activation (hidden_act is an older, ignored key)
        let (act_key, want) = match is_gemma {
            true => ("hidden_activation", "gelu_pytorch_tanh"),
            false => ("hidden_act", "silu"),
        };
        let act = c.get(act_key).and_then(Value::as_str).unwrap_or(want);
        if act != want {
            return Err(Error::Unsupported {
                why: format!(
                    "{act_key} `{act}` ({model_type} is mapped with {want}: NeMo's {})",
                    if is_gemma {
                        "fast-geglu with openai_gelu"
                    } else {
                        "fast-swiglu"
                    }
                ),
            });
        }
        let hidden_size = get_u64(c, "hidden_size")?;
        let heads = get_u64(c, "num_attention_heads")?;
        if heads == 0 {
            return Err(Error::Key {
                key: "num_attention_heads".into(),
                why: "is 0".into(),
            });
        }
        let groups = opt_u64(c, "num_key_value_heads")?.unwrap_or(heads);
        let head_dim = opt_u64(c, "head_dim")?.unwrap_or(hidden_size / heads);
        // Llama's attention_bias covers q/k/v/o, Qwen3's too; only Llama has mlp_bias; Qwen2's
        // q/k/v always have biases, nothing else does; Mistral has none.
        let attention_bias = opt_bool(c, "attention_bias")?.unwrap_or(false);
        let mlp_bias = opt_bool(c, "mlp_bias")?.unwrap_or(false);
        if attention_bias != mlp_bias {
            return Err(Error::Unsupported {
                why: format!(
                    "attention_bias={attention_bias} with mlp_bias={mlp_bias}: mcore's `bias` covers every linear layer (attention and MLP)"
                ),
            });
        }
        let qkv_bias = family == Family::Qwen2;
        let qk_layernorm = matches!(family, Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3);
        let sliding_window = match family {
            // Gemma's window applies to its `sliding_attention` layers (gemma_from_hf)
            Family::Mistral | Family::Mixtral | Family::Gemma2 | Family::Gemma3 => {
                match opt_u64(c, "sliding_window")? {
                    Some(0) => {
                        return Err(Error::Key {
                            key: "sliding_window".into(),
                            why: "is 0".into(),
                        })
                    }
                    w => w,
                }
            }
            Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe => {
                let layer_types = c.get("layer_types").and_then(Value::as_array);
                let windowed = opt_bool(c, "use_sliding_window")?.unwrap_or(false)
                    || layer_types
                        .is_some_and(|l| l.iter().any(|t| t.as_str() != Some("full_attention")));
                if windowed {
                    return Err(Error::Unsupported {
                        why: format!(
                            "{model_type} with sliding-window layers (use_sliding_window / layer_types): only full attention in every layer is mapped"
                        ),
                    });
                }
                None
            }
            Family::Llama => None,
        };
        // transformers 5 keeps theta and scaling together in `rope_parameters`.
        let empty = Map::new();
        let mut params = c
            .get("rope_parameters")
            .and_then(Value::as_object)
            .or_else(|| c.get("rope_scaling").and_then(Value::as_object))
            .unwrap_or(&empty);
        // Gemma 3 (transformers 5): one entry per layer type; the windowed layers' must be
        // plain RoPE, its base is `rope_local_base_freq`
        let mut local_rope_theta = None;
        if family == Family::Gemma3 {
            if let Some(local) = params.get("sliding_attention").and_then(Value::as_object) {
                let t = local
                    .get("rope_type")
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                if t != "default" {
                    return Err(Error::Unsupported {
                        why: format!("rope type `{t}` for sliding_attention layers (only default is mapped there)"),
                    });
                }
                local_rope_theta = opt_f64(local, "rope_theta")?;
            }
            if let Some(full) = params.get("full_attention").and_then(Value::as_object) {
                params = full;
            }
            local_rope_theta = local_rope_theta
                .or(opt_f64(c, "rope_local_base_freq")?)
                .or(Some(10000.0));
        }
        let rope_theta = opt_f64(params, "rope_theta")?
            .or(opt_f64(c, "rope_theta")?)
            .unwrap_or(10000.0);
        let rope_type = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let factor = |k: &str| -> Result<f64, Error> {
            opt_f64(params, k)?.ok_or_else(|| Error::Key {
                key: format!("rope_parameters.{k}"),
                why: "missing".into(),
            })
        };
        let rope_scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: factor("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: factor("factor")?,
                low_freq_factor: factor("low_freq_factor")?,
                high_freq_factor: factor("high_freq_factor")?,
                original_max_position_embeddings: get_u64(
                    params,
                    "original_max_position_embeddings",
                )?,
            },
            other => {
                return Err(Error::Unsupported {
                    why: format!("rope type `{other}` (default, linear and llama3 are mapped)"),
                })
            }
        };
        let dtype = c
            .get("dtype")
            .or_else(|| c.get("torch_dtype"))
            .and_then(Value::as_str)
            .and_then(dtype_from_hf);
        let mut token_ids = Map::new();
        for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if let Some(v) = c.get(k) {
                token_ids.insert(k.to_string(), v.clone());
            }
        }
        let moe = match family {
            Family::Mixtral | Family::Qwen3Moe => Some(moe_from_hf(c, family)?),
            _ => None,
        };
        let num_layers = get_u64(c, "num_hidden_layers")?;
        let gemma = match is_gemma {
            true => Some(gemma_from_hf(
                c,
                family,
                num_layers,
                sliding_window,
                local_rope_theta,
            )?),
            false => None,
        };
        if is_gemma && matches!(rope_scaling, RopeScaling::Llama3 { .. }) {
            return Err(Error::Unsupported {
                why: "llama3 rope scaling on a Gemma model (default and linear are mapped)".into(),
            });
        }
        Ok(LlamaArch {
            family,
            qkv_bias,
            qk_layernorm,
            sliding_window,
            moe,
            gemma,
            num_layers,
            hidden_size,
            ffn_hidden_size: get_u64(c, "intermediate_size")?,
            heads,
            groups,
            head_dim,
            vocab_size: get_u64(c, "vocab_size")?,
            max_position_embeddings: opt_u64(c, "max_position_embeddings")?.unwrap_or(4096),
            rms_norm_eps: opt_f64(c, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tied: opt_bool(c, "tie_word_embeddings")?.unwrap_or(is_gemma),
            bias: attention_bias,
            init_std: opt_f64(c, "initializer_range")?.unwrap_or(0.02),
            dtype,
            token_ids,
        })
    }

    /// Reads the architecture from a NeMo config (mcore GPT, RMSNorm, SwiGLU,
    /// RoPE); `vocab_size` is the caller's true vocabulary.
    ///
    /// # Errors
    /// [`Error::Nemo`] for a config that is not a Llama-family model.
    pub fn from_nemo(cfg: &ModelConfig, vocab_size: u64) -> Result<LlamaArch, Error> {
        let nemo = |key: &str, why: String| Error::Nemo {
            key: key.into(),
            why,
        };
        let req = |key: &'static str, r: Result<u64, crate::model::config::Error>| {
            r.map_err(|e| nemo(key, e.to_string()))
        };
        if cfg.normalization() != "rmsnorm" {
            return Err(nemo(
                "normalization",
                format!("`{}` (Llama uses rmsnorm)", cfg.normalization()),
            ));
        }
        let truthy = |key: &str| cfg.get(key).and_then(|v| v.as_bool()).unwrap_or(false);
        // Gemma: GeGLU with the tanh GELU (openai_gelu), and the keys that say the rest
        let geglu = matches!(cfg.activation(), "fast-geglu" | "geglu");
        if geglu {
            if !truthy("openai_gelu") {
                return Err(nemo(
                    "openai_gelu",
                    "false with geglu: Gemma's gelu_pytorch_tanh is the tanh GELU (openai_gelu: true)".into(),
                ));
            }
        } else if !matches!(cfg.activation(), "fast-swiglu" | "swiglu") {
            return Err(nemo(
                "activation",
                format!(
                    "`{}` (Llama-shaped models use fast-swiglu, Gemma fast-geglu)",
                    cfg.activation()
                ),
            ));
        }
        const GEMMA_KEYS: [&str; 3] = [
            "layernorm_zero_centered_gamma",
            "post_layernorm",
            "scale_embedding",
        ];
        for key in GEMMA_KEYS {
            if truthy(key) != geglu {
                return Err(nemo(
                    key,
                    format!(
                        "{} with activation {}: Gemma has it with geglu, the other families have neither",
                        truthy(key),
                        cfg.activation()
                    ),
                ));
            }
        }
        if cfg.position_embedding_type() != "rope" {
            return Err(nemo(
                "position_embedding_type",
                format!("`{}` (Llama uses rope)", cfg.position_embedding_type()),
            ));
        }
        let f = |key: &str| -> Option<f64> {
            let v = cfg.get(key)?;
            v.as_f64().or_else(|| v.as_i64().map(|i| i as f64))
        };
        let rope_scaling = if truthy("scale_positional_embedding") {
            RopeScaling::Llama3 {
                factor: f("scale_factor").unwrap_or(8.0),
                low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
                high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
                original_max_position_embeddings: f("old_context_len").unwrap_or(8192.0) as u64,
            }
        } else if let Some(factor) = f("seq_len_interpolation_factor") {
            RopeScaling::Linear { factor }
        } else {
            RopeScaling::None
        };
        let dtype = match cfg.precision() {
            Some("bf16" | "bf16-mixed") => Some(Dtype::BF16),
            Some("16" | "16-mixed") => Some(Dtype::F16),
            Some("32" | "32-true") => Some(Dtype::F32),
            _ => None,
        };
        let max_pos = f("max_position_embeddings")
            .or_else(|| f("encoder_seq_length"))
            .unwrap_or(4096.0) as u64;
        let bias = cfg.bias();
        let qkv_bias = !bias && (truthy("qkv_bias") || truthy("add_qkv_bias"));
        let qk_layernorm = truthy("qk_layernorm");
        let sliding_window = match cfg.get("window_size") {
            None | Some(serde_yaml_ng::Value::Null) => None,
            Some(v) => {
                let pair: Option<(u64, u64)> = v.as_sequence().and_then(|s| match s.as_slice() {
                    [a, b] => Some((a.as_u64()?, b.as_u64()?)),
                    _ => None,
                });
                match pair {
                    Some((left, 0)) => Some(left + 1),
                    _ => {
                        return Err(nemo(
                            "window_size",
                            format!("{v:?}: only a causal window [W - 1, 0] maps to Hugging Face's sliding_window"),
                        ))
                    }
                }
            }
        };
        let moe = moe_from_nemo(cfg)?;
        let gemma = match geglu {
            true => Some(gemma_from_nemo(
                cfg,
                qk_layernorm,
                sliding_window.is_some(),
            )?),
            false => {
                refuse_set(
                    cfg,
                    &[
                        "window_attn_skip_freq",
                        "query_pre_attn_scalar",
                        "softmax_scale",
                        "attn_logit_softcapping",
                        "final_logit_softcapping",
                        "rope_local_base_freq",
                    ],
                    "is set, but only Gemma (geglu) maps it to Hugging Face",
                )?;
                None
            }
        };
        if gemma.is_some() && (bias || qkv_bias || moe.is_some()) {
            return Err(nemo(
                "bias",
                "Gemma has no linear-layer biases or experts".to_string(),
            ));
        }
        // the family whose config says all of it: Qwen3's q/k norms, Qwen2's q/k/v biases,
        // Mistral's window, else Llama; with experts Qwen3-MoE or Mixtral
        let family = match (qk_layernorm, qkv_bias, sliding_window, moe.is_some()) {
            _ if gemma.is_some() && qk_layernorm => Family::Gemma3,
            _ if gemma.is_some() => Family::Gemma2,
            (true, false, None, false) => Family::Qwen3,
            (false, true, None, false) => Family::Qwen2,
            (false, false, Some(_), false) if !bias => Family::Mistral,
            (false, false, None, false) => Family::Llama,
            (true, false, None, true) if !bias => Family::Qwen3Moe,
            (false, false, _, true) if !bias => Family::Mixtral,
            _ => {
                return Err(nemo(
                    "qk_layernorm",
                    format!(
                        "no Hugging Face family has this combination: qk_layernorm={qk_layernorm}, qkv_bias={qkv_bias}, bias={bias}, window_size={sliding_window:?}, experts={}",
                        moe.as_ref().map_or(0, |m| m.experts)
                    ),
                ))
            }
        };
        if family == Family::Qwen3 && bias {
            return Err(nemo(
                "bias",
                "true with qk_layernorm: Qwen3's attention_bias has no MLP biases".to_string(),
            ));
        }
        Ok(LlamaArch {
            family,
            qkv_bias,
            qk_layernorm,
            sliding_window,
            moe,
            gemma,
            num_layers: req("num_layers", cfg.num_layers())?,
            hidden_size: req("hidden_size", cfg.hidden_size())?,
            ffn_hidden_size: req("ffn_hidden_size", cfg.ffn_hidden_size())?,
            heads: req("num_attention_heads", cfg.num_attention_heads())?,
            groups: req("num_query_groups", cfg.num_query_groups())?,
            head_dim: req("kv_channels", cfg.kv_channels())?,
            vocab_size,
            max_position_embeddings: max_pos,
            rms_norm_eps: f("layernorm_epsilon").unwrap_or(1e-5),
            rope_theta: f("rotary_base").unwrap_or(10000.0),
            rope_scaling,
            tied: cfg.share_embeddings_and_output_weights(),
            bias,
            init_std: f("init_method_std").unwrap_or(0.02),
            dtype,
            token_ids: Map::new(),
        })
    }

    /// The HF `config.json` text (transformers 5 keys plus the legacy
    /// `rope_theta`/`rope_scaling`/`torch_dtype` for older readers).
    pub fn to_hf_json(&self) -> String {
        let mut rope = Map::new();
        rope.insert("rope_theta".into(), json!(self.rope_theta));
        // (Gemma 3 nests this under `full_attention` below)
        match &self.rope_scaling {
            RopeScaling::None => {
                rope.insert("rope_type".into(), json!("default"));
            }
            RopeScaling::Linear { factor } => {
                rope.insert("rope_type".into(), json!("linear"));
                rope.insert("factor".into(), json!(factor));
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                rope.insert("rope_type".into(), json!("llama3"));
                rope.insert("factor".into(), json!(factor));
                rope.insert("low_freq_factor".into(), json!(low_freq_factor));
                rope.insert("high_freq_factor".into(), json!(high_freq_factor));
                rope.insert(
                    "original_max_position_embeddings".into(),
                    json!(original_max_position_embeddings),
                );
            }
        }
        let dtype = self
            .dtype
            .map(|d| d.torch_name())
            .unwrap_or("float32")
            .to_string();
        let mut c = Map::new();
        let f = self.family;
        let gemma = self.gemma.as_ref();
        c.insert("architectures".into(), json!([f.architecture()]));
        if let Some(g) = gemma {
            c.insert("attention_bias".into(), json!(false));
            c.insert("attn_logit_softcapping".into(), json!(g.attn_softcap));
            c.insert("final_logit_softcapping".into(), json!(g.final_softcap));
            let types: Vec<Value> = g
                .windowed
                .iter()
                .map(|&w| {
                    json!(if w {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    })
                })
                .collect();
            c.insert("layer_types".into(), Value::Array(types));
            c.insert(
                "query_pre_attn_scalar".into(),
                json_num(g.query_pre_attn_scalar),
            );
            if let Some(local) = g.local_rope_theta {
                // transformers 5's per-layer-type RoPE of Gemma 3
                let mut local_rope = Map::new();
                local_rope.insert("rope_theta".into(), json!(local));
                local_rope.insert("rope_type".into(), json!("default"));
                rope = Map::from_iter([
                    ("full_attention".to_string(), Value::Object(rope)),
                    ("sliding_attention".to_string(), Value::Object(local_rope)),
                ]);
                c.insert("use_bidirectional_attention".into(), json!(false));
            }
        }
        if matches!(f, Family::Llama | Family::Qwen3 | Family::Qwen3Moe) {
            c.insert("attention_bias".into(), json!(self.bias));
        }
        if let Some(m) = &self.moe {
            c.insert("num_local_experts".into(), json!(m.experts));
            c.insert("num_experts_per_tok".into(), json!(m.topk));
            c.insert("router_aux_loss_coef".into(), json!(m.aux_loss_coeff));
            c.insert("output_router_logits".into(), json!(false));
            if f == Family::Qwen3Moe {
                c.insert("moe_intermediate_size".into(), json!(m.ffn));
                c.insert("norm_topk_prob".into(), json!(!m.pre_softmax));
                c.insert("decoder_sparse_step".into(), json!(1));
                c.insert("mlp_only_layers".into(), json!([]));
            } else {
                c.insert("router_jitter_noise".into(), json!(0.0));
            }
        }
        c.insert("attention_dropout".into(), json!(0.0));
        c.insert("dtype".into(), json!(dtype));
        c.insert("head_dim".into(), json!(self.head_dim));
        match gemma {
            Some(_) => c.insert("hidden_activation".into(), json!("gelu_pytorch_tanh")),
            None => c.insert("hidden_act".into(), json!("silu")),
        };
        c.insert("hidden_size".into(), json!(self.hidden_size));
        c.insert("initializer_range".into(), json!(self.init_std));
        c.insert("intermediate_size".into(), json!(self.ffn_hidden_size));
        c.insert(
            "max_position_embeddings".into(),
            json!(self.max_position_embeddings),
        );
        if f == Family::Llama {
            c.insert("mlp_bias".into(), json!(self.bias));
        }
        if matches!(f, Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe) {
            let full = vec![json!("full_attention"); self.num_layers as usize];
            c.insert("layer_types".into(), Value::Array(full));
            c.insert("max_window_layers".into(), json!(self.num_layers));
            c.insert("use_sliding_window".into(), json!(false));
        }
        if f != Family::Llama {
            c.insert("sliding_window".into(), json!(self.sliding_window));
        }
        let nested_rope = gemma.is_some_and(|g| g.local_rope_theta.is_some());
        c.insert("model_type".into(), json!(f.model_type()));
        c.insert("num_attention_heads".into(), json!(self.heads));
        c.insert("num_hidden_layers".into(), json!(self.num_layers));
        c.insert("num_key_value_heads".into(), json!(self.groups));
        if f == Family::Llama {
            c.insert("pretraining_tp".into(), json!(1));
        }
        c.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        if self.rope_scaling != RopeScaling::None && !nested_rope {
            let mut legacy = rope.clone();
            legacy.remove("rope_theta");
            c.insert("rope_scaling".into(), Value::Object(legacy));
        }
        c.insert("rope_parameters".into(), Value::Object(rope));
        if !nested_rope {
            c.insert("rope_theta".into(), json!(self.rope_theta));
        }
        c.insert("tie_word_embeddings".into(), json!(self.tied));
        c.insert("torch_dtype".into(), json!(dtype));
        c.insert("use_cache".into(), json!(true));
        c.insert("vocab_size".into(), json!(self.vocab_size));
        for (k, v) in &self.token_ids {
            c.insert(k.clone(), v.clone());
        }
        let mut s = serde_json::to_string_pretty(&Value::Object(c)).unwrap_or_default();
        s.push('\n');
        s
    }

    /// `make_vocab_size_divisible_by` as NeMo's converter picks it: the largest
    /// power of two up to 128 that divides the vocabulary, so `Vp(1) = V`.
    pub fn natural_divisor(&self) -> u64 {
        let mut m = 128u64;
        while m > 1 && self.vocab_size % m != 0 {
            m /= 2;
        }
        m
    }
}

/// The Gemma keys of a `config.json`: the layer types (transformers' default pattern when
/// absent: every second layer for Gemma 2, five of six for Gemma 3), the query scale and the
/// soft-caps (Gemma 2 defaults 50 and 30 when absent, Gemma 3 none).
fn gemma_from_hf(
    c: &Map<String, Value>,
    family: Family,
    layers: u64,
    window: Option<u64>,
    local_rope_theta: Option<f64>,
) -> Result<GemmaArch, Error> {
    if opt_bool(c, "use_bidirectional_attention")?.unwrap_or(false) {
        return Err(Error::Unsupported {
            why: "use_bidirectional_attention (megatron-core's GPT attention is causal)".into(),
        });
    }
    let windowed: Vec<bool> = match c.get("layer_types") {
        None | Some(Value::Null) => {
            let period = match family {
                Family::Gemma3 => opt_u64(c, "sliding_window_pattern")?.unwrap_or(6),
                _ => 2,
            };
            (1..=layers).map(|l| l % period.max(1) != 0).collect()
        }
        Some(v) => {
            let list = v.as_array().ok_or_else(|| Error::Key {
                key: "layer_types".into(),
                why: "not a list".into(),
            })?;
            list.iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(Error::Unsupported {
                        why: format!(
                            "layer type {t} (sliding_attention and full_attention are mapped)"
                        ),
                    }),
                })
                .collect::<Result<_, _>>()?
        }
    };
    if windowed.len() as u64 != layers {
        return Err(Error::Key {
            key: "layer_types".into(),
            why: format!("{} entries for {layers} layers", windowed.len()),
        });
    }
    if window.is_none() && windowed.iter().any(|&w| w) {
        return Err(Error::Key {
            key: "sliding_window".into(),
            why: "missing, but layer_types has sliding_attention layers".into(),
        });
    }
    // absent: the family's default; null: none
    let cap = |key: &str, gemma2: f64| -> Result<Option<f64>, Error> {
        match c.contains_key(key) {
            true => opt_f64(c, key),
            false => Ok((family == Family::Gemma2).then_some(gemma2)),
        }
    };
    Ok(GemmaArch {
        query_pre_attn_scalar: opt_f64(c, "query_pre_attn_scalar")?.unwrap_or(256.0),
        attn_softcap: cap("attn_logit_softcapping", 50.0)?,
        final_softcap: cap("final_logit_softcapping", 30.0)?,
        windowed,
        local_rope_theta,
    })
}

/// A JSON number that is an integer when `x` is one (transformers' strict configs type
/// `query_pre_attn_scalar` as int).
fn json_num(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// The MoE keys of a Mixtral or Qwen3-MoE `config.json`; refuses dense layers among the
/// experts' (`mlp_only_layers`, `decoder_sparse_step`) and router noise.
fn moe_from_hf(c: &Map<String, Value>, family: Family) -> Result<MoeArch, Error> {
    let experts = match opt_u64(c, "num_local_experts")? {
        Some(n) => n,
        None => get_u64(c, "num_experts")?,
    };
    let topk = get_u64(c, "num_experts_per_tok")?;
    if topk == 0 || topk > experts {
        return Err(Error::Key {
            key: "num_experts_per_tok".into(),
            why: format!("{topk} is not in 1..={experts}"),
        });
    }
    let aux_loss_coeff = opt_f64(c, "router_aux_loss_coef")?.unwrap_or(0.0);
    Ok(match family {
        Family::Qwen3Moe => {
            let step = opt_u64(c, "decoder_sparse_step")?.unwrap_or(1);
            let dense = c
                .get("mlp_only_layers")
                .and_then(Value::as_array)
                .is_some_and(|l| !l.is_empty());
            if step != 1 || dense {
                return Err(Error::Unsupported {
                    why: "qwen3_moe with dense layers (decoder_sparse_step != 1 or mlp_only_layers): only experts in every layer are mapped".into(),
                });
            }
            MoeArch {
                experts,
                topk,
                ffn: get_u64(c, "moe_intermediate_size")?,
                pre_softmax: !opt_bool(c, "norm_topk_prob")?.unwrap_or(false),
                aux_loss_coeff,
            }
        }
        _ => {
            if opt_f64(c, "router_jitter_noise")?.unwrap_or(0.0) != 0.0 {
                return Err(Error::Unsupported {
                    why: "router_jitter_noise != 0 (megatron-core's router has no jitter of this kind)".into(),
                });
            }
            MoeArch {
                experts,
                topk,
                ffn: get_u64(c, "intermediate_size")?,
                pre_softmax: false,
                aux_loss_coeff,
            }
        }
    })
}

/// [`Error::Nemo`] for the first of `keys` the config sets (not null), with `why`.
fn refuse_set(cfg: &ModelConfig, keys: &[&str], why: &str) -> Result<(), Error> {
    match keys
        .iter()
        .find(|k| cfg.get(k).is_some_and(|v| !v.is_null()))
    {
        Some(key) => Err(Error::Nemo {
            key: key.to_string(),
            why: why.to_string(),
        }),
        None => Ok(()),
    }
}

/// The Gemma keys of a NeMo config (`window_attn_skip_freq` over `num_layers`).
fn gemma_from_nemo(cfg: &ModelConfig, gemma3: bool, window: bool) -> Result<GemmaArch, Error> {
    let nemo = |key: &str, why: String| Error::Nemo {
        key: key.into(),
        why,
    };
    let f = |key: &str| -> Option<f64> {
        let v = cfg.get(key)?;
        v.as_f64().or_else(|| v.as_i64().map(|i| i as f64))
    };
    let layers = cfg
        .num_layers()
        .map_err(|e| nemo("num_layers", e.to_string()))?;
    let windowed = match window {
        false => vec![false; layers as usize],
        true => cfg
            .window_attn_layers(layers)
            .map_err(|e| nemo("window_attn_skip_freq", e.to_string()))?
            .unwrap_or_else(|| vec![true; layers as usize]),
    };
    if cfg.get("softmax_scale").is_some_and(|v| !v.is_null()) {
        return Err(nemo(
            "softmax_scale",
            "Gemma's scale is written as query_pre_attn_scalar".into(),
        ));
    }
    let local = f("rope_local_base_freq");
    if local.is_some() != gemma3 {
        return Err(nemo(
            "rope_local_base_freq",
            "Gemma 3 (qk_layernorm) has a local RoPE base, Gemma 2 none".into(),
        ));
    }
    Ok(GemmaArch {
        query_pre_attn_scalar: f("query_pre_attn_scalar")
            .ok_or_else(|| nemo("query_pre_attn_scalar", "missing".into()))?,
        attn_softcap: f("attn_logit_softcapping"),
        final_softcap: f("final_logit_softcapping"),
        windowed,
        local_rope_theta: local,
    })
}

/// The MoE keys of a NeMo config, refusing what the mapping cannot carry to Hugging Face.
fn moe_from_nemo(cfg: &ModelConfig) -> Result<Option<MoeArch>, Error> {
    let u = |k: &str| cfg.get(k).and_then(|v| v.as_u64());
    let experts = match u("num_moe_experts") {
        None | Some(0) => return Ok(None),
        Some(n) => n,
    };
    let nemo = |key: &str, why: String| Error::Nemo {
        key: key.into(),
        why,
    };
    refuse_set(
        cfg,
        &[
            "moe_shared_expert_intermediate_size",
            "moe_router_topk_scaling_factor",
            "moe_router_num_groups",
        ],
        "has no Hugging Face Mixtral/Qwen3-MoE counterpart",
    )?;
    if u("moe_layer_freq").is_some_and(|f| f != 1) {
        return Err(nemo(
            "moe_layer_freq",
            "only experts in every layer are mapped".into(),
        ));
    }
    if cfg.get("moe_grouped_gemm").and_then(|v| v.as_bool()) == Some(true) {
        return Err(nemo(
            "moe_grouped_gemm",
            "grouped-GEMM expert names (TEGroupedMLP) are not mapped; SequentialMLP names are"
                .into(),
        ));
    }
    let ffn = u("moe_ffn_hidden_size")
        .or_else(|| u("ffn_hidden_size"))
        .ok_or_else(|| nemo("moe_ffn_hidden_size", "missing".into()))?;
    Ok(Some(MoeArch {
        experts,
        topk: u("moe_router_topk").unwrap_or(2),
        ffn,
        pre_softmax: cfg.get("moe_router_pre_softmax").and_then(|v| v.as_bool()) == Some(true),
        aux_loss_coeff: cfg
            .get("moe_aux_loss_coeff")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0),
    }))
}

pub use crate::model::config::yaml_float;

/// Everything [`nemo_config_yaml`] needs beyond the architecture.
#[derive(Debug, Clone)]
pub struct NemoTarget {
    /// Tensor-parallel size.
    pub tp: u64,
    /// Pipeline-parallel size.
    pub pp: u64,
    /// `make_vocab_size_divisible_by`.
    pub vocab_divisor: u64,
    /// `override_vocab_size`, when the tokenizer's vocabulary differs from the model's.
    pub override_vocab_size: Option<u64>,
    /// The `tokenizer:` section lines (already indented by two spaces).
    pub tokenizer_yaml: String,
    /// Weight dtype written.
    pub dtype: Dtype,
}

/// The NeMo `model_config.yaml` text for `arch` (megatron_gpt keys in the
/// order NeMo writes them; local layer spec).
pub fn nemo_config_yaml(arch: &LlamaArch, t: &NemoTarget) -> String {
    let precision = match t.dtype {
        Dtype::BF16 => "bf16",
        Dtype::F16 => "16",
        _ => "32",
    };
    let (interp, scaling) = match &arch.rope_scaling {
        RopeScaling::None => ("null".to_string(), String::new()),
        RopeScaling::Linear { factor } => (yaml_float(*factor), String::new()),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => (
            "null".to_string(),
            format!(
                "scale_positional_embedding: true\nscale_factor: {}\nlow_freq_factor: {}\nhigh_freq_factor: {}\nold_context_len: {}\n",
                yaml_float(*factor),
                yaml_float(*low_freq_factor),
                yaml_float(*high_freq_factor),
                original_max_position_embeddings
            ),
        ),
    };
    let override_line = match t.override_vocab_size {
        Some(v) => format!("override_vocab_size: {v}\n"),
        None => String::new(),
    };
    let gbs = t.tp * t.pp;
    format!(
        "mcore_gpt: true
micro_batch_size: 1
global_batch_size: {gbs}
rampup_batch_size: null
tensor_model_parallel_size: {tp}
pipeline_model_parallel_size: {pp}
virtual_pipeline_model_parallel_size: null
encoder_seq_length: {maxpos}
max_position_embeddings: {maxpos}
num_layers: {layers}
hidden_size: {hidden}
ffn_hidden_size: {ffn}
num_attention_heads: {heads}
num_query_groups: {groups}
kv_channels: {kv}
init_method_std: {std}
use_scaled_init_method: true
hidden_dropout: 0.0
attention_dropout: 0.0
ffn_dropout: 0.0
apply_query_key_layer_scaling: false
normalization: rmsnorm
layernorm_epsilon: {eps}
do_layer_norm_weight_decay: false
make_vocab_size_divisible_by: {div}
{override_line}pre_process: true
post_process: true
persist_layer_norm: false
bias: {bias}
qkv_bias: {qkv_bias}
qk_layernorm: {qk_layernorm}
window_size: {window}
{gemma}{moe}activation: {activation}
headscale: false
transformer_block_type: pre_ln
openai_gelu: {openai_gelu}
normalize_attention_scores: true
position_embedding_type: rope
rotary_percentage: 1.0
rotary_base: {theta}
seq_len_interpolation_factor: {interp}
{scaling}apply_rope_fusion: false
attention_type: multihead
share_embeddings_and_output_weights: {tied}
tokenizer:
{tok}native_amp_init_scale: 4294967296
native_amp_growth_interval: 1000
hysteresis: 2
fp32_residual_connection: false
fp16_lm_cross_entropy: false
megatron_amp_O2: false
grad_div_ar_fusion: true
gradient_accumulation_fusion: false
bias_activation_fusion: false
bias_dropout_add_fusion: false
masked_softmax_fusion: false
seed: 1234
use_cpu_initialization: false
onnx_safe: false
gradient_as_bucket_view: true
sync_batch_comm: false
activations_checkpoint_granularity: null
activations_checkpoint_method: null
activations_checkpoint_num_layers: null
sequence_parallel: false
transformer_engine: false
fp8: false
dist_ckpt_format: torch_dist
precision: {precision}
target: nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel
",
        tp = t.tp,
        pp = t.pp,
        maxpos = arch.max_position_embeddings,
        layers = arch.num_layers,
        hidden = arch.hidden_size,
        ffn = arch.ffn_hidden_size,
        heads = arch.heads,
        groups = arch.groups,
        kv = arch.head_dim,
        std = yaml_float(arch.init_std),
        eps = yaml_float(arch.rms_norm_eps),
        div = t.vocab_divisor,
        bias = arch.bias,
        qkv_bias = arch.qkv_bias,
        qk_layernorm = arch.qk_layernorm,
        window = match arch.sliding_window {
            Some(w) => format!("[{}, 0]", w.saturating_sub(1)),
            None => "null".to_string(),
        },
        moe = match &arch.moe {
            Some(m) => format!(
                "num_moe_experts: {}\nmoe_router_topk: {}\nmoe_ffn_hidden_size: {}\nmoe_router_pre_softmax: {}\nmoe_router_load_balancing_type: aux_loss\nmoe_aux_loss_coeff: {}\nmoe_grouped_gemm: false\nmoe_token_dispatcher_type: alltoall\n",
                m.experts,
                m.topk,
                m.ffn,
                m.pre_softmax,
                yaml_float(m.aux_loss_coeff)
            ),
            None => String::new(),
        },
        gemma = match &arch.gemma {
            Some(g) => {
                let opt = |x: Option<f64>| x.map_or("null".to_string(), yaml_float);
                let local = match g.local_rope_theta {
                    Some(t) => format!("rope_local_base_freq: {}\n", yaml_float(t)),
                    None => String::new(),
                };
                let skip = match arch.sliding_window {
                    Some(_) => format!("window_attn_skip_freq: {}\n", g.skip_freq_yaml()),
                    None => String::new(),
                };
                format!(
                    "{skip}layernorm_zero_centered_gamma: true\npost_layernorm: true\nscale_embedding: true\nquery_pre_attn_scalar: {}\nattn_logit_softcapping: {}\nfinal_logit_softcapping: {}\n{local}",
                    yaml_float(g.query_pre_attn_scalar),
                    opt(g.attn_softcap),
                    opt(g.final_softcap),
                )
            }
            None => String::new(),
        },
        activation = if arch.gemma.is_some() { "fast-geglu" } else { "fast-swiglu" },
        openai_gelu = arch.gemma.is_some(),
        theta = yaml_float(arch.rope_theta),
        tied = arch.tied,
        tok = t.tokenizer_yaml,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE_HF: &str = include_str!("../../../fixtures/mcore/llama/hf/config.json");

    fn llama3() -> String {
        FIXTURE_HF.replace(
            "\"rope_type\": \"default\"",
            "\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 16",
        )
    }

    fn target() -> NemoTarget {
        NemoTarget {
            tp: 2,
            pp: 1,
            vocab_divisor: 32,
            override_vocab_size: None,
            tokenizer_yaml: "  library: sentencepiece\n  model: nemo:ab_tokenizer.model\n".into(),
            dtype: Dtype::F32,
        }
    }

    #[test]
    fn fixture_config_maps_to_the_fixture_nemo_semantics() {
        let a = LlamaArch::from_hf(FIXTURE_HF.as_bytes()).unwrap();
        assert_eq!(
            (
                a.num_layers,
                a.hidden_size,
                a.ffn_hidden_size,
                a.heads,
                a.groups,
                a.head_dim
            ),
            (2, 64, 96, 8, 2, 8)
        );
        assert_eq!((a.vocab_size, a.tied, a.bias), (100, false, false));
        assert_eq!(a.natural_divisor(), 4);
        let text = nemo_config_yaml(&a, &target());
        let cfg = ModelConfig::parse(&text).unwrap();
        let fixture = ModelConfig::parse(include_str!("testdata/tiny_llama_config.yaml")).unwrap();
        for key in [
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "kv_channels",
            "normalization",
            "layernorm_epsilon",
            "activation",
            "bias",
            "position_embedding_type",
            "rotary_base",
            "share_embeddings_and_output_weights",
            "mcore_gpt",
            "transformer_engine",
            "max_position_embeddings",
            "make_vocab_size_divisible_by",
            "tokenizer.library",
        ] {
            let (x, y) = (cfg.get(key).unwrap(), fixture.get(key).unwrap());
            let num = |v: &serde_yaml_ng::Value| v.as_f64();
            assert!(x == y || num(x) == num(y), "{key}: {x:?} vs {y:?}");
        }
        assert_eq!(cfg.tensor_model_parallel_size(), 2);
        // And back.
        let b = LlamaArch::from_nemo(&cfg, 100).unwrap();
        assert_eq!(b.rope_theta, 10000.0);
        assert_eq!(b.rms_norm_eps, 1e-5);
        let back = LlamaArch::from_hf(b.to_hf_json().as_bytes()).unwrap();
        assert_eq!(back.head_dim, 8);
        assert_eq!(back.rope_scaling, RopeScaling::None);
    }

    #[test]
    fn llama3_scaling_round_trips() {
        let a = LlamaArch::from_hf(llama3().as_bytes()).unwrap();
        assert!(
            matches!(a.rope_scaling, RopeScaling::Llama3 { factor, original_max_position_embeddings: 16, .. } if factor == 8.0)
        );
        let cfg = ModelConfig::parse(&nemo_config_yaml(&a, &target())).unwrap();
        assert_eq!(
            cfg.get("scale_positional_embedding")
                .and_then(|v| v.as_bool()),
            Some(true)
        );
        let b = LlamaArch::from_nemo(&cfg, 100).unwrap();
        assert_eq!(b.rope_scaling, a.rope_scaling);
        let json: Value = serde_json::from_str(&b.to_hf_json()).unwrap();
        assert_eq!(json["rope_parameters"]["rope_type"], "llama3");
        assert_eq!(json["rope_parameters"]["low_freq_factor"], 1.0);
    }

    #[test]
    fn key_errors() {
        let e = LlamaArch::from_hf(
            FIXTURE_HF
                .replace("\"hidden_size\": 64", "\"hidden_size\": \"x\"")
                .as_bytes(),
        )
        .unwrap_err();
        assert!(
            matches!(&e, Error::Key { key, .. } if key == "hidden_size"),
            "{e}"
        );
        let e = LlamaArch::from_hf(b"[]").unwrap_err();
        assert!(matches!(e, Error::Key { .. }));
    }

    #[test]
    fn unsupported_models() {
        for (from, to) in [
            ("\"model_type\": \"llama\"", "\"model_type\": \"gpt2\""),
            ("\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\""),
            ("\"mlp_bias\": false", "\"mlp_bias\": true"),
            ("\"rope_type\": \"default\"", "\"rope_type\": \"yarn\""),
        ] {
            let e = LlamaArch::from_hf(FIXTURE_HF.replace(from, to).as_bytes()).unwrap_err();
            assert!(matches!(e, Error::Unsupported { .. }), "{to}: {e}");
        }
    }

    #[test]
    fn families_map_both_ways() {
        let with = |model_type: &str, extra: &str| {
            FIXTURE_HF.replace(
                "\"model_type\": \"llama\"",
                &format!("\"model_type\": \"{model_type}\"{extra}"),
            )
        };
        let cases = [
            ("mistral", ", \"sliding_window\": 4", Family::Mistral),
            ("qwen2", ", \"use_sliding_window\": false", Family::Qwen2),
            ("qwen3", "", Family::Qwen3),
        ];
        for (mt, extra, family) in cases {
            let a = LlamaArch::from_hf(with(mt, extra).as_bytes()).unwrap();
            assert_eq!(a.family, family);
            assert_eq!(a.qkv_bias, family == Family::Qwen2);
            assert_eq!(a.qk_layernorm, family == Family::Qwen3);
            assert_eq!(a.sliding_window, (family == Family::Mistral).then_some(4));
            let cfg = ModelConfig::parse(&nemo_config_yaml(&a, &target())).unwrap();
            let b = LlamaArch::from_nemo(&cfg, 100).unwrap();
            assert_eq!(
                b.family, family,
                "{mt}: the family follows from the NeMo keys"
            );
            assert_eq!(
                (b.qkv_bias, b.qk_layernorm, b.sliding_window),
                (a.qkv_bias, a.qk_layernorm, a.sliding_window)
            );
            let json: Value = serde_json::from_str(&b.to_hf_json()).unwrap();
            assert_eq!(json["model_type"], mt);
        }
        let mistral =
            LlamaArch::from_hf(with("mistral", ", \"sliding_window\": 4").as_bytes()).unwrap();
        assert!(nemo_config_yaml(&mistral, &target()).contains("window_size: [3, 0]\n"));
    }

    #[test]
    fn gemma_families_map_both_ways() {
        let with = |model_type: &str, extra: &str| {
            FIXTURE_HF.replace(
                "\"model_type\": \"llama\"",
                &format!("\"model_type\": \"{model_type}\", \"sliding_window\": 4{extra}"),
            )
        };
        // the fixture has 2 layers: Gemma 2's default pattern windows layer 1 of 2
        let g2 = LlamaArch::from_hf(with("gemma2", "").as_bytes()).unwrap();
        let g = g2.gemma.clone().unwrap();
        assert_eq!(
            (g.windowed.clone(), g.attn_softcap, g.final_softcap),
            (vec![true, false], Some(50.0), Some(30.0))
        );
        assert_eq!((g.query_pre_attn_scalar, g.local_rope_theta), (256.0, None));
        assert!(!g2.qk_layernorm);
        let yaml = nemo_config_yaml(&g2, &target());
        for line in [
            "window_size: [3, 0]\n",
            "window_attn_skip_freq: 2\n",
            "activation: fast-geglu\n",
            "openai_gelu: true\n",
            "layernorm_zero_centered_gamma: true\n",
            "query_pre_attn_scalar: 256.0\n",
            "final_logit_softcapping: 30.0\n",
        ] {
            assert!(yaml.contains(line), "{line}");
        }
        let b = LlamaArch::from_nemo(&ModelConfig::parse(&yaml).unwrap(), 100).unwrap();
        assert_eq!((b.family, &b.gemma), (Family::Gemma2, &g2.gemma));
        let json: Value = serde_json::from_str(&b.to_hf_json()).unwrap();
        assert_eq!(json["hidden_activation"], "gelu_pytorch_tanh");
        assert_eq!(
            json["query_pre_attn_scalar"], 256,
            "an integer, as transformers types it"
        );
        assert_eq!(
            json["layer_types"],
            serde_json::json!(["sliding_attention", "full_attention"])
        );

        // Gemma 3: per-layer-type RoPE, no caps, q/k norms; a pattern no period describes
        let rope = ", \"rope_parameters\": {\"full_attention\": {\"rope_type\": \"linear\", \"factor\": 8.0, \"rope_theta\": 1000000.0}, \"sliding_attention\": {\"rope_type\": \"default\", \"rope_theta\": 10000.0}}, \"layer_types\": [\"full_attention\", \"sliding_attention\"]";
        let fixture_rope = "\"rope_parameters\": {\n    \"rope_theta\": 10000.0,\n    \"rope_type\": \"default\"\n  },";
        let text = with("gemma3_text", rope).replace(fixture_rope, "");
        assert!(!text.contains(fixture_rope));
        let g3 = LlamaArch::from_hf(text.as_bytes()).unwrap();
        let g = g3.gemma.clone().unwrap();
        assert_eq!(
            (g.attn_softcap, g.final_softcap, g.local_rope_theta),
            (None, None, Some(10000.0))
        );
        assert_eq!(
            (g3.rope_theta, &g3.rope_scaling),
            (1e6, &RopeScaling::Linear { factor: 8.0 })
        );
        assert!(g3.qk_layernorm);
        let yaml = nemo_config_yaml(&g3, &target());
        assert!(yaml.contains("window_attn_skip_freq: [0, 1]\n"), "{yaml}");
        assert!(
            yaml.contains("rope_local_base_freq: 10000.0\n")
                && yaml.contains("seq_len_interpolation_factor: 8.0\n")
        );
        let b = LlamaArch::from_nemo(&ModelConfig::parse(&yaml).unwrap(), 100).unwrap();
        assert_eq!(
            (b.family, &b.gemma, &b.rope_scaling),
            (Family::Gemma3, &g3.gemma, &g3.rope_scaling)
        );
        let json: Value = serde_json::from_str(&b.to_hf_json()).unwrap();
        assert_eq!(
            json["rope_parameters"]["sliding_attention"]["rope_theta"],
            10000.0
        );
        assert_eq!(json["rope_parameters"]["full_attention"]["factor"], 8.0);
        assert!(json.get("rope_scaling").is_none() && json.get("rope_theta").is_none());
    }

    #[test]
    fn moe_families_map_both_ways() {
        let with = |model_type: &str, extra: &str| {
            FIXTURE_HF.replace(
                "\"model_type\": \"llama\"",
                &format!("\"model_type\": \"{model_type}\", \"num_experts_per_tok\": 2{extra}"),
            )
        };
        let mixtral = with(
            "mixtral",
            ", \"num_local_experts\": 8, \"router_aux_loss_coef\": 0.001",
        );
        let qwen = with(
            "qwen3_moe",
            ", \"num_experts\": 4, \"moe_intermediate_size\": 32, \"norm_topk_prob\": false",
        );
        for (text, family, want) in [
            (&mixtral, Family::Mixtral, (8, 2, 96, false)),
            (&qwen, Family::Qwen3Moe, (4, 2, 32, true)),
        ] {
            let a = LlamaArch::from_hf(text.as_bytes()).unwrap();
            let m = a.moe.clone().unwrap();
            assert_eq!((m.experts, m.topk, m.ffn, m.pre_softmax), want);
            let yaml = nemo_config_yaml(&a, &target());
            assert!(
                yaml.contains(&format!("num_moe_experts: {}\n", want.0)),
                "{yaml}"
            );
            let b = LlamaArch::from_nemo(&ModelConfig::parse(&yaml).unwrap(), 100).unwrap();
            assert_eq!((b.family, &b.moe), (family, &a.moe));
            let json: Value = serde_json::from_str(&b.to_hf_json()).unwrap();
            assert_eq!(json["num_local_experts"], want.0);
        }
        assert_eq!(
            LlamaArch::from_hf(mixtral.as_bytes())
                .unwrap()
                .moe
                .unwrap()
                .aux_loss_coeff,
            0.001
        );
        for (text, why) in [
            (
                with(
                    "qwen3_moe",
                    ", \"num_experts\": 4, \"moe_intermediate_size\": 32, \"mlp_only_layers\": [1]",
                ),
                "dense layers",
            ),
            (
                with(
                    "mixtral",
                    ", \"num_local_experts\": 4, \"router_jitter_noise\": 0.1",
                ),
                "router_jitter_noise",
            ),
        ] {
            let e = LlamaArch::from_hf(text.as_bytes()).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
        let e = LlamaArch::from_hf(with("mixtral", ", \"num_local_experts\": 1").as_bytes())
            .unwrap_err();
        assert!(
            matches!(&e, Error::Key { key, .. } if key == "num_experts_per_tok"),
            "{e}"
        );
    }

    #[test]
    fn family_features_without_a_mapping_are_refused() {
        let with = |model_type: &str, extra: &str| {
            FIXTURE_HF
                .replace(
                    "\"model_type\": \"llama\"",
                    &format!("\"model_type\": \"{model_type}\"{extra}"),
                )
                .replace("\"attention_bias\": false,", "")
                .replace("\"mlp_bias\": false,", "")
        };
        for (mt, extra, want) in [
            (
                "qwen2",
                ", \"use_sliding_window\": true",
                "sliding-window layers",
            ),
            (
                "qwen3",
                ", \"layer_types\": [\"full_attention\", \"sliding_attention\"]",
                "sliding-window layers",
            ),
            (
                "qwen3",
                ", \"attention_bias\": true",
                "covers every linear layer",
            ),
            ("gemma", "", "model_type `gemma`"),
            (
                "gemma2",
                ", \"sliding_window\": 4, \"hidden_activation\": \"gelu\"",
                "hidden_activation `gelu`",
            ),
            (
                "gemma3_text",
                ", \"sliding_window\": 4, \"use_bidirectional_attention\": true",
                "use_bidirectional_attention",
            ),
            (
                "gemma2",
                ", \"sliding_window\": 4, \"layer_types\": [\"chunked_attention\", \"full_attention\"]",
                "layer type",
            ),
            ("phimoe", "", "model_type `phimoe`"),
        ] {
            let e = LlamaArch::from_hf(with(mt, extra).as_bytes()).unwrap_err();
            assert!(
                matches!(e, Error::Unsupported { .. }) && e.to_string().contains(want),
                "{mt}{extra}: {e}"
            );
        }
        let e =
            LlamaArch::from_hf(with("mistral", ", \"sliding_window\": 0").as_bytes()).unwrap_err();
        assert!(
            matches!(&e, Error::Key { key, .. } if key == "sliding_window"),
            "{e}"
        );
        // NeMo keys no Hugging Face family has together
        for extra in [
            "qkv_bias: true\nqk_layernorm: true\n",
            "qk_layernorm: true\nwindow_size: [3, 0]\n",
            "window_size: [3, 2]\n",
            // Gemma's keys without GeGLU, or GeGLU without them
            "layernorm_zero_centered_gamma: true\n",
            "window_size: [3, 0]\nwindow_attn_skip_freq: 2\n",
            "final_logit_softcapping: 30.0\n",
        ] {
            let text = format!(
                "normalization: rmsnorm\nactivation: fast-swiglu\nposition_embedding_type: rope\nnum_layers: 1\nhidden_size: 8\nffn_hidden_size: 8\nnum_attention_heads: 2\nnum_query_groups: 2\nkv_channels: 4\nbias: false\n{extra}"
            );
            let e = LlamaArch::from_nemo(&ModelConfig::parse(&text).unwrap(), 10).unwrap_err();
            assert!(matches!(e, Error::Nemo { .. }), "{extra}: {e}");
        }
    }

    #[test]
    fn nemo_errors() {
        let cfg = ModelConfig::parse("normalization: layernorm\n").unwrap();
        let e = LlamaArch::from_nemo(&cfg, 10).unwrap_err();
        assert!(
            matches!(&e, Error::Nemo { key, .. } if key == "normalization"),
            "{e}"
        );
    }

    #[test]
    fn yaml_floats_are_pyyaml_floats() {
        assert_eq!(yaml_float(1e-5), "1.0e-05");
        assert_eq!(yaml_float(1e-6), "1.0e-06");
        assert_eq!(yaml_float(500000.0), "500000.0");
        assert_eq!(yaml_float(0.02), "0.02");
        assert_eq!(yaml_float(1e20), "1.0e+20");
        assert_eq!(yaml_float(8.0), "8.0");
    }
}
