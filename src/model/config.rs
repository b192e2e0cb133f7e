//! `model_config.yaml`: the model configuration stored at the root of a `.nemo` archive.
//!
//! This module owns reading the keys nemo-tool needs (architecture, parallel sizes, precision,
//! tokenizer artifacts, vocab padding) and editing the file *textually*, so that a rewritten
//! archive keeps every comment, key order, quoting style and unknown key byte for byte
//! (nemo-format.md §1.2, §1.6). Defaults follow `MegatronGPTModel`'s `cfg.get(key, default)` calls.
//!
//! The parsed YAML is validated once, in [`ModelConfig::parse`]: a known key holding the wrong
//! type is an error naming the key, so the accessors afterwards never fail on type grounds.

use serde_yaml_ng::{Mapping, Value};

/// Errors from parsing or editing a `model_config.yaml`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The text is not valid YAML.
    #[error("model_config.yaml: invalid yaml at {}: {message}", location(*.line, *.column))]
    Yaml {
        /// 1-based line of the problem, when the parser knows it.
        line: Option<usize>,
        /// 1-based column of the problem, when the parser knows it.
        column: Option<usize>,
        /// The parser's message.
        message: String,
    },
    /// The document (or its `model:` section) is not a mapping.
    #[error("model_config.yaml: {key}: expected a mapping, found {found}")]
    NotAMapping {
        /// `<root>` or the dotted key of the section.
        key: String,
        /// What was found instead.
        found: &'static str,
    },
    /// A known key holds a value of the wrong type.
    #[error("model_config.yaml: {key}: expected {expected}, found {found}")]
    WrongType {
        /// Dotted key, relative to the model section.
        key: String,
        /// The type nemo-tool (and NeMo) expects.
        expected: &'static str,
        /// What was found, briefly.
        found: String,
    },
    /// A required key is absent or null.
    #[error("model_config.yaml: {key}: required key is missing or null")]
    Missing {
        /// Dotted key, relative to the model section.
        key: String,
    },
    /// A key's value has the right type but cannot be used.
    #[error("model_config.yaml: {key}: invalid value {value}: {why}")]
    InvalidValue {
        /// Dotted key (or argument name), relative to the model section.
        key: String,
        /// The offending value, as text.
        value: String,
        /// Why it cannot be used.
        why: &'static str,
    },
    /// A requested edit cannot be done as a minimal one-line textual change.
    #[error("model_config.yaml: {key}: cannot edit in place: {why}")]
    EditUnsupported {
        /// Dotted key, relative to the model section.
        key: String,
        /// What stands in the way (block scalar, flow collection, ...).
        why: &'static str,
    },
    /// After an edit, re-parsing did not give the original document with only the edited values
    /// changed. This guards against a textual edit that YAML reads differently than intended.
    #[error("model_config.yaml: {key}: edited text does not re-parse to the intended value")]
    EditVerify {
        /// Dotted key, relative to the model section.
        key: String,
    },
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("line {l}, column {c}"),
        (Some(l), None) => format!("line {l}"),
        _ => "unknown position".to_string(),
    }
}

/// The tokenizer section (`tokenizer.*`). Absent or null keys are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokenizer {
    /// `tokenizer.library`: `sentencepiece`, `huggingface`, `megatron`, ...
    pub library: Option<String>,
    /// `tokenizer.type`: e.g. a hub id for HF tokenizers.
    pub type_: Option<String>,
    /// `tokenizer.model`: usually `nemo:<32 hex>_tokenizer.model`.
    pub model: Option<String>,
    /// `tokenizer.vocab_file`.
    pub vocab_file: Option<String>,
    /// `tokenizer.merge_file`.
    pub merge_file: Option<String>,
}

/// A config value that names a file inside the archive (`nemo:<name>`, nemo-format.md §1.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRef {
    /// The dotted config key holding the reference, e.g. `tokenizer.model`.
    pub key: &'static str,
    /// The archive member name, without the `nemo:` prefix.
    pub name: String,
}

/// The keys nemo-tool reads, validated at parse time. `None` = absent or null.
#[derive(Debug, Clone, Default)]
struct Fields {
    num_layers: Option<u64>,
    hidden_size: Option<u64>,
    ffn_hidden_size: Option<u64>,
    num_attention_heads: Option<u64>,
    num_query_groups: Option<u64>,
    kv_channels: Option<u64>,
    normalization: Option<String>,
    activation: Option<String>,
    bias: Option<bool>,
    position_embedding_type: Option<String>,
    share_embeddings_and_output_weights: Option<bool>,
    make_vocab_size_divisible_by: Option<u64>,
    override_vocab_size: Option<u64>,
    tensor_model_parallel_size: Option<u64>,
    pipeline_model_parallel_size: Option<u64>,
    mcore_gpt: Option<bool>,
    transformer_engine: Option<bool>,
    precision: Option<String>,
    megatron_amp_o2: Option<bool>,
    tokenizer: Tokenizer,
}

/// A parsed `model_config.yaml` that remembers its original text.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    text: String,
    doc: Value,
    nested: bool,
    f: Fields,
}

impl ModelConfig {
    /// Parses `text`, descending into a top-level `model:` key if there is one (as NeMo's
    /// `load_config_and_state_dict` does), and type-checks every key nemo-tool reads.
    ///
    /// # Errors
    /// [`Error::Yaml`] for invalid YAML, [`Error::NotAMapping`] when the document or its `model:`
    /// section is not a mapping, [`Error::WrongType`] / [`Error::InvalidValue`] for known keys.
    pub fn parse(text: &str) -> Result<ModelConfig, Error> {
        let doc = parse_yaml(text)?;
        let root = doc.as_mapping().ok_or_else(|| Error::NotAMapping {
            key: "<root>".to_string(),
            found: kind(&doc),
        })?;
        let nested = root.contains_key("model");
        let section = match root.get("model") {
            Some(v) => v.as_mapping().ok_or_else(|| Error::NotAMapping {
                key: "model".to_string(),
                found: kind(v),
            })?,
            None => root,
        };
        let f = Fields::read(section)?;
        Ok(ModelConfig {
            text: text.to_string(),
            doc,
            nested,
            f,
        })
    }

    /// The original text, byte for byte.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// True when the keys sit under a top-level `model:` key.
    pub fn is_nested(&self) -> bool {
        self.nested
    }

    /// The model section (the whole document, or its `model:` mapping).
    pub fn section(&self) -> &Value {
        match self.doc.get("model") {
            Some(m) if self.nested => m,
            _ => &self.doc,
        }
    }

    /// The raw value at a dotted key relative to the model section (`tokenizer.model`), null
    /// included. For keys nemo-tool has no typed accessor for.
    pub fn get(&self, dotted_key: &str) -> Option<&Value> {
        let mut v = self.section();
        for part in dotted_key.split('.') {
            v = v.get(part)?;
        }
        Some(v)
    }

    /// `num_layers` (L). Required.
    pub fn num_layers(&self) -> Result<u64, Error> {
        required("num_layers", self.f.num_layers)
    }

    /// `hidden_size` (H). Required.
    pub fn hidden_size(&self) -> Result<u64, Error> {
        required("hidden_size", self.f.hidden_size)
    }

    /// `ffn_hidden_size` (F, per gate/up half for gated MLPs). Required.
    pub fn ffn_hidden_size(&self) -> Result<u64, Error> {
        required("ffn_hidden_size", self.f.ffn_hidden_size)
    }

    /// `num_attention_heads` (nh). Required and non-zero.
    pub fn num_attention_heads(&self) -> Result<u64, Error> {
        let nh = required("num_attention_heads", self.f.num_attention_heads)?;
        if nh == 0 {
            return Err(Error::InvalidValue {
                key: "num_attention_heads".to_string(),
                value: "0".to_string(),
                why: "must be at least 1",
            });
        }
        Ok(nh)
    }

    /// `num_query_groups` (ng); null or absent means plain MHA, i.e. `num_attention_heads`.
    pub fn num_query_groups(&self) -> Result<u64, Error> {
        match self.f.num_query_groups {
            Some(g) => Ok(g),
            None => self.num_attention_heads(),
        }
    }

    /// `kv_channels` (per-head dim d); null or absent means `hidden_size / num_attention_heads`
    /// (floor division, as Megatron's `TransformerConfig` does).
    pub fn kv_channels(&self) -> Result<u64, Error> {
        match self.f.kv_channels {
            Some(d) => Ok(d),
            None => Ok(self.hidden_size()? / self.num_attention_heads()?),
        }
    }

    /// `normalization`, default `layernorm`.
    pub fn normalization(&self) -> &str {
        self.f.normalization.as_deref().unwrap_or("layernorm")
    }

    /// `activation`, default `gelu`.
    pub fn activation(&self) -> &str {
        self.f.activation.as_deref().unwrap_or("gelu")
    }

    /// True for gated MLPs (`swiglu`, `geglu`, `reglu` and their `fast-` forms): NeMo sets
    /// mcore's `gated_linear_unit` exactly when the activation name ends in `glu`, and then
    /// `linear_fc1` holds `[gate; up]` (nemo-format.md §3.3).
    pub fn is_gated(&self) -> bool {
        self.activation().ends_with("glu")
    }

    /// `bias` (linear-layer biases), default true.
    pub fn bias(&self) -> bool {
        self.f.bias.unwrap_or(true)
    }

    /// `position_embedding_type`, default `learned_absolute`.
    pub fn position_embedding_type(&self) -> &str {
        self.f
            .position_embedding_type
            .as_deref()
            .unwrap_or("learned_absolute")
    }

    /// `share_embeddings_and_output_weights` (tied embeddings), default true.
    pub fn share_embeddings_and_output_weights(&self) -> bool {
        self.f.share_embeddings_and_output_weights.unwrap_or(true)
    }

    /// `make_vocab_size_divisible_by` (m), default 128.
    pub fn make_vocab_size_divisible_by(&self) -> u64 {
        self.f.make_vocab_size_divisible_by.unwrap_or(128)
    }

    /// `override_vocab_size`: when set, the embedding row count regardless of padding.
    pub fn override_vocab_size(&self) -> Option<u64> {
        self.f.override_vocab_size
    }

    /// `tensor_model_parallel_size` (T), default 1.
    pub fn tensor_model_parallel_size(&self) -> u64 {
        self.f.tensor_model_parallel_size.unwrap_or(1)
    }

    /// `pipeline_model_parallel_size` (P), default 1.
    pub fn pipeline_model_parallel_size(&self) -> u64 {
        self.f.pipeline_model_parallel_size.unwrap_or(1)
    }

    /// `mcore_gpt`, default false (absent means a legacy NeMo GPT model).
    pub fn mcore_gpt(&self) -> bool {
        self.f.mcore_gpt.unwrap_or(false)
    }

    /// `transformer_engine`, default false.
    pub fn transformer_engine(&self) -> bool {
        self.f.transformer_engine.unwrap_or(false)
    }

    /// `precision` as text (`32`, `16`, `bf16`, `bf16-mixed`, ...), if set.
    pub fn precision(&self) -> Option<&str> {
        self.f.precision.as_deref()
    }

    /// `megatron_amp_O2`, default false.
    pub fn megatron_amp_o2(&self) -> bool {
        self.f.megatron_amp_o2.unwrap_or(false)
    }

    /// The `tokenizer.*` keys.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.f.tokenizer
    }

    /// megatron-core's `window_attn_skip_freq` (`is_layer_window_attention`) over `layers`
    /// layers: which use the sliding window. An integer N windows every layer whose 1-based
    /// number is not a multiple of N; a list gives one 0/1 per layer. None when unset.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for anything else.
    pub fn window_attn_layers(&self, layers: u64) -> Result<Option<Vec<bool>>, Error> {
        let key = "window_attn_skip_freq";
        let bad = |value: String, why: &'static str| Error::InvalidValue {
            key: key.into(),
            value,
            why,
        };
        let v = match self.get(key) {
            None | Some(Value::Null) => return Ok(None),
            Some(v) => v,
        };
        if let Some(f) = v.as_u64() {
            if f == 0 {
                return Err(bad("0".into(), "expected a positive integer or a 0/1 list"));
            }
            return Ok(Some((1..=layers).map(|l| l % f != 0).collect()));
        }
        let Some(list) = v.as_sequence() else {
            return Err(bad(
                format!("{v:?}"),
                "expected a positive integer or a 0/1 list",
            ));
        };
        if list.len() as u64 != layers {
            return Err(bad(
                format!("{} entries for {layers} layers", list.len()),
                "one 0/1 entry per layer",
            ));
        }
        let windowed = list
            .iter()
            .map(|x| match x.as_u64() {
                Some(0) => Ok(false),
                Some(1) => Ok(true),
                _ => Err(bad(format!("{x:?}"), "entries must be 0 or 1")),
            })
            .collect::<Result<Vec<bool>, Error>>()?;
        Ok(Some(windowed))
    }

    /// The `nemo:<name>` artifact references among `tokenizer.model`, `tokenizer.vocab_file` and
    /// `tokenizer.merge_file` (the artifacts NeMo registers), in that order.
    pub fn artifact_refs(&self) -> Vec<ArtifactRef> {
        let t = &self.f.tokenizer;
        [
            ("tokenizer.model", &t.model),
            ("tokenizer.vocab_file", &t.vocab_file),
            ("tokenizer.merge_file", &t.merge_file),
        ]
        .into_iter()
        .filter_map(|(key, v)| {
            let name = v.as_deref()?.strip_prefix("nemo:")?;
            Some(ArtifactRef {
                key,
                name: name.to_string(),
            })
        })
        .collect()
    }

    /// Megatron's padded vocab for TP size `tp`: `ceil(V / (m·tp)) · (m·tp)` with
    /// `m = make_vocab_size_divisible_by` (nemo-format.md §3.4). Ignores `override_vocab_size`;
    /// see [`ModelConfig::embedding_rows`].
    ///
    /// # Errors
    /// [`Error::InvalidValue`] when `tp` is 0 or the arithmetic overflows.
    pub fn padded_vocab(&self, true_vocab: u64, tp: u64) -> Result<u64, Error> {
        let m = self.make_vocab_size_divisible_by();
        let invalid = |why| Error::InvalidValue {
            key: "tensor_model_parallel_size".to_string(),
            value: tp.to_string(),
            why,
        };
        if tp == 0 {
            return Err(invalid("must be at least 1"));
        }
        let multiple = m
            .checked_mul(tp)
            .ok_or_else(|| invalid("make_vocab_size_divisible_by * tp overflows"))?;
        true_vocab
            .div_ceil(multiple)
            .checked_mul(multiple)
            .ok_or_else(|| invalid("padded vocab overflows"))
    }

    /// Rows of the word embedding / output layer at TP size `tp`: `override_vocab_size` if set,
    /// else [`ModelConfig::padded_vocab`].
    pub fn embedding_rows(&self, true_vocab: u64, tp: u64) -> Result<u64, Error> {
        match self.override_vocab_size() {
            Some(v) => Ok(v),
            None => self.padded_vocab(true_vocab, tp),
        }
    }

    /// The original text with the values of some scalar keys replaced, every other byte kept.
    ///
    /// Each update is `(dotted_key, new_value)`: the key is relative to the model section (a
    /// leading `model.` is accepted and ignored), e.g. `tensor_model_parallel_size` or
    /// `tokenizer.model`; the value is the YAML text of a scalar (`2`, `null`, `bf16-mixed`,
    /// `'quoted'`). An existing key has only its value span rewritten (a trailing comment stays);
    /// a missing key is appended at the end of its mapping, missing parents included. The result
    /// is re-parsed and must equal the original document with exactly these values changed, and
    /// must still pass [`ModelConfig::parse`]'s type checks (so `tensor_model_parallel_size: two`
    /// is refused).
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for a value that is not a one-line scalar,
    /// [`Error::EditUnsupported`] where a one-line edit is impossible (block scalars, flow
    /// collections, anchors, a non-mapping parent), [`Error::EditVerify`] if re-parsing disagrees,
    /// [`Error::WrongType`] / [`Error::InvalidValue`] if a known key gets an unusable value.
    pub fn with_updates(&self, updates: &[(&str, &str)]) -> Result<String, Error> {
        let text = self.edit_text(updates)?;
        ModelConfig::parse(&text)?;
        Ok(text)
    }

    /// [`ModelConfig::with_updates`] without the final type check.
    fn edit_text(&self, updates: &[(&str, &str)]) -> Result<String, Error> {
        let mut text = self.text.clone();
        let mut expected = self.doc.clone();
        for &(dotted, new_value) in updates {
            let rel = dotted.strip_prefix("model.").unwrap_or(dotted);
            let value = parse_scalar(rel, new_value)?;
            let mut path: Vec<&str> = Vec::new();
            if self.nested {
                path.push("model");
            }
            path.extend(rel.split('.'));
            if path.iter().any(|p| p.is_empty()) {
                return Err(Error::InvalidValue {
                    key: dotted.to_string(),
                    value: new_value.to_string(),
                    why: "empty key component",
                });
            }
            text = edit::set(&text, &path, new_value.trim()).map_err(|why| {
                Error::EditUnsupported {
                    key: rel.to_string(),
                    why,
                }
            })?;
            set_path(&mut expected, &path, value).ok_or_else(|| Error::EditUnsupported {
                key: rel.to_string(),
                why: "a parent key is not a mapping",
            })?;
        }
        let reparsed = parse_yaml(&text).map_err(|_| Error::EditVerify {
            key: updates.first().map(|u| u.0).unwrap_or("").to_string(),
        })?;
        if reparsed != expected {
            let bad = updates
                .iter()
                .find(|(k, _)| {
                    let k = k.strip_prefix("model.").unwrap_or(k);
                    let sec = |d: &Value| -> Option<Value> {
                        let mut v = if self.nested { d.get("model")? } else { d };
                        for p in k.split('.') {
                            v = v.get(p)?;
                        }
                        Some(v.clone())
                    };
                    sec(&reparsed) != sec(&expected)
                })
                .map(|u| u.0)
                .unwrap_or("<other keys>");
            return Err(Error::EditVerify {
                key: bad.to_string(),
            });
        }
        Ok(text)
    }
}

fn parse_yaml(text: &str) -> Result<Value, Error> {
    serde_yaml_ng::from_str::<Value>(text).map_err(|e| {
        let loc = e.location();
        Error::Yaml {
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
            message: e.to_string(),
        }
    })
}

/// Parses the new value of an update; it must be a scalar on one line.
fn parse_scalar(key: &str, new_value: &str) -> Result<Value, Error> {
    let invalid = |why| Error::InvalidValue {
        key: key.to_string(),
        value: new_value.to_string(),
        why,
    };
    if new_value.contains(['\n', '\r']) {
        return Err(invalid("replacement value must fit on one line"));
    }
    if new_value.trim().is_empty() {
        return Err(invalid("replacement value is empty; write null"));
    }
    let v = serde_yaml_ng::from_str::<Value>(new_value)
        .map_err(|_| invalid("replacement value is not valid yaml"))?;
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => Ok(v),
        _ => Err(invalid("replacement value must be a yaml scalar")),
    }
}

/// Sets `path` in `doc` to `value`, creating missing parent mappings; `None` if a parent exists
/// and is not a mapping.
fn set_path(doc: &mut Value, path: &[&str], value: Value) -> Option<()> {
    let (last, parents) = path.split_last()?;
    let mut cur = doc;
    for p in parents {
        let m = cur.as_mapping_mut()?;
        if !m.contains_key(*p) {
            m.insert(Value::from(*p), Value::Mapping(Mapping::new()));
        }
        cur = m.get_mut(*p)?;
    }
    cur.as_mapping_mut()?.insert(Value::from(*last), value);
    Some(())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a sequence",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        other => kind(other).to_string(),
    }
}

fn required(key: &str, v: Option<u64>) -> Result<u64, Error> {
    v.ok_or_else(|| Error::Missing {
        key: key.to_string(),
    })
}

fn wrong(key: &str, expected: &'static str, v: &Value) -> Error {
    Error::WrongType {
        key: key.to_string(),
        expected,
        found: describe(v),
    }
}

/// `None` for absent or null; else the value must be a non-negative integer.
fn get_u64(m: &Mapping, key: &str, prefix: &str) -> Result<Option<u64>, Error> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| wrong(&format!("{prefix}{key}"), "a non-negative integer", v)),
    }
}

/// Like [`get_u64`] but also rejects 0 (parallel sizes, divisors).
fn get_positive(m: &Mapping, key: &str) -> Result<Option<u64>, Error> {
    match get_u64(m, key, "")? {
        Some(0) => Err(Error::InvalidValue {
            key: key.to_string(),
            value: "0".to_string(),
            why: "must be at least 1",
        }),
        v => Ok(v),
    }
}

fn get_bool(m: &Mapping, key: &str) -> Result<Option<bool>, Error> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| wrong(key, "a boolean", v)),
    }
}

fn get_str(m: &Mapping, key: &str, prefix: &str) -> Result<Option<String>, Error> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(wrong(&format!("{prefix}{key}"), "a string", v)),
    }
}

impl Fields {
    fn read(m: &Mapping) -> Result<Fields, Error> {
        let precision = match m.get("precision") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(v) => return Err(wrong("precision", "a number or a string", v)),
        };
        let tokenizer = match m.get("tokenizer") {
            None | Some(Value::Null) => Tokenizer::default(),
            Some(Value::Mapping(t)) => Tokenizer {
                library: get_str(t, "library", "tokenizer.")?,
                type_: get_str(t, "type", "tokenizer.")?,
                model: get_str(t, "model", "tokenizer.")?,
                vocab_file: get_str(t, "vocab_file", "tokenizer.")?,
                merge_file: get_str(t, "merge_file", "tokenizer.")?,
            },
            Some(v) => return Err(wrong("tokenizer", "a mapping", v)),
        };
        Ok(Fields {
            num_layers: get_u64(m, "num_layers", "")?,
            hidden_size: get_u64(m, "hidden_size", "")?,
            ffn_hidden_size: get_u64(m, "ffn_hidden_size", "")?,
            num_attention_heads: get_u64(m, "num_attention_heads", "")?,
            num_query_groups: get_positive(m, "num_query_groups")?,
            kv_channels: get_u64(m, "kv_channels", "")?,
            normalization: get_str(m, "normalization", "")?,
            activation: get_str(m, "activation", "")?,
            bias: get_bool(m, "bias")?,
            position_embedding_type: get_str(m, "position_embedding_type", "")?,
            share_embeddings_and_output_weights: get_bool(
                m,
                "share_embeddings_and_output_weights",
            )?,
            make_vocab_size_divisible_by: get_positive(m, "make_vocab_size_divisible_by")?,
            override_vocab_size: get_u64(m, "override_vocab_size", "")?,
            tensor_model_parallel_size: get_positive(m, "tensor_model_parallel_size")?,
            pipeline_model_parallel_size: get_positive(m, "pipeline_model_parallel_size")?,
            mcore_gpt: get_bool(m, "mcore_gpt")?,
            transformer_engine: get_bool(m, "transformer_engine")?,
            precision,
            megatron_amp_o2: get_bool(m, "megatron_amp_O2")?,
            tokenizer,
        })
    }
}

mod edit;

/// A YAML float PyYAML (and so OmegaConf/NeMo) reads as a float: always a
/// `.` in the mantissa and a signed exponent (`1.0e-05`, not `1e-5`).
pub fn yaml_float(x: f64) -> String {
    let s = format!("{x:?}");
    match s.split_once('e') {
        Some((m, e)) => {
            let m = if m.contains('.') {
                m.to_string()
            } else {
                format!("{m}.0")
            };
            let (sign, digits) = match e.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', e.trim_start_matches('+')),
            };
            format!("{m}e{sign}{digits:0>2}")
        }
        None if s.contains('.') || s.contains("inf") || s.contains("NaN") => s,
        None => format!("{s}.0"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = include_str!("../../fixtures/configs/tiny_llama.yaml");

    fn tiny() -> ModelConfig {
        ModelConfig::parse(TINY).expect("fixture parses")
    }

    /// Lines that differ between two texts with the same line count.
    fn changed_lines(a: &str, b: &str) -> Vec<(String, String)> {
        assert_eq!(a.lines().count(), b.lines().count(), "line count changed");
        a.lines()
            .zip(b.lines())
            .filter(|(x, y)| x != y)
            .map(|(x, y)| (x.to_string(), y.to_string()))
            .collect()
    }

    #[test]
    fn reads_tiny_llama_fixture() {
        let c = tiny();
        assert!(!c.is_nested());
        assert_eq!(c.text(), TINY);
        assert_eq!(c.num_layers().unwrap(), 2);
        assert_eq!(c.hidden_size().unwrap(), 64);
        assert_eq!(c.ffn_hidden_size().unwrap(), 96);
        assert_eq!(c.num_attention_heads().unwrap(), 8);
        assert_eq!(c.num_query_groups().unwrap(), 2);
        assert_eq!(c.kv_channels().unwrap(), 8);
        assert_eq!(c.normalization(), "rmsnorm");
        assert_eq!(c.activation(), "fast-swiglu");
        assert!(c.is_gated());
        assert!(!c.bias());
        assert_eq!(c.position_embedding_type(), "rope");
        assert!(!c.share_embeddings_and_output_weights());
        assert_eq!(c.make_vocab_size_divisible_by(), 32);
        assert_eq!(c.override_vocab_size(), None);
        assert_eq!(c.tensor_model_parallel_size(), 1);
        assert_eq!(c.pipeline_model_parallel_size(), 1);
        assert!(c.mcore_gpt());
        assert!(!c.transformer_engine());
        assert_eq!(c.precision(), Some("32"));
        assert!(!c.megatron_amp_o2());
        let t = c.tokenizer();
        assert_eq!(t.library.as_deref(), Some("sentencepiece"));
        assert_eq!(t.type_, None);
        assert_eq!(
            t.model.as_deref(),
            Some("nemo:79b7d2d99291075a58045d29d6b0b3cc_tokenizer.model")
        );
        assert_eq!(t.vocab_file, None);
        assert_eq!(
            c.artifact_refs(),
            vec![ArtifactRef {
                key: "tokenizer.model",
                name: "79b7d2d99291075a58045d29d6b0b3cc_tokenizer.model".to_string()
            }]
        );
        assert_eq!(
            c.get("tokenizer.library").and_then(Value::as_str),
            Some("sentencepiece")
        );
        assert_eq!(c.get("seed").and_then(Value::as_u64), Some(1234));
        assert!(c.get("nope.deeper").is_none());
    }

    #[test]
    fn padded_vocab_matches_spec_values() {
        // nemo-format.md §3.4 worked values (m = 128) and the fixture (m = 32, V = 100).
        let c = ModelConfig::parse("num_layers: 1\n").unwrap();
        assert_eq!(c.padded_vocab(32000, 1).unwrap(), 32000);
        assert_eq!(c.padded_vocab(32000, 2).unwrap(), 32000);
        assert_eq!(c.padded_vocab(32000, 4).unwrap(), 32256);
        assert_eq!(c.padded_vocab(32000, 8).unwrap(), 32768);
        assert_eq!(c.padded_vocab(128256, 8).unwrap(), 129024);
        let t = tiny();
        assert_eq!(t.padded_vocab(100, 1).unwrap(), 128);
        assert_eq!(t.padded_vocab(100, 4).unwrap(), 128);
        assert_eq!(t.embedding_rows(100, 2).unwrap(), 128);
        let o = ModelConfig::parse("override_vocab_size: 50000\n").unwrap();
        assert_eq!(o.embedding_rows(100, 2).unwrap(), 50000);
        assert!(matches!(
            c.padded_vocab(100, 0),
            Err(Error::InvalidValue { .. })
        ));
        assert!(matches!(
            c.padded_vocab(u64::MAX, 1),
            Err(Error::InvalidValue { .. })
        ));
    }

    #[test]
    fn descends_into_model_key() {
        let text = "trainer:\n  devices: 1\nmodel:\n  num_layers: 4\n  hidden_size: 128\n  num_attention_heads: 4\n  tokenizer:\n    model: nemo:abc_tokenizer.model\n    merge_file: nemo:m.txt\n";
        let c = ModelConfig::parse(text).unwrap();
        assert!(c.is_nested());
        assert_eq!(c.num_layers().unwrap(), 4);
        assert_eq!(c.kv_channels().unwrap(), 32);
        assert_eq!(
            c.get("tokenizer.model").and_then(Value::as_str),
            Some("nemo:abc_tokenizer.model")
        );
        assert_eq!(c.artifact_refs().len(), 2);
        assert_eq!(c.artifact_refs()[1].key, "tokenizer.merge_file");
        assert_eq!(c.artifact_refs()[1].name, "m.txt");
    }

    #[test]
    fn null_and_absent_take_defaults() {
        let c = ModelConfig::parse(
            "hidden_size: 96\nnum_attention_heads: 12\nnum_query_groups: null\nkv_channels: null\ntokenizer: null\nprecision: bf16-mixed\n",
        )
        .unwrap();
        assert_eq!(c.num_query_groups().unwrap(), 12);
        assert_eq!(c.kv_channels().unwrap(), 8);
        assert_eq!(c.make_vocab_size_divisible_by(), 128);
        assert_eq!(c.tensor_model_parallel_size(), 1);
        assert_eq!(c.pipeline_model_parallel_size(), 1);
        assert!(!c.mcore_gpt());
        assert!(!c.transformer_engine());
        assert!(!c.megatron_amp_o2());
        assert!(c.bias());
        assert!(c.share_embeddings_and_output_weights());
        assert_eq!(c.normalization(), "layernorm");
        assert_eq!(c.activation(), "gelu");
        assert!(!c.is_gated());
        assert_eq!(c.position_embedding_type(), "learned_absolute");
        assert_eq!(c.precision(), Some("bf16-mixed"));
        assert_eq!(c.tokenizer(), &Tokenizer::default());
        assert!(c.artifact_refs().is_empty());
    }

    #[test]
    fn gated_activations() {
        for (act, gated) in [
            ("swiglu", true),
            ("fast-swiglu", true),
            ("geglu", true),
            ("fast-geglu", true),
            ("reglu", true),
            ("fast-reglu", true),
            ("gelu", false),
            ("silu", false),
            ("squared-relu", false),
        ] {
            let c = ModelConfig::parse(&format!("activation: {act}\n")).unwrap();
            assert_eq!(c.is_gated(), gated, "{act}");
        }
    }

    #[test]
    fn error_yaml_has_line() {
        let err = ModelConfig::parse("num_layers: 2\nhidden_size: [1, 2\nfoo: 3\n").unwrap_err();
        match &err {
            Error::Yaml { line, .. } => assert!(matches!(line, Some(2..=4)), "{line:?}"),
            other => panic!("wrong error {other:?}"),
        }
        assert!(err.to_string().contains("line "), "{err}");
    }

    #[test]
    fn error_not_a_mapping() {
        let err = ModelConfig::parse("- 1\n- 2\n").unwrap_err();
        assert!(
            matches!(err, Error::NotAMapping { ref key, found: "a sequence" } if key == "<root>")
        );
        let err = ModelConfig::parse("model: 3\n").unwrap_err();
        assert!(matches!(err, Error::NotAMapping { ref key, .. } if key == "model"));
    }

    #[test]
    fn error_wrong_type_names_key() {
        let err = ModelConfig::parse("num_layers: two\n").unwrap_err();
        assert!(matches!(err, Error::WrongType { ref key, .. } if key == "num_layers"));
        assert_eq!(
            err.to_string(),
            "model_config.yaml: num_layers: expected a non-negative integer, found string \"two\""
        );
        let err = ModelConfig::parse("mcore_gpt: 1\n").unwrap_err();
        assert!(matches!(err, Error::WrongType { ref key, .. } if key == "mcore_gpt"));
        let err = ModelConfig::parse("tokenizer:\n  model: 5\n").unwrap_err();
        assert!(matches!(err, Error::WrongType { ref key, .. } if key == "tokenizer.model"));
        let err = ModelConfig::parse("tokenizer: [a]\n").unwrap_err();
        assert!(matches!(err, Error::WrongType { ref key, .. } if key == "tokenizer"));
        let err = ModelConfig::parse("hidden_size: -4\n").unwrap_err();
        assert!(matches!(err, Error::WrongType { ref key, .. } if key == "hidden_size"));
    }

    #[test]
    fn error_missing_required() {
        let c = ModelConfig::parse("hidden_size: 64\n").unwrap();
        assert!(matches!(c.num_layers(), Err(Error::Missing { ref key }) if key == "num_layers"));
        assert!(
            matches!(c.kv_channels(), Err(Error::Missing { ref key }) if key == "num_attention_heads")
        );
    }

    #[test]
    fn error_invalid_value() {
        let err = ModelConfig::parse("tensor_model_parallel_size: 0\n").unwrap_err();
        assert!(
            matches!(err, Error::InvalidValue { ref key, .. } if key == "tensor_model_parallel_size")
        );
        let c = ModelConfig::parse("num_attention_heads: 0\nhidden_size: 8\n").unwrap();
        assert!(matches!(c.kv_channels(), Err(Error::InvalidValue { .. })));
        let err = tiny()
            .with_updates(&[("tensor_model_parallel_size", "{a: 1}")])
            .unwrap_err();
        assert!(matches!(err, Error::InvalidValue { .. }));
        let err = tiny()
            .with_updates(&[("tensor_model_parallel_size", "2\n3")])
            .unwrap_err();
        assert!(matches!(err, Error::InvalidValue { .. }));
    }

    #[test]
    fn edit_changes_only_value_spans() {
        let c = tiny();
        let out = c
            .with_updates(&[
                ("tensor_model_parallel_size", "2"),
                ("pipeline_model_parallel_size", "1"),
                ("tokenizer.model", "nemo:ffff_tokenizer.model"),
            ])
            .unwrap();
        assert_eq!(
            changed_lines(TINY, &out),
            vec![
                (
                    "tensor_model_parallel_size: 1".to_string(),
                    "tensor_model_parallel_size: 2".to_string()
                ),
                (
                    "  model: nemo:79b7d2d99291075a58045d29d6b0b3cc_tokenizer.model".to_string(),
                    "  model: nemo:ffff_tokenizer.model".to_string()
                ),
            ]
        );
        let r = ModelConfig::parse(&out).unwrap();
        assert_eq!(r.tensor_model_parallel_size(), 2);
        assert_eq!(
            r.tokenizer().model.as_deref(),
            Some("nemo:ffff_tokenizer.model")
        );
        // The TP=2 fixture's config is exactly the TP=1 one with this single edit.
        let tp2 = c
            .with_updates(&[("tensor_model_parallel_size", "2")])
            .unwrap();
        let fixture_tp2 = TINY.replace(
            "tensor_model_parallel_size: 1\n",
            "tensor_model_parallel_size: 2\n",
        );
        assert_eq!(tp2, fixture_tp2);
    }

    #[test]
    fn edit_every_scalar_key_of_fixture_touches_one_line() {
        let c = tiny();
        let Some(Value::Mapping(root)) = Some(c.section().clone()) else {
            panic!("fixture root is a mapping");
        };
        let mut keys: Vec<String> = Vec::new();
        for (k, v) in &root {
            let k = k.as_str().expect("string keys").to_string();
            match v {
                Value::Mapping(m) => keys.extend(
                    m.keys()
                        .map(|sub| format!("{k}.{}", sub.as_str().expect("string keys"))),
                ),
                _ => keys.push(k),
            }
        }
        assert_eq!(keys.len(), 74);
        for key in &keys {
            for new in ["7", "null", "'x y'"] {
                let before = c.get(key).expect("key exists").clone();
                let out = c
                    .edit_text(&[(key.as_str(), new)])
                    .unwrap_or_else(|e| panic!("{key}: {e}"));
                let changed = changed_lines(TINY, &out);
                let same = serde_yaml_ng::from_str::<Value>(new).unwrap() == before;
                assert_eq!(changed.len(), usize::from(!same), "{key} = {new}");
                if let Some((_, line)) = changed.first() {
                    let leaf = key.rsplit('.').next().unwrap();
                    assert!(
                        line.trim_start() == format!("{leaf}: {new}"),
                        "{key}: {line}"
                    );
                }
            }
        }
    }

    #[test]
    fn edit_keeps_comments_quotes_and_appends_missing() {
        let text = "# header\nmodel:\n  tensor_model_parallel_size: 1  # was 8\n  name: 'x'\n  precision: \"bf16\"\n  tokenizer:\n    library: sentencepiece\n\n# trailing comment\nother: 1\n";
        let c = ModelConfig::parse(text).unwrap();
        let out = c
            .with_updates(&[
                ("model.tensor_model_parallel_size", "4"),
                ("precision", "'16'"),
                ("virtual_pipeline_model_parallel_size", "null"),
                ("tokenizer.model", "nemo:a_tokenizer.model"),
            ])
            .unwrap();
        assert_eq!(
            out,
            "# header\nmodel:\n  tensor_model_parallel_size: 4  # was 8\n  name: 'x'\n  precision: '16'\n  tokenizer:\n    library: sentencepiece\n    model: nemo:a_tokenizer.model\n  virtual_pipeline_model_parallel_size: null\n\n# trailing comment\nother: 1\n"
        );
        let r = ModelConfig::parse(&out).unwrap();
        assert_eq!(r.precision(), Some("16"));
        assert_eq!(r.tensor_model_parallel_size(), 4);
    }

    #[test]
    fn edit_appends_to_root_and_new_parent() {
        let c = ModelConfig::parse("num_layers: 2").unwrap();
        let out = c
            .with_updates(&[("mcore_gpt", "true"), ("tokenizer.library", "huggingface")])
            .unwrap();
        assert_eq!(
            out,
            "num_layers: 2\nmcore_gpt: true\ntokenizer:\n  library: huggingface\n"
        );
        // Empty value (null) gets a value inserted after the colon; CRLF is kept.
        let c = ModelConfig::parse("a: 1\r\nprecision:\r\nb: 2\r\n").unwrap();
        let out = c.with_updates(&[("precision", "bf16")]).unwrap();
        assert_eq!(out, "a: 1\r\nprecision: bf16\r\nb: 2\r\n");
    }

    #[test]
    fn edit_refuses_wrong_type_for_known_key() {
        let err = tiny()
            .with_updates(&[("tensor_model_parallel_size", "two")])
            .unwrap_err();
        assert!(
            matches!(err, Error::WrongType { ref key, .. } if key == "tensor_model_parallel_size"),
            "{err}"
        );
        let err = tiny()
            .with_updates(&[("pipeline_model_parallel_size", "0")])
            .unwrap_err();
        assert!(matches!(err, Error::InvalidValue { .. }), "{err}");
    }

    #[test]
    fn error_edit_unsupported() {
        let c =
            ModelConfig::parse("precision: |\n  16\nlst: [1, 2]\ntokenizer: null\nm:\n  x: 1\n")
                .unwrap();
        for key in ["precision", "lst", "tokenizer.model", "m"] {
            let err = c.with_updates(&[(key, "1")]).unwrap_err();
            assert!(
                matches!(err, Error::EditUnsupported { key: ref k, .. } if k == key),
                "{key}: {err}"
            );
        }
    }

    #[test]
    fn error_edit_verify() {
        // Line 2 looks like a key to the line scanner but is the continuation of a quoted
        // scalar: the re-parse check must catch the misplaced edit.
        let c = ModelConfig::parse("name: \"first\nprecision: 16\"\n").unwrap();
        assert_eq!(c.precision(), None);
        let err = c.with_updates(&[("precision", "32")]).unwrap_err();
        assert!(
            matches!(err, Error::EditVerify { ref key } if key == "precision"),
            "{err}"
        );
    }
}
