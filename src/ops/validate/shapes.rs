//! Shape checks of `validate`: the tensors a Megatron-Core GPT config implies
//! (names in canonical TE naming, global TP=1 shapes), each rank's local
//! shapes against the partition rules at the T on disk, the layer count and
//! the vocab padding.

use std::collections::{BTreeMap, BTreeSet};

use crate::formats::torch::Value;
use crate::model::canonical::{Canonical, EntryValue};
use crate::model::checkpoint::{Checkpoint, Variant};
use crate::model::layout::Rule;

use super::{Code, Severity};

/// Where findings go.
pub(super) type Sink<'a> = &'a mut dyn FnMut(Code, Severity, String, String);

/// Expected global shapes by (per-layer?, canonical layer-relative name).
pub(super) struct Expected {
    /// Required tensors.
    pub shapes: BTreeMap<(bool, String), Vec<u64>>,
    /// Known names that may or may not be there (shape still checked).
    pub optional: BTreeMap<(bool, String), Vec<u64>>,
    /// Layers the config says.
    pub layers: u64,
    /// T the local shapes are split by.
    pub tp: u64,
}

/// The vocab rows the padding rule gives, or the stored rows when the true
/// vocabulary is unknown; reports padding findings.
fn vocab_rows(ckpt: &Checkpoint, stored: Option<u64>, given: Option<u64>, sink: Sink) -> u64 {
    let cfg = &ckpt.config;
    let tp = padding_tp(ckpt);
    let Some(stored) = stored else {
        return 0;
    };
    let place = "embedding.word_embeddings.weight".to_string();
    let v = given.or_else(|| crate::ops::checksum::tokenizer_vocab(ckpt).map(|(v, _)| v));
    match v {
        Some(v) => match cfg.embedding_rows(v, tp) {
            Ok(want) if want != stored => sink(
                Code::VocabPadding,
                Severity::Error,
                place,
                format!(
                    "{stored} rows, but vocabulary {v} padded for TP={tp} (make_vocab_size_divisible_by {}) gives {want}",
                    cfg.make_vocab_size_divisible_by()
                ),
            ),
            _ => {}
        },
        None => {
            let m = cfg.make_vocab_size_divisible_by().saturating_mul(tp).max(1);
            if cfg.override_vocab_size().is_none() && stored % m != 0 {
                sink(
                    Code::VocabPadding,
                    Severity::Error,
                    place,
                    format!("{stored} rows is not a multiple of make_vocab_size_divisible_by x TP = {m}"),
                );
            }
        }
    }
    stored
}

/// The T vocab padding follows: the per-rank layout's, or the config's for a
/// distributed checkpoint (which keeps the padding of the run that saved it).
fn padding_tp(ckpt: &Checkpoint) -> u64 {
    if ckpt.layout.variant == Variant::Distributed {
        ckpt.config.tensor_model_parallel_size().max(1)
    } else {
        ckpt.layout.tp.max(1)
    }
}

/// What the config implies (Megatron-Core GPT family only; `None` otherwise
/// or when architecture keys are missing, which is reported).
fn expected(ckpt: &Checkpoint, rows: u64, sink: Sink) -> Option<Expected> {
    if ckpt.family.family != "mcore-gpt" {
        return None;
    }
    let cfg = &ckpt.config;
    let arch = (|| {
        Ok::<_, crate::model::config::Error>((
            cfg.num_layers()?,
            cfg.hidden_size()?,
            cfg.ffn_hidden_size()?,
            cfg.num_attention_heads()?,
            cfg.num_query_groups()?,
            cfg.kv_channels()?,
        ))
    })();
    let (layers, h, ffn, nh, ng, d) = match arch {
        Ok(a) => a,
        Err(e) => {
            sink(
                Code::BadConfig,
                Severity::Error,
                crate::model::checkpoint::CONFIG_MEMBER.to_string(),
                e.to_string(),
            );
            return None;
        }
    };
    let norm_bias = cfg.normalization() != "rmsnorm";
    let bias = cfg.bias();
    let mut shapes = BTreeMap::new();
    let mut optional = BTreeMap::new();
    let mut req = |layer: bool, name: &str, s: Vec<u64>, on: bool| {
        if on {
            shapes.insert((layer, name.to_string()), s);
        }
    };
    req(
        false,
        "embedding.word_embeddings.weight",
        vec![rows, h],
        true,
    );
    req(false, "decoder.final_layernorm.weight", vec![h], true);
    req(false, "decoder.final_layernorm.bias", vec![h], norm_bias);
    req(
        false,
        "output_layer.weight",
        vec![rows, h],
        !cfg.share_embeddings_and_output_weights(),
    );
    if cfg.position_embedding_type() == "learned_absolute" {
        if let Some(n) = cfg.get("max_position_embeddings").and_then(|v| v.as_u64()) {
            req(
                false,
                "embedding.position_embeddings.weight",
                vec![n, h],
                true,
            );
        }
    }
    let qkv = (nh + 2 * ng) * d;
    let fc1 = if cfg.is_gated() { 2 * ffn } else { ffn };
    for (pre, on_bias) in [
        ("self_attention.linear_qkv.layer_norm_", norm_bias),
        ("mlp.linear_fc1.layer_norm_", norm_bias),
    ] {
        req(true, &format!("{pre}weight"), vec![h], true);
        req(true, &format!("{pre}bias"), vec![h], on_bias);
    }
    req(true, "self_attention.linear_qkv.weight", vec![qkv, h], true);
    let flag = |k: &str| cfg.get(k).and_then(|v| v.as_bool()) == Some(true);
    let qkv_bias = bias || flag("qkv_bias") || flag("add_qkv_bias");
    req(true, "self_attention.linear_qkv.bias", vec![qkv], qkv_bias);
    req(
        true,
        "self_attention.linear_proj.weight",
        vec![h, nh * d],
        true,
    );
    req(true, "self_attention.linear_proj.bias", vec![h], bias);
    let experts = cfg
        .get("num_moe_experts")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    if experts > 0 {
        // SequentialMLP: the router and every expert's MLP, in every layer
        let effn = cfg
            .get("moe_ffn_hidden_size")
            .and_then(|v| v.as_u64())
            .unwrap_or(ffn);
        let efc1 = if cfg.is_gated() { 2 * effn } else { effn };
        req(true, "mlp.router.weight", vec![experts, h], true);
        for e in 0..experts {
            let x = |m: &str| format!("mlp.experts.local_experts.{e}.{m}");
            req(true, &x("linear_fc1.weight"), vec![efc1, h], true);
            req(true, &x("linear_fc1.bias"), vec![efc1], bias);
            req(true, &x("linear_fc2.weight"), vec![h, effn], true);
            req(true, &x("linear_fc2.bias"), vec![h], bias);
        }
    } else {
        req(true, "mlp.linear_fc1.weight", vec![fc1, h], true);
        req(true, "mlp.linear_fc1.bias", vec![fc1], bias);
        req(true, "mlp.linear_fc2.weight", vec![h, ffn], true);
        req(true, "mlp.linear_fc2.bias", vec![h], bias);
    }
    let qk_norm = flag("qk_layernorm");
    for n in ["q_layernorm", "k_layernorm"] {
        req(
            true,
            &format!("self_attention.{n}.weight"),
            vec![d],
            qk_norm,
        );
        req(
            true,
            &format!("self_attention.{n}.bias"),
            vec![d],
            qk_norm && norm_bias,
        );
        if !qk_norm {
            optional.insert((true, format!("self_attention.{n}.weight")), vec![d]);
            optional.insert((true, format!("self_attention.{n}.bias")), vec![d]);
        }
    }
    Some(Expected {
        shapes,
        optional,
        layers,
        tp: ckpt.layout.tp.max(1),
    })
}

impl Expected {
    fn get(&self, layer: bool, name: &str) -> Option<&Vec<u64>> {
        let k = (layer, name.to_string());
        self.shapes.get(&k).or_else(|| self.optional.get(&k))
    }
}

/// (per-layer?, canonical layer-relative name) of a stored key.
fn canonical_key(ckpt: &Checkpoint, key: &str) -> (bool, String) {
    let body = ckpt.family.strip_prefix(key);
    let stem = ckpt
        .family
        .state_dict
        .as_ref()
        .map(|t| t.layers.as_str())
        .unwrap_or("decoder.layers.");
    if let Some(rest) = body.strip_prefix(stem) {
        if let Some((num, name)) = rest.split_once('.') {
            if num.parse::<u64>().is_ok() {
                for a in &ckpt.family.norm_aliases {
                    if let Some(r) = name.strip_prefix(a.local.as_str()) {
                        return (true, format!("{}{r}", a.te));
                    }
                }
                return (true, name.to_string());
            }
        }
    }
    (false, body.to_string())
}

/// Local shape checks, before the canonical view is built (which refuses
/// inconsistent shards): each rank's tensors against config, T and rules.
/// Returns the canonical names with a local finding.
pub(super) fn check_local(
    ckpt: &Checkpoint,
    given_vocab: Option<u64>,
    sink: Sink,
) -> BTreeSet<(bool, String)> {
    let mut flagged = BTreeSet::new();
    let ranks = ckpt.rank_files();
    if ranks.is_empty() {
        return flagged;
    }
    // Stored vocab rows, from the first rank holding the embedding.
    let stored = ranks.iter().find_map(|r| {
        r.entries().find_map(|(k, v)| match v {
            Value::Tensor(t) if k.ends_with("embedding.word_embeddings.weight") => {
                t.shape.first().map(|n| n * ckpt.layout.tp.max(1))
            }
            _ => None,
        })
    });
    let mut quiet = |_: Code, _: Severity, _: String, _: String| {};
    let rows = vocab_rows(ckpt, stored, given_vocab, &mut quiet);
    let Some(exp) = expected(ckpt, rows, &mut quiet) else {
        return flagged;
    };
    let cfg = &ckpt.config;
    check_stage_layers(ckpt, exp.layers, sink);
    for r in ranks {
        for (key, v) in r.entries() {
            let Value::Tensor(t) = v else { continue };
            let ck = canonical_key(ckpt, key);
            let Some(global) = exp.get(ck.0, &ck.1) else {
                continue;
            };
            let rule = ckpt
                .family
                .lookup(key)
                .map(|m| {
                    ckpt.family
                        .resolve(m.rule, cfg.activation(), cfg.is_gated())
                })
                .unwrap_or(Rule::Replicated);
            let mut want = global.clone();
            if let Some(d) = rule.split_dim(want.len()) {
                if let Some(x) = want.get_mut(d) {
                    if *x % exp.tp != 0 {
                        sink(
                            Code::ShapeMismatch,
                            Severity::Error,
                            format!("{}:{key}", r.member),
                            format!(
                                "the config gives global shape {global:?}, whose dim {d} TP={} does not divide",
                                exp.tp
                            ),
                        );
                        flagged.insert(ck.clone());
                        continue;
                    }
                    *x /= exp.tp;
                }
            }
            if t.shape != want {
                sink(
                    Code::ShapeMismatch,
                    Severity::Error,
                    format!("{}:{key}", r.member),
                    format!(
                        "local shape {:?}, but the config with TP={} and the `{}` rule give {want:?}",
                        t.shape,
                        exp.tp,
                        rule.name()
                    ),
                );
                flagged.insert(ck.clone());
            }
        }
    }
    flagged
}

/// Each pipeline stage holds `num_layers / P` layers (NeMo's even split).
fn check_stage_layers(ckpt: &Checkpoint, layers: u64, sink: Sink) {
    let pp = ckpt.layout.pp.max(1);
    if pp < 2 || layers % pp != 0 {
        return; // P = 1: the total is checked on the canonical view
    }
    let mut per_stage: BTreeMap<u64, (String, u64)> = BTreeMap::new();
    for r in ckpt.rank_files().iter().filter(|r| r.tp == 0) {
        let n = r
            .entries()
            .filter_map(|(k, _)| ckpt.family.lookup(k).and_then(|m| m.layer))
            .map(|l| l.saturating_add(1))
            .max()
            .unwrap_or(0);
        per_stage.insert(r.pp, (r.member.clone(), n));
    }
    for (member, n) in per_stage.values() {
        if *n != layers / pp {
            sink(
                Code::LayerCount,
                Severity::Error,
                member.clone(),
                format!(
                    "holds {n} layers, but num_layers {layers} over PP={pp} gives {} per stage",
                    layers / pp
                ),
            );
        }
    }
}

/// Global checks on the canonical view: required tensors present, global
/// shapes, unexplained tensors, layer count, vocab padding.
pub(super) fn check_global(
    ckpt: &Checkpoint,
    canon: &Canonical,
    given_vocab: Option<u64>,
    flagged: &BTreeSet<(bool, String)>,
    sink: Sink,
) {
    let rows = vocab_rows(ckpt, canon.vocab_rows, given_vocab, sink);
    let Some(exp) = expected(ckpt, rows, sink) else {
        return;
    };
    if canon.num_layers != exp.layers {
        sink(
            Code::LayerCount,
            Severity::Error,
            "num_layers".to_string(),
            format!(
                "config says {} layers, the weights hold {}",
                exp.layers, canon.num_layers
            ),
        );
    }
    let mut seen: BTreeSet<(Option<u64>, String)> = BTreeSet::new();
    for e in &canon.entries {
        let EntryValue::Tensor(t) = &e.value else {
            continue;
        };
        let name = crate::ops::checksum::canonical_name(canon, e.layer, &e.name);
        if crate::ops::checksum::is_tied_copy(canon, e.layer, &e.name) {
            continue;
        }
        seen.insert((e.layer, e.name.clone()));
        let k = (e.layer.is_some(), e.name.clone());
        match exp.get(k.0, &k.1) {
            Some(want) if *want != t.shape && !flagged.contains(&k) => sink(
                Code::ShapeMismatch,
                Severity::Error,
                name,
                format!("global shape {:?}, the config gives {want:?}", t.shape),
            ),
            Some(_) => {}
            None => sink(
                Code::UnexpectedTensor,
                Severity::Warning,
                name,
                format!(
                    "{} {:?}: not implied by the config's architecture",
                    t.dtype, t.shape
                ),
            ),
        }
    }
    for (layer, name) in exp.shapes.keys() {
        let layers: Vec<Option<u64>> = if *layer {
            // Bounded by the layers actually stored (and a cap: both numbers
            // come from the input).
            let n = exp
                .layers
                .min(canon.num_layers)
                .min(crate::model::canonical::MAX_LAYERS);
            (0..n).map(Some).collect()
        } else {
            vec![None]
        };
        for l in layers {
            if !seen.contains(&(l, name.clone())) {
                sink(
                    Code::MissingTensor,
                    Severity::Error,
                    crate::ops::checksum::canonical_name(canon, l, name),
                    "the config's architecture needs this tensor".to_string(),
                );
            }
        }
    }
}
