//! The architecture of a Megatron-Core GPT as the engine needs it, read from a NeMo
//! `model_config.yaml` ([`ModelConfig`]) plus the launch TP size, checked once so the model
//! code never has to re-validate.

use serde_yaml_ng::Value;

use crate::model::config::{self, ModelConfig};

/// megatron-core's MoELayer as the engine computes it: SequentialMLP experts (expert
/// parallelism 1, expert TP = TP), a softmax top-k router without capacity or token dropping.
#[derive(Debug, Clone, PartialEq)]
pub struct Moe {
    /// `num_moe_experts`.
    pub experts: i64,
    /// `moe_router_topk`.
    pub topk: i64,
    /// `moe_ffn_hidden_size` (default `ffn_hidden_size`).
    pub ffn: i64,
    /// `moe_router_pre_softmax`: softmax over every expert, then the top k (Qwen3-MoE with
    /// `norm_topk_prob: false`); else top-k logits, then a softmax over them (Mixtral).
    pub pre_softmax: bool,
    /// `moe_aux_loss_coeff` (with `moe_router_load_balancing_type: aux_loss`).
    pub aux_loss_coeff: f64,
}

/// Gemma 2 / Gemma 3 features, each off by default (NeMo 2 / Megatron-Bridge key names where
/// they have one; docs/convert.md lists them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gemma {
    /// `scale_embedding`: embeddings multiplied by `sqrt(hidden_size)` (in the model dtype).
    pub scale_embedding: bool,
    /// `post_layernorm`: a norm after attention and after the MLP, before each residual add
    /// (`self_attention.linear_proj.post_layernorm`, `mlp.linear_fc2.post_layernorm`).
    pub post_norms: bool,
    /// `query_pre_attn_scalar` (scale `1/sqrt(it)`) or `softmax_scale`.
    pub softmax_scale: Option<f64>,
    /// `attn_logit_softcapping`: scores become `cap * tanh(scores / cap)` before the mask.
    pub attn_softcap: Option<f64>,
    /// `final_logit_softcapping`: logits become `cap * tanh(logits / cap)`.
    pub final_softcap: Option<f64>,
    /// `rope_local_base_freq`: the RoPE base of windowed layers (Gemma 3; no scaling).
    pub local_rope_base: Option<f64>,
}

/// Errors reading an architecture.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A typed config accessor failed.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// A key the engine reads has an unusable value.
    #[error("model_config.yaml: {key}: {value}: {why}")]
    Invalid {
        /// Dotted key.
        key: &'static str,
        /// The value, as text.
        value: String,
        /// Why.
        why: String,
    },
}

/// Normalisation layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Norm {
    /// `torch.nn.RMSNorm`.
    Rms,
    /// `torch.nn.LayerNorm`.
    LayerNorm,
    /// LayerNorm with a zero-centred weight (applied as `1 + w`).
    LayerNorm1p,
    /// RMSNorm with a zero-centred weight (`layernorm_zero_centered_gamma`, Gemma).
    Rms1p,
}

/// MLP activation (of the gate, for gated MLPs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (swiglu).
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// tanh-approximated GELU (`openai_gelu`).
    GeluTanh,
    /// ReLU (reglu / relu).
    Relu,
    /// ReLU squared.
    SquaredRelu,
}

/// Llama-3 style RoPE frequency scaling (mcore `RotaryEmbedding._apply_scaling`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeScaling {
    /// `factor` (mcore `rope_scaling_factor`, default 8).
    pub factor: f64,
    /// `low_freq_factor` (1).
    pub low_freq_factor: f64,
    /// `high_freq_factor` (4).
    pub high_freq_factor: f64,
    /// `original_max_position_embeddings` (8192).
    pub original_max_position_embeddings: f64,
}

/// Position encoding.
#[derive(Debug, Clone, PartialEq)]
pub enum Positions {
    /// Learned absolute embeddings with this many rows.
    Learned {
        /// `max_position_embeddings`.
        max: u64,
    },
    /// Rotary embeddings.
    Rope {
        /// Rotated channels per head (`kv_channels * rotary_percentage`, even).
        rot_dim: u64,
        /// `rotary_base`.
        base: f64,
        /// `rotary_interleaved` (false = rotate-half).
        interleaved: bool,
        /// `seq_len_interpolation_factor`: positions are divided by it.
        interpolation: Option<f64>,
        /// Llama-3 scaling.
        scaling: Option<RopeScaling>,
    },
    /// No position encoding.
    None,
}

/// A GPT architecture at one launch TP size.
#[derive(Debug, Clone, PartialEq)]
pub struct GptSpec {
    /// Layers.
    pub num_layers: usize,
    /// Hidden size H.
    pub hidden: i64,
    /// MLP hidden size F (per half when gated).
    pub ffn: i64,
    /// Attention heads.
    pub heads: i64,
    /// Query groups (= heads for MHA).
    pub groups: i64,
    /// Per-head dim.
    pub head_dim: i64,
    /// Norm kind.
    pub norm: Norm,
    /// Norm epsilon.
    pub eps: f64,
    /// Gated MLP (`[gate; up]` fc1).
    pub gated: bool,
    /// Activation.
    pub activation: Activation,
    /// Linear-layer biases.
    pub bias: bool,
    /// The fused QKV has a bias (with `bias`, or alone: `qkv_bias` / `add_qkv_bias`, Qwen2).
    pub qkv_bias: bool,
    /// Per-head norm of queries and keys before RoPE (`qk_layernorm`, Qwen3), of the model's
    /// norm kind over `head_dim`.
    pub qk_layernorm: bool,
    /// Sliding-window attention (`window_size: [left, right]`): a query at `i` sees keys
    /// `i - left ..= i + right` (causal: right is 0).
    pub window: Option<(i64, i64)>,
    /// Which layers use the window (`window_attn_skip_freq`, megatron-core's
    /// `is_layer_window_attention`); empty: every layer.
    pub window_layers: Vec<bool>,
    /// Gemma's architecture beyond the Llama shape.
    pub gemma: Gemma,
    /// Mixture-of-experts MLPs in every layer (`num_moe_experts`).
    pub moe: Option<Moe>,
    /// Position encoding.
    pub positions: Positions,
    /// Tied input/output embeddings.
    pub tied: bool,
    /// Padded vocabulary (global rows of the embedding/output layer).
    pub padded_vocab: i64,
    /// `init_method_std`.
    pub init_std: f64,
    /// `use_scaled_init_method`: output projections use `std / sqrt(2 * num_layers)`.
    pub scaled_init: bool,
    /// Launch TP size.
    pub tp: i64,
}

fn invalid(key: &'static str, value: impl ToString, why: impl Into<String>) -> Error {
    Error::Invalid {
        key,
        value: value.to_string(),
        why: why.into(),
    }
}

fn as_f64(cfg: &ModelConfig, key: &'static str) -> Result<Option<f64>, Error> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| invalid(key, n, "not a finite number")),
        Some(v) => Err(invalid(key, format!("{v:?}"), "expected a number")),
    }
}

fn as_bool(cfg: &ModelConfig, key: &'static str) -> Result<Option<bool>, Error> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(invalid(key, format!("{v:?}"), "expected a boolean")),
    }
}

fn to_i64(key: &'static str, v: u64) -> Result<i64, Error> {
    i64::try_from(v).map_err(|_| invalid(key, v, "too large"))
}

impl GptSpec {
    /// Reads the architecture for launch TP size `tp` with `padded_vocab` embedding rows.
    ///
    /// # Errors
    /// Missing required keys, unsupported values (pipeline parallelism, a TP size that does
    /// not divide heads / query groups / ffn / vocab, unknown normalisation or activation).
    pub fn from_config(cfg: &ModelConfig, tp: u64, padded_vocab: u64) -> Result<GptSpec, Error> {
        let tp_i = to_i64("tensor_model_parallel_size", tp)?;
        if tp_i < 1 {
            return Err(invalid(
                "tensor_model_parallel_size",
                tp,
                "launch TP must be at least 1",
            ));
        }
        let num_layers = usize::try_from(cfg.num_layers()?)
            .map_err(|_| invalid("num_layers", "?", "too large"))?;
        let hidden = to_i64("hidden_size", cfg.hidden_size()?)?;
        let ffn = to_i64("ffn_hidden_size", cfg.ffn_hidden_size()?)?;
        let heads = to_i64("num_attention_heads", cfg.num_attention_heads()?)?;
        let groups = to_i64("num_query_groups", cfg.num_query_groups()?)?;
        let head_dim = to_i64("kv_channels", cfg.kv_channels()?)?;
        let padded_vocab = to_i64("padded vocab", padded_vocab)?;
        if groups < 1 || heads % groups != 0 {
            return Err(invalid(
                "num_query_groups",
                groups,
                format!("must divide num_attention_heads={heads}"),
            ));
        }
        // A rank must own whole query groups: mcore's groups < TP path all-gathers QKV and
        // re-selects heads, which the engine does not implement.
        if groups % tp_i != 0 {
            return Err(invalid(
                "num_query_groups",
                groups,
                format!("must be a multiple of the launch TP size {tp}"),
            ));
        }
        if ffn % tp_i != 0 {
            return Err(invalid(
                "ffn_hidden_size",
                ffn,
                format!("must be a multiple of the launch TP size {tp}"),
            ));
        }
        if padded_vocab % tp_i != 0 || padded_vocab < 1 {
            return Err(invalid(
                "make_vocab_size_divisible_by",
                padded_vocab,
                format!("padded vocab must be a positive multiple of TP={tp}"),
            ));
        }
        let zero_centered = as_bool(cfg, "layernorm_zero_centered_gamma")?.unwrap_or(false);
        let norm = match cfg.normalization() {
            "rmsnorm" if zero_centered => Norm::Rms1p,
            "rmsnorm" => Norm::Rms,
            "layernorm" if zero_centered => Norm::LayerNorm1p,
            "layernorm" => Norm::LayerNorm,
            "layernorm1p" => Norm::LayerNorm1p,
            other => {
                return Err(invalid(
                    "normalization",
                    other,
                    "expected rmsnorm, layernorm or layernorm1p",
                ))
            }
        };
        let eps = as_f64(cfg, "layernorm_epsilon")?.unwrap_or(1e-5);
        let openai_gelu = as_bool(cfg, "openai_gelu")?.unwrap_or(false);
        let act_name = cfg.activation().trim_start_matches("fast-");
        let activation = match act_name {
            "swiglu" | "silu" => Activation::Silu,
            "gelu" | "geglu" => {
                if openai_gelu {
                    Activation::GeluTanh
                } else {
                    Activation::Gelu
                }
            }
            "approx-gelu" => Activation::GeluTanh,
            "reglu" | "relu" => Activation::Relu,
            "squared-relu" => Activation::SquaredRelu,
            other => return Err(invalid("activation", other, "unsupported activation")),
        };
        let positions = match cfg.position_embedding_type() {
            "learned_absolute" => Positions::Learned {
                max: cfg
                    .get("max_position_embeddings")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| {
                        invalid(
                            "max_position_embeddings",
                            "null",
                            "required for learned_absolute",
                        )
                    })?,
            },
            "rope" => {
                let pct = as_f64(cfg, "rotary_percentage")?.unwrap_or(1.0);
                if !(pct > 0.0 && pct <= 1.0) {
                    return Err(invalid("rotary_percentage", pct, "must be in (0, 1]"));
                }
                // mcore: dim = int(kv_channels * rotary_percent)
                let rot_dim = ((head_dim as f64) * pct) as u64;
                if rot_dim == 0 || rot_dim % 2 != 0 {
                    return Err(invalid(
                        "rotary_percentage",
                        pct,
                        format!("rotated dim {rot_dim} must be even and non-zero"),
                    ));
                }
                Positions::Rope {
                    rot_dim,
                    base: as_f64(cfg, "rotary_base")?.unwrap_or(10000.0),
                    interleaved: as_bool(cfg, "rotary_interleaved")?.unwrap_or(false),
                    interpolation: as_f64(cfg, "seq_len_interpolation_factor")?,
                    scaling: rope_scaling(cfg)?,
                }
            }
            "none" => Positions::None,
            other => {
                return Err(invalid(
                    "position_embedding_type",
                    other,
                    "expected rope, learned_absolute or none",
                ))
            }
        };
        let bias = cfg.bias();
        let qkv_bias = bias
            || as_bool(cfg, "qkv_bias")?.unwrap_or(false)
            || as_bool(cfg, "add_qkv_bias")?.unwrap_or(false);
        let qk_layernorm = as_bool(cfg, "qk_layernorm")?.unwrap_or(false);
        let window = match cfg.get("window_size") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let pair = v.as_sequence().and_then(|s| match s.as_slice() {
                    [a, b] => Some((a.as_i64()?, b.as_i64()?)),
                    _ => None,
                });
                match pair {
                    Some((left, 0)) if left >= 0 => Some((left, 0)),
                    _ => {
                        return Err(invalid(
                            "window_size",
                            format!("{v:?}"),
                            "expected [left, 0] with left >= 0 (a causal sliding window)",
                        ))
                    }
                }
            }
        };
        let moe = moe_of(cfg, ffn, tp_i)?;
        let window_layers = match window {
            Some(_) => cfg
                .window_attn_layers(num_layers as u64)?
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let gemma = gemma_of(cfg)?;
        Ok(GptSpec {
            num_layers,
            hidden,
            ffn,
            heads,
            groups,
            head_dim,
            norm,
            eps,
            gated: cfg.is_gated(),
            activation,
            bias,
            qkv_bias,
            qk_layernorm,
            window,
            window_layers,
            gemma,
            moe,
            positions,
            tied: cfg.share_embeddings_and_output_weights(),
            padded_vocab,
            init_std: as_f64(cfg, "init_method_std")?.unwrap_or(0.02),
            scaled_init: as_bool(cfg, "use_scaled_init_method")?.unwrap_or(true),
            tp: tp_i,
        })
    }

    /// Heads per query group.
    pub fn heads_per_group(&self) -> i64 {
        self.heads / self.groups
    }

    /// Rows of the fused QKV weight (global).
    pub fn qkv_rows(&self) -> i64 {
        (self.heads + 2 * self.groups) * self.head_dim
    }
}

/// The MoE settings, refusing what the engine does not compute (never dropping it).
fn gemma_of(cfg: &ModelConfig) -> Result<Gemma, Error> {
    let positive = |key: &'static str| -> Result<Option<f64>, Error> {
        match as_f64(cfg, key)? {
            Some(x) if !(x > 0.0 && x.is_finite()) => Err(invalid(key, x, "must be positive")),
            x => Ok(x),
        }
    };
    let softmax_scale = match (
        positive("query_pre_attn_scalar")?,
        positive("softmax_scale")?,
    ) {
        (Some(q), None) => Some(1.0 / q.sqrt()),
        (None, s) => s,
        (Some(_), Some(_)) => {
            return Err(invalid(
                "softmax_scale",
                "set",
                "give query_pre_attn_scalar or softmax_scale, not both",
            ))
        }
    };
    Ok(Gemma {
        scale_embedding: as_bool(cfg, "scale_embedding")?.unwrap_or(false),
        post_norms: as_bool(cfg, "post_layernorm")?.unwrap_or(false),
        softmax_scale,
        attn_softcap: positive("attn_logit_softcapping")?,
        final_softcap: positive("final_logit_softcapping")?,
        local_rope_base: positive("rope_local_base_freq")?,
    })
}

fn moe_of(cfg: &ModelConfig, ffn: i64, tp: i64) -> Result<Option<Moe>, Error> {
    let experts = match cfg.get("num_moe_experts") {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => match v.as_i64() {
            Some(0) => return Ok(None),
            Some(n) if n > 0 => n,
            _ => return Err(invalid("num_moe_experts", format!("{v:?}"), "not a count")),
        },
    };
    let int = |k: &'static str| -> Result<Option<i64>, Error> {
        match cfg.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| invalid(k, format!("{v:?}"), "not an integer")),
        }
    };
    let topk = int("moe_router_topk")?.unwrap_or(2);
    if topk < 1 || topk > experts {
        return Err(invalid(
            "moe_router_topk",
            topk,
            format!("must be in 1..={experts}"),
        ));
    }
    let ffn = int("moe_ffn_hidden_size")?.unwrap_or(ffn);
    if ffn % tp != 0 {
        return Err(invalid(
            "moe_ffn_hidden_size",
            ffn,
            format!("must be a multiple of the launch TP size {tp}"),
        ));
    }
    let set = |k: &str| {
        cfg.get(k)
            .filter(|v| !v.is_null() && v.as_bool() != Some(false))
    };
    for (key, why) in [
        ("moe_shared_expert_intermediate_size", "shared experts"),
        ("moe_router_topk_scaling_factor", "a top-k scaling factor"),
        (
            "moe_expert_capacity_factor",
            "expert capacity (token dropping)",
        ),
        ("moe_router_num_groups", "group-limited routing"),
        ("moe_router_enable_expert_bias", "a router expert bias"),
        (
            "moe_grouped_gemm",
            "grouped-GEMM experts (TEGroupedMLP names)",
        ),
    ] {
        if let Some(v) = set(key) {
            return Err(invalid(
                key,
                format!("{v:?}"),
                format!("{why}: not supported by the engine (SequentialMLP experts with a plain softmax top-k router are)"),
            ));
        }
    }
    match int("moe_layer_freq")? {
        None | Some(1) => {}
        Some(f) => {
            return Err(invalid(
                "moe_layer_freq",
                f,
                "only MoE in every layer (1) is supported",
            ))
        }
    }
    match int("expert_model_parallel_size")? {
        None | Some(1) => {}
        Some(n) => {
            return Err(invalid(
                "expert_model_parallel_size",
                n,
                "expert parallelism is not supported yet (1)",
            ))
        }
    }
    if let Some(v) = cfg.get("moe_router_score_function").and_then(Value::as_str) {
        if v != "softmax" {
            return Err(invalid(
                "moe_router_score_function",
                v,
                "only softmax is supported",
            ));
        }
    }
    Ok(Some(Moe {
        experts,
        topk,
        ffn,
        pre_softmax: as_bool(cfg, "moe_router_pre_softmax")?.unwrap_or(false),
        aux_loss_coeff: as_f64(cfg, "moe_aux_loss_coeff")?.unwrap_or(0.0),
    }))
}

/// Llama-3 scaling: mcore's `rope_scaling: true` (+ `rope_scaling_factor`), NeMo's
/// `scale_positional_embedding: true`, or an HF-style `rope_scaling:` mapping with
/// `rope_type: llama3`.
fn rope_scaling(cfg: &ModelConfig) -> Result<Option<RopeScaling>, Error> {
    let mut s = RopeScaling {
        factor: as_f64(cfg, "rope_scaling_factor")?.unwrap_or(8.0),
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    match cfg.get("rope_scaling") {
        Some(Value::Bool(true)) => return Ok(Some(s)),
        Some(Value::Mapping(m)) => {
            let num = |k: &str| m.get(k).and_then(Value::as_f64);
            if let Some(v) = num("factor") {
                s.factor = v;
            }
            if let Some(v) = num("low_freq_factor") {
                s.low_freq_factor = v;
            }
            if let Some(v) = num("high_freq_factor") {
                s.high_freq_factor = v;
            }
            if let Some(v) = num("original_max_position_embeddings") {
                s.original_max_position_embeddings = v;
            }
            if s.high_freq_factor == s.low_freq_factor || s.factor == 0.0 {
                return Err(invalid(
                    "rope_scaling",
                    format!("{m:?}"),
                    "factor must be non-zero and high_freq_factor != low_freq_factor",
                ));
            }
            return Ok(Some(s));
        }
        _ => {}
    }
    if as_bool(cfg, "scale_positional_embedding")?.unwrap_or(false) {
        return Ok(Some(s));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str =
        "num_layers: 2\nhidden_size: 64\nffn_hidden_size: 96\nnum_attention_heads: 8\n\
         num_query_groups: 2\nkv_channels: 8\nnormalization: rmsnorm\nactivation: fast-swiglu\n\
         bias: false\nposition_embedding_type: rope\nshare_embeddings_and_output_weights: false\n";

    fn llama() -> ModelConfig {
        ModelConfig::parse(LLAMA).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn qwen_and_mistral_features() {
        let with = |extra: &str| {
            let text = format!("{LLAMA}{extra}");
            GptSpec::from_config(
                &ModelConfig::parse(&text).unwrap_or_else(|e| panic!("{e}")),
                1,
                128,
            )
        };
        let s = with("qkv_bias: true\nqk_layernorm: true\nwindow_size: [3, 0]\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(s.qkv_bias && s.qk_layernorm && !s.bias);
        assert_eq!(s.window, Some((3, 0)));
        let s = with("add_qkv_bias: true\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(s.qkv_bias && s.window.is_none());
        for (extra, key) in [
            ("window_size: [3, 2]\n", "window_size"),
            ("window_size: 4\n", "window_size"),
            (
                "window_size: [3, 0]\nwindow_attn_skip_freq: [1, 0, 1]\n",
                "window_attn_skip_freq",
            ),
            (
                "window_size: [3, 0]\nwindow_attn_skip_freq: 0\n",
                "window_attn_skip_freq",
            ),
            ("attn_logit_softcapping: -1.0\n", "attn_logit_softcapping"),
            (
                "query_pre_attn_scalar: 16\nsoftmax_scale: 0.25\n",
                "softmax_scale",
            ),
            (
                "num_moe_experts: 8\nmoe_router_topk: 9\n",
                "moe_router_topk",
            ),
            (
                "num_moe_experts: 8\nmoe_shared_expert_intermediate_size: 16\n",
                "moe_shared_expert_intermediate_size",
            ),
            (
                "num_moe_experts: 8\nexpert_model_parallel_size: 2\n",
                "expert_model_parallel_size",
            ),
            ("num_moe_experts: 8\nmoe_layer_freq: 2\n", "moe_layer_freq"),
            (
                "num_moe_experts: 8\nmoe_router_score_function: sigmoid\n",
                "moe_router_score_function",
            ),
        ] {
            let e = with(extra).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(key), "{extra}: {e}");
        }
        assert!(with("num_moe_experts: null\n").is_ok_and(|s| s.moe.is_none()));
        // Gemma 2: every second layer windowed (1-based numbers not a multiple of 2)
        let s = with(
            "layernorm_zero_centered_gamma: true\nwindow_size: [3, 0]\nwindow_attn_skip_freq: 2\n\
             scale_embedding: true\npost_layernorm: true\nquery_pre_attn_scalar: 16\n\
             attn_logit_softcapping: 50.0\nfinal_logit_softcapping: 30.0\nrope_local_base_freq: 10000\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (s.norm, s.window_layers.clone()),
            (Norm::Rms1p, vec![true, false])
        );
        assert_eq!(
            s.gemma,
            Gemma {
                scale_embedding: true,
                post_norms: true,
                softmax_scale: Some(0.25),
                attn_softcap: Some(50.0),
                final_softcap: Some(30.0),
                local_rope_base: Some(10000.0),
            }
        );
        let s = with("window_size: [3, 0]\nwindow_attn_skip_freq: [0, 1]\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.window_layers, vec![false, true]);
        let s = with("num_moe_experts: 4\nmoe_router_topk: 2\nmoe_ffn_hidden_size: 32\nmoe_router_pre_softmax: true\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            s.moe,
            Some(Moe {
                experts: 4,
                topk: 2,
                ffn: 32,
                pre_softmax: true,
                aux_loss_coeff: 0.0
            })
        );
    }

    #[test]
    fn reads_the_tiny_llama() {
        let s = GptSpec::from_config(&llama(), 2, 128).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (s.hidden, s.ffn, s.heads, s.groups, s.head_dim),
            (64, 96, 8, 2, 8)
        );
        assert_eq!(s.norm, Norm::Rms);
        assert!(s.gated && !s.bias && !s.tied);
        assert_eq!(s.activation, Activation::Silu);
        assert_eq!(s.qkv_rows(), 96);
        assert!(matches!(
            s.positions,
            Positions::Rope {
                rot_dim: 8,
                scaling: None,
                ..
            }
        ));
    }

    #[test]
    fn refuses_groups_not_divisible_by_tp() {
        let e = GptSpec::from_config(&llama(), 4, 128)
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("num_query_groups")));
    }

    #[test]
    fn reads_llama3_scaling() {
        let c = ModelConfig::parse(&format!(
            "{}rope_scaling:\n  factor: 32.0\n  rope_type: llama3\n",
            llama().text()
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let s = GptSpec::from_config(&c, 1, 128).unwrap_or_else(|e| panic!("{e}"));
        let Positions::Rope {
            scaling: Some(sc), ..
        } = s.positions
        else {
            panic!("no scaling")
        };
        assert_eq!(sc.factor, 32.0);
    }

    #[test]
    fn refuses_unknown_activation() {
        let c = ModelConfig::parse(&llama().text().replace("fast-swiglu", "mish"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(GptSpec::from_config(&c, 1, 128).is_err());
    }
}
