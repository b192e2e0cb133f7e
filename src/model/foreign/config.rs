//! Architecture from the configs today's trainers save, translated to NeMo 1's
//! `model_config.yaml` keys (what the rest of nemo-tool reads):
//!
//! - NeMo 2's `context/model.yaml` (`config:` holds megatron-core `TransformerConfig` /
//!   NeMo `GPTConfig` fields; functions as `{_target_: ...}`),
//! - Megatron-Bridge's `run_config.yaml` (`model:` holds the same fields),
//! - Megatron-LM's pickled `args` (an `argparse.Namespace`: mostly the same names, plus
//!   `swiglu`, `untie_embeddings_and_output_weights`, `num_experts`, `norm_epsilon`, ...).
//!
//! Values are read, never classes instantiated: a `_target_` is only a name.

use std::collections::BTreeMap;

use crate::formats::torch::Value as Pickled;
use serde_yaml_ng::Value as Yaml;

/// A config value, from YAML or a pickle.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    /// null / None.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string, or a function / dtype named by `_target_` or a pickled global.
    Str(String),
    /// A list or tuple.
    List(Vec<Field>),
}

impl Field {
    fn as_u64(&self) -> Option<u64> {
        match self {
            Field::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }

    fn as_bool(&self) -> Option<bool> {
        match self {
            Field::Bool(b) => Some(*b),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Field::Str(s) => Some(s),
            _ => None,
        }
    }

    /// YAML flow text of the value.
    fn yaml(&self) -> String {
        match self {
            Field::Null => "null".into(),
            Field::Bool(b) => b.to_string(),
            Field::Int(i) => i.to_string(),
            Field::Float(f) => crate::model::config::yaml_float(*f),
            Field::Str(s) => serde_json::to_string(s).unwrap_or_else(|_| "null".into()),
            Field::List(v) => format!(
                "[{}]",
                v.iter().map(Field::yaml).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    fn from_yaml(v: &Yaml) -> Option<Field> {
        Some(match v {
            Yaml::Null => Field::Null,
            Yaml::Bool(b) => Field::Bool(*b),
            Yaml::Number(n) => match n.as_i64() {
                Some(i) => Field::Int(i),
                None => Field::Float(n.as_f64()?),
            },
            Yaml::String(s) => Field::Str(s.clone()),
            Yaml::Sequence(s) => Field::List(s.iter().filter_map(Field::from_yaml).collect()),
            // a function or class reference: its name
            Yaml::Mapping(m) => Field::Str(m.get("_target_")?.as_str()?.to_string()),
            Yaml::Tagged(t) => Field::from_yaml(&t.value)?,
        })
    }

    fn from_pickle(v: &Pickled) -> Option<Field> {
        Some(match v {
            Pickled::None => Field::Null,
            Pickled::Bool(b) => Field::Bool(*b),
            Pickled::Int(i) => Field::Int(*i),
            Pickled::Float(f) => Field::Float(*f),
            Pickled::Str(s) => Field::Str(s.clone()),
            Pickled::Tuple(v) | Pickled::List(v) => {
                Field::List(v.iter().filter_map(Field::from_pickle).collect())
            }
            Pickled::Global(g) => Field::Str(format!("{}.{}", g.module, g.name)),
            _ => return None,
        })
    }
}

/// Config fields under megatron-core's `TransformerConfig` names.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    map: BTreeMap<String, Field>,
}

/// Keys NeMo 1 spells as megatron-core does; copied as they are.
const SAME_NAME: &[&str] = &[
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "init_method_std",
    "layernorm_epsilon",
    "layernorm_zero_centered_gamma",
    "make_vocab_size_divisible_by",
    "qk_layernorm",
    "rotary_base",
    "rotary_interleaved",
    "seq_len_interpolation_factor",
    "max_position_embeddings",
    "position_embedding_type",
    "share_embeddings_and_output_weights",
    "window_size",
    "window_attn_skip_freq",
    "softmax_scale",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "rope_local_base_freq",
    "num_moe_experts",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "moe_router_pre_softmax",
    "moe_aux_loss_coeff",
    "moe_grouped_gemm",
    "moe_layer_freq",
    "moe_router_score_function",
    "moe_router_topk_scaling_factor",
    "moe_router_enable_expert_bias",
    "moe_router_num_groups",
    "moe_shared_expert_intermediate_size",
    "moe_router_load_balancing_type",
    "moe_token_dispatcher_type",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
    "virtual_pipeline_model_parallel_size",
];

impl Fields {
    /// The fields of a NeMo 2 `model.yaml` (its `config:` mapping) or a Megatron-Bridge
    /// `run_config.yaml` (its `model:` mapping).
    pub fn from_yaml_section(section: &Yaml) -> Fields {
        let mut map = BTreeMap::new();
        if let Some(m) = section.as_mapping() {
            for (k, v) in m {
                if let (Some(k), Some(f)) = (k.as_str(), Field::from_yaml(v)) {
                    map.insert(k.to_string(), f);
                }
            }
        }
        Fields { map }
    }

    /// The fields of Megatron-LM's pickled `args` (the attribute dict of its
    /// `argparse.Namespace`), renamed to megatron-core's names.
    pub fn from_mlm_args(attrs: &[(Pickled, Pickled)]) -> Fields {
        let mut map = BTreeMap::new();
        for (k, v) in attrs {
            if let (Some(k), Some(f)) = (k.as_str(), Field::from_pickle(v)) {
                map.insert(k.to_string(), f);
            }
        }
        let mut f = Fields { map };
        let get_bool = |f: &Fields, k: &str| f.map.get(k).and_then(Field::as_bool);
        if get_bool(&f, "swiglu") == Some(true) {
            f.set("gated_linear_unit", Field::Bool(true));
            f.set(
                "activation_func",
                Field::Str("torch.nn.functional.silu".into()),
            );
        } else if get_bool(&f, "squared_relu") == Some(true) {
            f.set("activation_func", Field::Str("squared_relu".into()));
        }
        if let Some(u) = get_bool(&f, "untie_embeddings_and_output_weights") {
            f.set("share_embeddings_and_output_weights", Field::Bool(!u));
        }
        if get_bool(&f, "group_query_attention") == Some(false) {
            f.set("num_query_groups", Field::Null);
        }
        if get_bool(&f, "apply_layernorm_1p") == Some(true) {
            f.set("layernorm_zero_centered_gamma", Field::Bool(true));
        }
        for (from, to) in [
            ("num_experts", "num_moe_experts"),
            ("norm_epsilon", "layernorm_epsilon"),
        ] {
            if let Some(v) = f.map.get(from).cloned() {
                f.map.entry(to.to_string()).or_insert(v);
            }
        }
        f
    }

    fn set(&mut self, k: &str, v: Field) {
        self.map.insert(k.to_string(), v);
    }

    /// These fields with `k` set to `v`.
    pub fn with(mut self, k: &str, v: Field) -> Fields {
        self.set(k, v);
        self
    }

    /// A field, if present.
    pub fn get(&self, k: &str) -> Option<&Field> {
        self.map.get(k)
    }

    /// An unsigned integer field.
    pub fn u64(&self, k: &str) -> Option<u64> {
        self.get(k).and_then(Field::as_u64)
    }

    /// A boolean field.
    pub fn bool(&self, k: &str) -> Option<bool> {
        self.get(k).and_then(Field::as_bool)
    }

    /// A string field.
    pub fn str(&self, k: &str) -> Option<&str> {
        self.get(k).and_then(Field::as_str)
    }

    /// NeMo 1's `activation` for megatron-core's `gated_linear_unit` + `activation_func`.
    fn activation(&self) -> Result<&'static str, String> {
        let gated = self.bool("gated_linear_unit").unwrap_or(false);
        let func = self.str("activation_func").unwrap_or("gelu");
        let name = func.rsplit('.').next().unwrap_or(func);
        Ok(match (name, gated) {
            ("silu", true) => "fast-swiglu",
            ("silu", false) => "silu",
            ("gelu" | "openai_gelu" | "gelu_impl" | "fast_gelu", true) => "fast-geglu",
            ("gelu" | "openai_gelu" | "gelu_impl" | "fast_gelu", false) => "gelu",
            ("relu", true) => "reglu",
            ("relu", false) => "relu",
            ("squared_relu", false) => "squared-relu",
            _ => {
                return Err(format!(
                    "activation_func `{func}` (gated_linear_unit {gated}) has no NeMo 1 name"
                ))
            }
        })
    }

    /// Whether tensors carry Transformer Engine's fused names.
    fn transformer_engine(&self) -> bool {
        if let Some(i) = self.str("transformer_impl") {
            return i == "transformer_engine";
        }
        !self
            .str("transformer_layer_spec")
            .is_some_and(|s| s.contains("local"))
    }

    /// NeMo 1 `model_config.yaml` text with `tokenizer_yaml` (the section's lines, indented by
    /// two spaces) and `override_vocab_size` when the embedding rows are pinned.
    ///
    /// # Errors
    /// A missing architecture key or an activation NeMo 1 cannot name, as text.
    pub fn nemo1_yaml(
        &self,
        tokenizer_yaml: &str,
        override_vocab_size: Option<u64>,
    ) -> Result<String, String> {
        for k in [
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
        ] {
            if self.u64(k).is_none() {
                return Err(format!("`{k}` is missing or not a number"));
            }
        }
        let mut out = String::from("mcore_gpt: true\nmicro_batch_size: 1\n");
        let mut put = |k: &str, v: String| {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(&v);
            out.push('\n');
        };
        let seq = self
            .get("seq_length")
            .or_else(|| self.get("max_position_embeddings"))
            .cloned();
        if let Some(s) = &seq {
            put("encoder_seq_length", s.yaml());
        }
        if self.get("max_position_embeddings").is_none() {
            if let Some(s) = &seq {
                put("max_position_embeddings", s.yaml());
            }
        }
        for k in SAME_NAME {
            if let Some(v) = self.get(k) {
                put(k, v.yaml());
            }
        }
        let norm = match self.str("normalization").unwrap_or("LayerNorm") {
            "RMSNorm" | "rmsnorm" => "rmsnorm",
            _ => "layernorm",
        };
        put("normalization", norm.into());
        put("activation", self.activation()?.into());
        if let Some(b) = self.bool("add_bias_linear") {
            put("bias", b.to_string());
        }
        if let Some(b) = self.bool("add_qkv_bias") {
            put("qkv_bias", b.to_string());
        }
        if let Some(p) = self.get("rotary_percent") {
            put("rotary_percentage", p.yaml());
        }
        if let Some(v) = override_vocab_size {
            put("override_vocab_size", v.to_string());
        }
        let precision = match (
            self.str("params_dtype"),
            self.bool("bf16"),
            self.bool("fp16"),
        ) {
            (Some(d), _, _) if d.ends_with("bfloat16") => "bf16",
            (Some(d), _, _) if d.ends_with("float16") => "16",
            (_, Some(true), _) => "bf16",
            (_, _, Some(true)) => "16",
            _ => "32",
        };
        put("precision", precision.into());
        put("transformer_engine", self.transformer_engine().to_string());
        out.push_str("tokenizer:\n");
        out.push_str(tokenizer_yaml);
        out.push_str(
            "target: nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel\n",
        );
        Ok(out)
    }
}

/// NeMo 1 keys whose megatron-core name differs (NeMo 1 name, megatron-core name).
const RENAMED: &[(&str, &str)] = &[
    ("bias", "add_bias_linear"),
    ("qkv_bias", "add_qkv_bias"),
    ("rotary_percentage", "rotary_percent"),
    ("encoder_seq_length", "seq_length"),
];

/// The `_target_` of megatron-core's activation for a NeMo 1 `activation`.
fn activation_func(activation: &str) -> Option<(&'static str, bool)> {
    let a = activation.strip_prefix("fast-").unwrap_or(activation);
    Some(match a {
        "swiglu" => ("torch.nn.functional.silu", true),
        "silu" => ("torch.nn.functional.silu", false),
        "geglu" => ("torch.nn.functional.gelu", true),
        "gelu" => ("torch.nn.functional.gelu", false),
        "reglu" => ("torch.nn.functional.relu", true),
        "relu" => ("torch.nn.functional.relu", false),
        "squared-relu" => ("megatron.core.activations.squared_relu", false),
        _ => return None,
    })
}

/// A NeMo 2 `context/model.yaml` for a NeMo 1 config: a generic `GPTModel` whose `config:`
/// holds the megatron-core fields (functions and dtypes as `{_target_, _call_: false}` nodes,
/// as NeMo 2 dumps them), and a `tokenizer:` for the files under `context/` (`tokenizer` =
/// (`sentencepiece` | `huggingface`, path relative to `context/`)).
///
/// # Errors
/// An activation megatron-core has no function for.
pub fn nemo2_model_yaml(
    cfg: &crate::model::config::ModelConfig,
    tokenizer: Option<(&str, &str)>,
) -> Result<String, String> {
    let arch = |r: Result<u64, crate::model::config::Error>| r.map_err(|e| e.to_string());
    let mut out = String::from(
        "_target_: nemo.collections.llm.gpt.model.base.GPTModel\nconfig:\n  _target_: nemo.collections.llm.gpt.model.base.GPTConfig\n",
    );
    // the first write of a key wins: the typed values (NeMo's defaults applied) come first,
    // the raw copies after them skip what is already there
    let mut written: Vec<String> = Vec::new();
    let mut put = |k: &str, v: String| {
        if written.iter().any(|w| w == k) {
            return;
        }
        written.push(k.to_string());
        out.push_str("  ");
        out.push_str(k);
        // a nested node starts on the next line
        out.push_str(if v.starts_with('\n') { ":" } else { ": " });
        out.push_str(&v);
        out.push('\n');
    };
    put("num_layers", arch(cfg.num_layers())?.to_string());
    put("hidden_size", arch(cfg.hidden_size())?.to_string());
    put("ffn_hidden_size", arch(cfg.ffn_hidden_size())?.to_string());
    put(
        "num_attention_heads",
        arch(cfg.num_attention_heads())?.to_string(),
    );
    put(
        "num_query_groups",
        arch(cfg.num_query_groups())?.to_string(),
    );
    put("kv_channels", arch(cfg.kv_channels())?.to_string());
    let norm = if cfg.normalization() == "rmsnorm" {
        "RMSNorm"
    } else {
        "LayerNorm"
    };
    put("normalization", norm.into());
    let (func, gated) = activation_func(cfg.activation()).ok_or_else(|| {
        format!(
            "activation `{}` has no megatron-core function",
            cfg.activation()
        )
    })?;
    put("gated_linear_unit", gated.to_string());
    put(
        "activation_func",
        format!("\n    _target_: {func}\n    _call_: false"),
    );
    put("add_bias_linear", cfg.bias().to_string());
    put(
        "position_embedding_type",
        cfg.position_embedding_type().into(),
    );
    put(
        "share_embeddings_and_output_weights",
        cfg.share_embeddings_and_output_weights().to_string(),
    );
    put(
        "make_vocab_size_divisible_by",
        cfg.make_vocab_size_divisible_by().to_string(),
    );
    let yaml_of = |v: &Yaml| Field::from_yaml(v).map(|f| f.yaml());
    for k in SAME_NAME {
        if let Some(v) = cfg.get(k).and_then(yaml_of) {
            put(k, v);
        }
    }
    for (nemo1, mcore) in RENAMED.iter().filter(|(n, _)| *n != "bias") {
        if let Some(v) = cfg.get(nemo1).and_then(yaml_of) {
            put(mcore, v);
        }
    }
    if let Some(v) = cfg.get("override_vocab_size").and_then(yaml_of) {
        put("vocab_size", v);
    }
    let (dtype, bf16) = match cfg.precision() {
        Some(p) if p.starts_with("bf16") => ("torch.bfloat16", true),
        Some(p) if p.starts_with("16") => ("torch.float16", false),
        _ => ("torch.float32", false),
    };
    put(
        "params_dtype",
        format!("\n    _target_: {dtype}\n    _call_: false"),
    );
    put("bf16", bf16.to_string());
    let spec = if cfg.transformer_engine() {
        "megatron.core.models.gpt.gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec"
    } else {
        "megatron.core.models.gpt.gpt_layer_specs.get_gpt_layer_local_spec"
    };
    put(
        "transformer_layer_spec",
        format!("\n    _target_: {spec}\n    _call_: false"),
    );
    match tokenizer {
        Some(("sentencepiece", path)) => out.push_str(&format!(
            "tokenizer:\n  _target_: nemo.collections.common.tokenizers.sentencepiece_tokenizer.SentencePieceTokenizer\n  model_path: {}\n",
            serde_json::to_string(path).unwrap_or_default()
        )),
        Some((_, path)) => out.push_str(&format!(
            "tokenizer:\n  _target_: nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer\n  pretrained_model_name: {}\n",
            serde_json::to_string(path).unwrap_or_default()
        )),
        None => out.push_str("tokenizer: null\n"),
    }
    Ok(out)
}

/// Megatron-LM's `args` for a NeMo 1 config at `tp` x `pp` with `padded_vocab` embedding
/// rows: the attribute dict of the `argparse.Namespace` its checkpoints pickle, with the
/// fields `load_args_from_checkpoint` / `check_checkpoint_args` read.
///
/// # Errors
/// An activation Megatron-LM's arguments cannot express (gated GELU or ReLU).
pub fn mlm_args(
    cfg: &crate::model::config::ModelConfig,
    tp: u64,
    pp: u64,
    padded_vocab: u64,
) -> Result<Vec<(Pickled, Pickled)>, String> {
    use crate::formats::torch::value::Global;
    let arch = |r: Result<u64, crate::model::config::Error>| r.map_err(|e| e.to_string());
    let int = |v: u64| Pickled::Int(i64::try_from(v).unwrap_or(i64::MAX));
    let mut a: Vec<(String, Pickled)> = Vec::new();
    let heads = arch(cfg.num_attention_heads())?;
    let groups = arch(cfg.num_query_groups())?;
    a.push(("num_layers".into(), int(arch(cfg.num_layers())?)));
    a.push(("hidden_size".into(), int(arch(cfg.hidden_size())?)));
    a.push(("ffn_hidden_size".into(), int(arch(cfg.ffn_hidden_size())?)));
    a.push(("num_attention_heads".into(), int(heads)));
    a.push((
        "group_query_attention".into(),
        Pickled::Bool(groups != heads),
    ));
    a.push(("num_query_groups".into(), int(groups)));
    a.push(("kv_channels".into(), int(arch(cfg.kv_channels())?)));
    let act = cfg.activation();
    let act = act.strip_prefix("fast-").unwrap_or(act);
    let (swiglu, squared_relu) = match act {
        "swiglu" => (true, false),
        "gelu" => (false, false),
        "squared-relu" => (false, true),
        other => {
            return Err(format!(
            "activation `{other}`: Megatron-LM's arguments have swiglu, gelu and squared-relu only"
        ))
        }
    };
    a.push(("swiglu".into(), Pickled::Bool(swiglu)));
    a.push(("squared_relu".into(), Pickled::Bool(squared_relu)));
    let norm = if cfg.normalization() == "rmsnorm" {
        "RMSNorm"
    } else {
        "LayerNorm"
    };
    a.push(("normalization".into(), Pickled::Str(norm.into())));
    let f64_of = |k: &str| cfg.get(k).and_then(|v| v.as_f64());
    if let Some(e) = f64_of("layernorm_epsilon") {
        a.push(("norm_epsilon".into(), Pickled::Float(e)));
    }
    let flag = |k: &str| cfg.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    a.push((
        "apply_layernorm_1p".into(),
        Pickled::Bool(flag("layernorm_zero_centered_gamma")),
    ));
    a.push(("add_bias_linear".into(), Pickled::Bool(cfg.bias())));
    a.push((
        "add_qkv_bias".into(),
        Pickled::Bool(flag("qkv_bias") || cfg.bias()),
    ));
    a.push(("qk_layernorm".into(), Pickled::Bool(flag("qk_layernorm"))));
    let pos = cfg.position_embedding_type();
    a.push(("position_embedding_type".into(), Pickled::Str(pos.into())));
    a.push((
        "add_position_embedding".into(),
        Pickled::Bool(pos == "learned_absolute"),
    ));
    a.push((
        "use_rotary_position_embeddings".into(),
        Pickled::Bool(pos == "rope"),
    ));
    if let Some(b) = f64_of("rotary_base") {
        a.push(("rotary_base".into(), int(b as u64)));
    }
    a.push((
        "rotary_percent".into(),
        Pickled::Float(f64_of("rotary_percentage").unwrap_or(1.0)),
    ));
    a.push((
        "untie_embeddings_and_output_weights".into(),
        Pickled::Bool(!cfg.share_embeddings_and_output_weights()),
    ));
    a.push(("padded_vocab_size".into(), int(padded_vocab)));
    a.push((
        "make_vocab_size_divisible_by".into(),
        int(cfg.make_vocab_size_divisible_by()),
    ));
    for (k, from) in [
        ("seq_length", "encoder_seq_length"),
        ("max_position_embeddings", "max_position_embeddings"),
    ] {
        if let Some(v) = cfg.get(from).and_then(|v| v.as_u64()) {
            a.push((k.into(), int(v)));
        }
    }
    if let Some(v) = f64_of("init_method_std") {
        a.push(("init_method_std".into(), Pickled::Float(v)));
    }
    a.push(("tensor_model_parallel_size".into(), int(tp)));
    a.push(("pipeline_model_parallel_size".into(), int(pp)));
    a.push(("virtual_pipeline_model_parallel_size".into(), Pickled::None));
    a.push(("expert_model_parallel_size".into(), int(1)));
    let te = if cfg.transformer_engine() {
        "transformer_engine"
    } else {
        "local"
    };
    a.push(("transformer_impl".into(), Pickled::Str(te.into())));
    a.push(("ckpt_format".into(), Pickled::Str("torch".into())));
    let (dtype, bf16, fp16) = match cfg.precision() {
        Some(p) if p.starts_with("bf16") => ("bfloat16", true, false),
        Some(p) if p.starts_with("16") => ("float16", false, true),
        _ => ("float32", false, false),
    };
    a.push((
        "params_dtype".into(),
        Pickled::Global(Global::new("torch", dtype)),
    ));
    a.push(("bf16".into(), Pickled::Bool(bf16)));
    a.push(("fp16".into(), Pickled::Bool(fp16)));
    match cfg.get("num_moe_experts").and_then(|v| v.as_u64()) {
        Some(e) => {
            a.push(("num_experts".into(), int(e)));
            for k in [
                "moe_router_topk",
                "moe_ffn_hidden_size",
                "moe_router_pre_softmax",
                "moe_aux_loss_coeff",
                "moe_grouped_gemm",
                "moe_router_score_function",
                "moe_shared_expert_intermediate_size",
            ] {
                if let Some(v) = cfg.get(k).and_then(Field::from_yaml) {
                    let p = match v {
                        Field::Int(i) => Pickled::Int(i),
                        Field::Float(f) => Pickled::Float(f),
                        Field::Bool(b) => Pickled::Bool(b),
                        Field::Str(s) => Pickled::Str(s),
                        _ => Pickled::None,
                    };
                    a.push((k.into(), p));
                }
            }
        }
        None => a.push(("num_experts".into(), Pickled::None)),
    }
    Ok(a.into_iter().map(|(k, v)| (Pickled::Str(k), v)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;

    const NEMO2: &str = "_target_: nemo.collections.llm.gpt.model.llama.LlamaModel
config:
  _target_: nemo.collections.llm.gpt.model.llama.LlamaConfig
  num_layers: 2
  hidden_size: 64
  ffn_hidden_size: 96
  num_attention_heads: 8
  num_query_groups: 2
  kv_channels: 8
  normalization: RMSNorm
  layernorm_epsilon: 1.0e-05
  gated_linear_unit: true
  activation_func:
    _target_: torch.nn.functional.silu
    _call_: false
  add_bias_linear: false
  position_embedding_type: rope
  rotary_base: 10000
  rotary_percent: 1.0
  seq_length: 32
  share_embeddings_and_output_weights: false
  make_vocab_size_divisible_by: 128
  tensor_model_parallel_size: 2
  transformer_layer_spec:
    _target_: megatron.core.models.gpt.gpt_layer_specs.get_gpt_layer_local_spec
    _call_: false
  params_dtype:
    _target_: torch.bfloat16
    _call_: false
tokenizer:
  _target_: nemo.collections.common.tokenizers.sentencepiece_tokenizer.SentencePieceTokenizer
  model_path: nemo_tokenizer/tokenizer.model
";

    #[test]
    fn nemo2_model_yaml_reads_as_nemo1() {
        let doc: Yaml = serde_yaml_ng::from_str(NEMO2).unwrap();
        let f = Fields::from_yaml_section(&doc["config"]);
        let text = f
            .nemo1_yaml(
                "  library: sentencepiece\n  model: nemo:x_tokenizer.model\n",
                None,
            )
            .unwrap();
        let c = ModelConfig::parse(&text).unwrap();
        assert_eq!(c.num_layers().unwrap(), 2);
        assert_eq!(c.num_query_groups().unwrap(), 2);
        assert_eq!(c.kv_channels().unwrap(), 8);
        assert_eq!(c.normalization(), "rmsnorm");
        assert_eq!(c.activation(), "fast-swiglu");
        assert!(c.is_gated() && !c.bias() && !c.share_embeddings_and_output_weights());
        assert_eq!(c.position_embedding_type(), "rope");
        assert_eq!(c.tensor_model_parallel_size(), 2);
        assert!(c.mcore_gpt() && !c.transformer_engine());
        assert_eq!(c.precision(), Some("bf16"));
        assert_eq!(
            c.get("encoder_seq_length").and_then(|v| v.as_u64()),
            Some(32)
        );
        assert_eq!(
            c.get("rotary_percentage").and_then(|v| v.as_f64()),
            Some(1.0)
        );
    }

    /// NeMo 2 -> NeMo 1 -> NeMo 2 -> NeMo 1 gives the same NeMo 1 config.
    #[test]
    fn nemo2_yaml_round_trips() {
        let doc: Yaml = serde_yaml_ng::from_str(NEMO2).unwrap();
        let tok = "  library: sentencepiece\n  model: nemo:x_tokenizer.model\n";
        let first = Fields::from_yaml_section(&doc["config"])
            .nemo1_yaml(tok, None)
            .unwrap();
        let c = ModelConfig::parse(&first).unwrap();
        let n2 = nemo2_model_yaml(
            &c,
            Some(("sentencepiece", "nemo_tokenizer/tokenizer.model")),
        )
        .unwrap();
        let doc2: Yaml = serde_yaml_ng::from_str(&n2).unwrap();
        assert_eq!(
            doc2["tokenizer"]["model_path"].as_str(),
            Some("nemo_tokenizer/tokenizer.model")
        );
        let second = Fields::from_yaml_section(&doc2["config"])
            .nemo1_yaml(tok, None)
            .unwrap();
        let (a, b) = (
            ModelConfig::parse(&first).unwrap(),
            ModelConfig::parse(&second).unwrap(),
        );
        assert_eq!(a.section(), b.section(), "{first}\n---\n{second}");
    }

    /// NeMo 1 -> Megatron-LM args -> NeMo 1 keeps the architecture.
    #[test]
    fn mlm_args_round_trip() {
        let doc: Yaml = serde_yaml_ng::from_str(NEMO2).unwrap();
        let first = Fields::from_yaml_section(&doc["config"])
            .nemo1_yaml("  library: null\n", Some(128))
            .unwrap();
        let a = ModelConfig::parse(&first).unwrap();
        let args = mlm_args(&a, 2, 1, 128).unwrap();
        let b = ModelConfig::parse(
            &Fields::from_mlm_args(&args)
                .nemo1_yaml("  library: null\n", Some(128))
                .unwrap(),
        )
        .unwrap();
        for k in [
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "kv_channels",
            "normalization",
            "activation",
            "bias",
            "position_embedding_type",
            "share_embeddings_and_output_weights",
            "rotary_percentage",
            "layernorm_epsilon",
            "precision",
            "transformer_engine",
            "override_vocab_size",
        ] {
            assert_eq!(a.get(k), b.get(k), "{k}");
        }
        assert_eq!(b.tensor_model_parallel_size(), 2);
    }

    #[test]
    fn mlm_args_rename() {
        let s = |k: &str| Pickled::Str(k.to_string());
        let attrs = vec![
            (s("num_layers"), Pickled::Int(4)),
            (s("hidden_size"), Pickled::Int(64)),
            (s("ffn_hidden_size"), Pickled::Int(96)),
            (s("num_attention_heads"), Pickled::Int(8)),
            (s("group_query_attention"), Pickled::Bool(false)),
            (s("num_query_groups"), Pickled::Int(1)),
            (s("swiglu"), Pickled::Bool(true)),
            (
                s("untie_embeddings_and_output_weights"),
                Pickled::Bool(true),
            ),
            (s("normalization"), s("RMSNorm")),
            (s("norm_epsilon"), Pickled::Float(1e-6)),
            (s("transformer_impl"), s("transformer_engine")),
            (s("bf16"), Pickled::Bool(true)),
        ];
        let f = Fields::from_mlm_args(&attrs);
        let c = ModelConfig::parse(&f.nemo1_yaml("  library: null\n", Some(128)).unwrap()).unwrap();
        assert_eq!(
            c.num_query_groups().unwrap(),
            8,
            "no GQA: one group per head"
        );
        assert_eq!(c.activation(), "fast-swiglu");
        assert!(!c.share_embeddings_and_output_weights() && c.transformer_engine());
        assert_eq!(c.override_vocab_size(), Some(128));
        assert_eq!(c.precision(), Some("bf16"));
        assert_eq!(
            c.get("layernorm_epsilon").and_then(|v| v.as_f64()),
            Some(1e-6)
        );
        let bad = Fields::from_mlm_args(&attrs[..3]);
        assert!(bad
            .nemo1_yaml("", None)
            .unwrap_err()
            .contains("num_attention_heads"));
    }
}
