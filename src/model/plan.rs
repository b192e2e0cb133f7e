//! The reshard plan: from a checkpoint's metadata and a target TP/PP, every
//! output rank file NeMo would load at that TP/PP (`model_weights.ckpt`,
//! `mp_rank_XX/`, `tp_rank_XX_pp_rank_YYY/`), its keys in state-dict order and,
//! for each tensor, its dtype, shape and the slices of the canonical (TP=1)
//! tensor it is made of, plus zero fill for vocab padding. Nothing is written;
//! the only payload read is the check that vocab padding rows to be dropped
//! are zero.
//!
//! Megatron semantics (nemo-format.md §1.6, §2, §3): fused QKV is a contiguous
//! dim-0 split of the group-interleaved rows; gated fc1 gives rank r
//! `[gate_r; up_r]`; row-parallel splits the last dim; vocab tensors are
//! re-padded to `ceil(V/(m·T))·(m·T)` rows; tied embeddings get a copy on the
//! last stage at PP>1 only; layers are renumbered per stage; `_extra_state`
//! objects are kept verbatim.

use serde::Serialize;

use crate::formats::torch::Dtype;
use crate::model::canonical::{self, Axis, Canonical, Entry, EntryValue, NormStyle};
use crate::model::checkpoint::{Variant, Weights};
use crate::model::layout::{Rule, StateDictTemplate};

/// Errors planning a reshard; each says which check failed and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The canonical view could not be built or read.
    #[error(transparent)]
    Canonical(#[from] canonical::Error),
    /// A config value is missing or invalid.
    #[error("model_config.yaml: {0}")]
    Config(#[from] crate::model::config::Error),
    /// A target size of zero.
    #[error("target {what} must be at least 1")]
    ZeroSize {
        /// `TP` or `PP`.
        what: &'static str,
    },
    /// A size that the target parallelism does not divide.
    #[error("{what} = {value} is not divisible by the target {by_what} = {by}")]
    NotDivisible {
        /// The config key or quantity.
        what: String,
        /// Its value.
        value: u64,
        /// `TP` or `PP`.
        by_what: &'static str,
        /// The target size.
        by: u64,
    },
    /// `num_query_groups % TP != 0` without the opt-in.
    #[error("num_query_groups = {groups} is not divisible by the target TP = {tp}: a rank would hold part of a query group, which megatron-core 0.16 loads but NeMo 1.x and older megatron-core refuse; pass --allow-partial-query-groups to write it anyway")]
    PartialQueryGroups {
        /// Query groups.
        groups: u64,
        /// Target TP.
        tp: u64,
    },
    /// The true vocabulary size is needed but unknown.
    #[error("cannot tell the padded vocabulary at TP = {tp}: the true vocabulary size is unknown (no tokenizer artifact) and {rows} stored rows allow {a} or {b}; pass --vocab-size")]
    VocabUnknown {
        /// Target TP.
        tp: u64,
        /// Stored rows.
        rows: u64,
        /// One candidate.
        a: u64,
        /// Another candidate.
        b: u64,
    },
    /// A padding row to be dropped is not zero.
    #[error("{key}: row {row} is vocabulary padding that TP = {tp} drops, but it is not zero; refusing to lose data")]
    NonZeroPadding {
        /// The tensor.
        key: String,
        /// The row.
        row: u64,
        /// Target TP.
        tp: u64,
    },
    /// A vocab tensor's rows do not cover the true vocabulary.
    #[error("{key}: {rows} rows, fewer than the true vocabulary size {vocab}")]
    VocabTooSmall {
        /// The tensor.
        key: String,
        /// Rows stored.
        rows: u64,
        /// True vocabulary.
        vocab: u64,
    },
    /// The stored layers disagree with `num_layers`.
    #[error("model_config.yaml says num_layers = {config}, the weights hold {found} layers")]
    LayerCount {
        /// From the config.
        config: u64,
        /// From the weights.
        found: u64,
    },
    /// `--dtype` asks for a cast between types we do not convert.
    #[error("{key}: cannot cast {from} to {to} (only float32, float16 and bfloat16 convert)")]
    Cast {
        /// The tensor.
        key: String,
        /// Stored type.
        from: Dtype,
        /// Requested type.
        to: Dtype,
    },
    /// The model family has no per-rank key template.
    #[error("model family `{0}` has no per-rank state-dict template in formats/")]
    NoTemplate(String),
}

/// What to reshard to.
#[derive(Debug, Clone, Default)]
pub struct ReshardOptions {
    /// Target tensor-parallel size.
    pub tp: u64,
    /// Target pipeline-parallel size.
    pub pp: u64,
    /// Cast floating-point tensors to this type.
    pub dtype: Option<Dtype>,
    /// Allow `num_query_groups % tp != 0` (megatron-core 0.16 semantics).
    pub allow_partial_query_groups: bool,
    /// The true (unpadded) vocabulary size, when no tokenizer artifact says it.
    pub vocab_size: Option<u64>,
}

pub use crate::model::canonical::Segment;

/// One output state-dict entry.
#[derive(Debug, Clone, Serialize)]
pub struct PlanEntry {
    /// Output key.
    pub key: String,
    /// The canonical entry it comes from (`layer` + name), if any.
    pub source: Option<String>,
    /// The tensor or object.
    #[serde(flatten)]
    pub item: PlanItem,
}

/// A tensor or object in the plan.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PlanItem {
    /// A tensor built from canonical slices.
    Tensor {
        /// Index into the canonical entries.
        #[serde(skip)]
        canon: usize,
        /// Stored type.
        source_dtype: Dtype,
        /// Written type.
        dtype: Dtype,
        /// Local shape.
        shape: Vec<u64>,
        /// Bytes written.
        bytes: u64,
        /// The slices, in output order.
        segments: Vec<Segment>,
    },
    /// An opaque object kept verbatim.
    Object {
        /// Index into the canonical entries (None: written as `None`).
        #[serde(skip)]
        canon: Option<usize>,
        /// Which stored copy (source TP rank) is used.
        source_rank: usize,
    },
}

/// One output rank file.
#[derive(Debug, Clone, Serialize)]
pub struct RankPlan {
    /// TP rank.
    pub tp: u64,
    /// PP rank.
    pub pp: u64,
    /// Archive member.
    pub member: String,
    /// Tensor bytes in the file.
    pub bytes: u64,
    /// Entries in state-dict order.
    pub entries: Vec<PlanEntry>,
}

/// Vocabulary padding decisions.
#[derive(Debug, Clone, Serialize)]
pub struct VocabPlan {
    /// True vocabulary, if known.
    pub true_vocab: Option<u64>,
    /// Where it came from.
    pub true_vocab_source: Option<String>,
    /// Stored rows.
    pub source_rows: u64,
    /// Rows written (all ranks together).
    pub target_rows: u64,
}

/// The whole plan.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Source TP.
    pub source_tp: u64,
    /// Source PP.
    pub source_pp: u64,
    /// Target TP.
    pub tp: u64,
    /// Target PP.
    pub pp: u64,
    /// Output layout.
    pub variant: Variant,
    /// Norm naming written.
    pub norm_style: NormStyle,
    /// Config edits `(key, value)`.
    pub config_updates: Vec<(String, String)>,
    /// The new `model_config.yaml` text (None: the source has none).
    #[serde(skip)]
    pub config_text: Option<String>,
    /// Vocab padding.
    pub vocab: Option<VocabPlan>,
    /// Output rank files, in (pp, tp) order.
    pub ranks: Vec<RankPlan>,
    /// Tensor bytes written in all.
    pub bytes: u64,
    /// Non-fatal findings.
    pub warnings: Vec<String>,
}

/// Plans resharding `canon` to `opts.tp` x `opts.pp`.
///
/// # Errors
/// Every check in [`Error`]; nothing is written.
pub fn plan_reshard(canon: &Canonical, opts: &ReshardOptions) -> Result<Plan, Error> {
    let ckpt = canon.checkpoint();
    let cfg = &ckpt.config;
    let (tp, pp) = (opts.tp, opts.pp);
    if tp == 0 {
        return Err(Error::ZeroSize { what: "TP" });
    }
    if pp == 0 {
        return Err(Error::ZeroSize { what: "PP" });
    }
    let template = ckpt
        .family
        .state_dict
        .as_ref()
        .ok_or_else(|| Error::NoTemplate(ckpt.family.family.clone()))?;
    let mut warnings = Vec::new();

    // Divisibility (mcore `divide()` asserts; nemo-format.md §1.6).
    let heads = cfg.num_attention_heads()?;
    let groups = cfg.num_query_groups()?;
    let ffn = cfg.ffn_hidden_size()?;
    let layers = cfg.num_layers()?;
    if layers != canon.num_layers {
        return Err(Error::LayerCount {
            config: layers,
            found: canon.num_layers,
        });
    }
    let div = |what: &str, value: u64, by_what: &'static str, by: u64| {
        if value % by != 0 {
            Err(Error::NotDivisible {
                what: what.to_string(),
                value,
                by_what,
                by,
            })
        } else {
            Ok(())
        }
    };
    div("num_attention_heads", heads, "TP", tp)?;
    div("ffn_hidden_size", ffn, "TP", tp)?;
    div("num_layers", layers, "PP", pp)?;
    if groups % tp != 0 {
        if !opts.allow_partial_query_groups {
            return Err(Error::PartialQueryGroups { groups, tp });
        }
        div(
            "TP (partial query groups need TP % num_query_groups == 0)",
            tp,
            "TP",
            groups,
        )
        .map_err(|_| Error::NotDivisible {
            what: "target TP".into(),
            value: tp,
            by_what: "TP",
            by: groups,
        })?;
        warnings.push(format!(
            "num_query_groups = {groups} is not divisible by TP = {tp}: ranks hold parts of query groups; only megatron-core >= 0.16 loads this"
        ));
    }

    // Vocab padding.
    let vocab = match canon.vocab_rows {
        Some(rows) => Some(plan_vocab(canon, opts, rows)?),
        None => None,
    };
    let target_rows = vocab.as_ref().map(|v| v.target_rows);

    let (src_tp, src_pp) = (ckpt.layout.tp, ckpt.layout.pp);
    let style = match &ckpt.weights {
        Weights::PerRank(_) => canon.norm_style,
        Weights::Dist(_) | Weights::Global(_) if cfg.transformer_engine() => NormStyle::Te,
        Weights::Dist(_) | Weights::Global(_) => NormStyle::Local,
    };
    let tied = cfg.share_embeddings_and_output_weights();
    let variant = Variant::for_sizes(tp, pp);
    let per_stage = layers / pp;

    // Non-layer entries: before the first layer entry = head, after = tail.
    let first_layer = canon
        .entries
        .iter()
        .position(|e| e.layer.is_some())
        .unwrap_or(canon.entries.len());
    // The template decides where known keys go (a distributed checkpoint has
    // no stage order); unknown ones keep their place around the layers.
    let is_head = |i: usize| {
        let e = &canon.entries[i];
        e.layer.is_none()
            && (template.head.contains(&e.name)
                || (!template.tail.contains(&e.name) && i < first_layer))
    };

    let mut ranks = Vec::new();
    let mut total = 0u64;
    for p in 0..pp {
        // The canonical entries of this stage, in output order.
        let mut order: Vec<(String, Option<usize>)> = Vec::new();
        if p == 0 {
            let head: Vec<usize> = (0..canon.entries.len()).filter(|&i| is_head(i)).collect();
            push_ordered(canon, &template.head, &head, &mut order, |n| n.to_string());
        }
        for l in p * per_stage..(p + 1) * per_stage {
            let local = l - p * per_stage;
            let idx: Vec<usize> = (0..canon.entries.len())
                .filter(|&i| canon.entries[i].layer == Some(l))
                .collect();
            let canon_names: Vec<String> = match &ckpt.weights {
                // Per-rank sources keep their own per-layer order (layer 0's).
                Weights::PerRank(_) => canon
                    .entries
                    .iter()
                    .filter(|e| e.layer == Some(0))
                    .map(|e| e.name.clone())
                    .collect(),
                Weights::Dist(_) | Weights::Global(_) => match style {
                    NormStyle::Local => &template.layer_local,
                    NormStyle::Te => &template.layer_te,
                }
                .iter()
                .map(|n| te_name(canon, n))
                .collect(),
            };
            push_ordered(canon, &canon_names, &idx, &mut order, |n| {
                format!(
                    "{}{local}.{}",
                    canon.layer_stem,
                    canon.styled_name(n, style)
                )
            });
        }
        if p + 1 == pp {
            let tail: Vec<usize> = (0..canon.entries.len())
                .filter(|&i| canon.entries[i].layer.is_none() && !is_head(i))
                .collect();
            push_tail(canon, template, &tail, tied, pp, &mut order);
        }
        for t in 0..tp {
            let mut entries = Vec::with_capacity(order.len());
            let mut bytes = 0u64;
            for (key, canon_idx) in &order {
                let full_key = format!("{}{key}", canon.prefix);
                let Some(ci) = canon_idx else {
                    entries.push(PlanEntry {
                        key: full_key,
                        source: None,
                        item: PlanItem::Object {
                            canon: None,
                            source_rank: 0,
                        },
                    });
                    continue;
                };
                let e = &canon.entries[*ci];
                let item = match &e.value {
                    EntryValue::Object(v) => PlanItem::Object {
                        canon: Some(*ci),
                        source_rank: if (t as usize) < v.len() {
                            t as usize
                        } else {
                            0
                        },
                    },
                    EntryValue::Tensor(x) => {
                        let out_dtype = match opts.dtype {
                            // only floating-point tensors are cast; others keep their type
                            Some(d) if d != x.dtype && castable(x.dtype) => {
                                if !castable(d) {
                                    return Err(Error::Cast {
                                        key: full_key,
                                        from: x.dtype,
                                        to: d,
                                    });
                                }
                                d
                            }
                            _ => x.dtype,
                        };
                        let (shape, segments) = canonical::rank_slices(
                            &full_key,
                            &x.shape,
                            x.dtype,
                            x.rule,
                            t,
                            tp,
                            target_rows,
                        )?;
                        let n = shape
                            .iter()
                            .fold(out_dtype.size() as u64, |a, d| a.saturating_mul(*d));
                        bytes += n;
                        PlanItem::Tensor {
                            canon: *ci,
                            source_dtype: x.dtype,
                            dtype: out_dtype,
                            shape,
                            bytes: n,
                            segments,
                        }
                    }
                };
                entries.push(PlanEntry {
                    key: full_key,
                    source: Some(entry_name(e)),
                    item,
                });
            }
            total += bytes;
            ranks.push(RankPlan {
                tp: t,
                pp: p,
                member: variant.rank_member(t, p),
                bytes,
                entries,
            });
        }
    }

    let config_updates = config_updates(cfg, tp, pp);
    let has_config = ckpt
        .archive()
        .members()
        .iter()
        .any(|m| m.name == crate::model::checkpoint::CONFIG_MEMBER);
    let config_text = if has_config {
        let u: Vec<(&str, &str)> = config_updates
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Some(cfg.with_updates(&u)?)
    } else {
        warnings.push("the input has no model_config.yaml; none is written".into());
        None
    };
    if let Some(d) = opts.dtype {
        warnings.push(format!(
            "casting floating-point tensors to {}; `precision` in the config is left as it is",
            d.torch_name()
        ));
    }
    Ok(Plan {
        source_tp: src_tp,
        source_pp: src_pp,
        tp,
        pp,
        variant,
        norm_style: style,
        config_updates,
        config_text,
        vocab,
        ranks,
        bytes: total,
        warnings,
    })
}

fn castable(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

fn entry_name(e: &Entry) -> String {
    match e.layer {
        Some(l) => format!("layer {l}: {}", e.name),
        None => e.name.clone(),
    }
}

/// A template name (either naming) as the canonical (TE) name.
fn te_name(canon: &Canonical, name: &str) -> String {
    for a in &canon.checkpoint().family.norm_aliases {
        if let Some(rest) = name.strip_prefix(a.local.as_str()) {
            return format!("{}{rest}", a.te);
        }
    }
    name.to_string()
}

/// Appends the entries `idx` to `order`: template names first (in template
/// order), then the rest in canonical order.
fn push_ordered(
    canon: &Canonical,
    template: &[String],
    idx: &[usize],
    order: &mut Vec<(String, Option<usize>)>,
    key: impl Fn(&str) -> String,
) {
    let mut used = vec![false; idx.len()];
    for name in template {
        if let Some(j) = idx.iter().position(|&i| &canon.entries[i].name == name) {
            if !used[j] {
                used[j] = true;
                order.push((key(name), Some(idx[j])));
            }
        }
    }
    for (j, &i) in idx.iter().enumerate() {
        if !used[j] {
            order.push((key(&canon.entries[i].name), Some(i)));
        }
    }
}

/// The last stage's non-layer entries, with the tied-output copy added at
/// PP>1 and dropped at PP=1, and the always-present objects.
fn push_tail(
    canon: &Canonical,
    template: &StateDictTemplate,
    tail: &[usize],
    tied: bool,
    pp: u64,
    order: &mut Vec<(String, Option<usize>)>,
) {
    let find = |name: &str| {
        canon
            .entries
            .iter()
            .position(|e| e.layer.is_none() && e.name == name)
    };
    let mut names: Vec<(String, Option<usize>)> = Vec::new();
    for name in &template.tail {
        if template.tied_output.as_deref() == Some(name.as_str()) && tied {
            if pp > 1 {
                // Prefer a stored copy (keeps a round trip exact), else the embedding.
                let src = find(name).or_else(|| template.tied_source.as_deref().and_then(find));
                if src.is_some() {
                    names.push((name.clone(), src));
                }
            }
            continue;
        }
        if let Some(i) = tail
            .iter()
            .copied()
            .find(|&i| canon.entries[i].name == *name)
        {
            names.push((name.clone(), Some(i)));
        } else if template.last_stage_objects.contains(name) {
            names.push((name.clone(), None));
        }
    }
    for &i in tail {
        let n = &canon.entries[i].name;
        if !template.tail.contains(n) {
            names.push((n.clone(), Some(i)));
        }
    }
    order.extend(names);
}

/// Decides the target vocab rows; checks rows to be dropped are zero.
fn plan_vocab(canon: &Canonical, opts: &ReshardOptions, rows: u64) -> Result<VocabPlan, Error> {
    let ckpt = canon.checkpoint();
    let cfg = &ckpt.config;
    let (true_vocab, source) = match opts.vocab_size {
        Some(v) => (Some(v), Some("--vocab-size".to_string())),
        None => tokenizer_vocab(ckpt),
    };
    let target_rows = if let Some(o) = cfg.override_vocab_size() {
        o
    } else if let Some(v) = true_vocab {
        cfg.padded_vocab(v, opts.tp)?
    } else {
        // Unknown V: stored rows = Vp(T_src) bounds V to (rows - m·T_src, rows].
        let m = cfg.make_vocab_size_divisible_by().max(1);
        let lo = rows.saturating_sub(m * ckpt.layout.tp.max(1)) + 1;
        let a = cfg.padded_vocab(lo.min(rows), opts.tp)?;
        let b = cfg.padded_vocab(rows, opts.tp)?;
        if a != b {
            return Err(Error::VocabUnknown {
                tp: opts.tp,
                rows,
                a,
                b,
            });
        }
        a
    };
    if let Some(v) = true_vocab {
        if rows < v {
            return Err(Error::VocabTooSmall {
                key: "embedding.word_embeddings.weight".into(),
                rows,
                vocab: v,
            });
        }
    }
    if target_rows < rows {
        // Dropping padding rows: they must be zero.
        for e in &canon.entries {
            let EntryValue::Tensor(x) = &e.value else {
                continue;
            };
            if x.rule != Rule::Vocab {
                continue;
            }
            let pieces = canon.read(&e.name, x, Axis::First, target_rows..rows)?;
            let row_bytes = x.nbytes() / rows.max(1);
            let mut off = 0u64;
            for p in &pieces {
                let nonzero = match p {
                    crate::io::piece::Piece::Bytes(b) => b.as_slice().iter().position(|&c| c != 0),
                    crate::io::piece::Piece::Zeros(_) => None,
                };
                if let Some(i) = nonzero {
                    return Err(Error::NonZeroPadding {
                        key: format!("{}{}", canon.prefix, e.name),
                        row: target_rows + (off + i as u64) / row_bytes.max(1),
                        tp: opts.tp,
                    });
                }
                off += p.len();
            }
        }
    }
    Ok(VocabPlan {
        true_vocab,
        true_vocab_source: source,
        source_rows: rows,
        target_rows,
    })
}

/// The true vocabulary from a tokenizer artifact the config references.
fn tokenizer_vocab(ckpt: &crate::model::checkpoint::Checkpoint) -> (Option<u64>, Option<String>) {
    let refs = ckpt.config.artifact_refs();
    for name in &ckpt.artifacts {
        if !refs.iter().any(|r| &r.name == name) {
            continue;
        }
        let Ok(bytes) = ckpt.read_member(name) else {
            continue;
        };
        if let Ok(Some(v)) = crate::model::tokenizer::vocab_size(name, bytes.as_slice()) {
            return (Some(v), Some(name.clone()));
        }
    }
    (None, None)
}

/// Config edits of nemo-format.md §1.6.
fn config_updates(
    cfg: &crate::model::config::ModelConfig,
    tp: u64,
    pp: u64,
) -> Vec<(String, String)> {
    let mut u = vec![
        ("tensor_model_parallel_size".to_string(), tp.to_string()),
        ("pipeline_model_parallel_size".to_string(), pp.to_string()),
    ];
    // per-rank files hold every expert on each rank (NeMo keeps expert-parallel models as
    // distributed checkpoints)
    if cfg
        .get("expert_model_parallel_size")
        .and_then(|v| v.as_u64())
        .is_some_and(|ep| ep != 1)
    {
        u.push(("expert_model_parallel_size".to_string(), "1".to_string()));
    }
    // ... split over TP like the dense MLP
    if cfg
        .get("expert_tensor_parallel_size")
        .and_then(|v| v.as_u64())
        .is_some_and(|etp| etp != tp)
    {
        u.push(("expert_tensor_parallel_size".to_string(), tp.to_string()));
    }
    if cfg
        .get("virtual_pipeline_model_parallel_size")
        .is_some_and(|v| !v.is_null())
    {
        u.push((
            "virtual_pipeline_model_parallel_size".to_string(),
            "null".to_string(),
        ));
    }
    let num = |k: &str| cfg.get(k).and_then(|v| v.as_u64());
    if let (Some(mbs), Some(gbs)) = (num("micro_batch_size"), num("global_batch_size")) {
        let m = mbs.saturating_mul(tp).saturating_mul(pp);
        if m > 0 && (gbs < m || gbs % m != 0) {
            u.push(("global_batch_size".to_string(), m.to_string()));
        }
    }
    u
}

impl Plan {
    /// Human-readable plan: per output rank, its tensors, their source slices and bytes.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "reshard TP={} PP={} -> TP={} PP={} ({}, {} norm names), {} tensor bytes",
            self.source_tp,
            self.source_pp,
            self.tp,
            self.pp,
            self.variant.name(),
            match self.norm_style {
                NormStyle::Local => "local",
                NormStyle::Te => "TE",
            },
            self.bytes
        );
        for (k, v) in &self.config_updates {
            let _ = writeln!(s, "config: {k}: {v}");
        }
        if let Some(v) = &self.vocab {
            let _ = writeln!(
                s,
                "vocab: {} stored rows -> {} (true vocab {})",
                v.source_rows,
                v.target_rows,
                v.true_vocab
                    .map(|x| x.to_string())
                    .unwrap_or_else(|| "unknown".into())
            );
        }
        for r in &self.ranks {
            let _ = writeln!(
                s,
                "{} ({} entries, {} bytes)",
                r.member,
                r.entries.len(),
                r.bytes
            );
            for e in &r.entries {
                match &e.item {
                    PlanItem::Tensor {
                        dtype,
                        shape,
                        bytes,
                        segments,
                        ..
                    } => {
                        let segs: Vec<String> = segments
                            .iter()
                            .map(|g| match g {
                                Segment::Slice { axis, start, end } => {
                                    format!(
                                        "{}[{start}..{end}]",
                                        match axis {
                                            Axis::First => "rows",
                                            Axis::Last => "cols",
                                        }
                                    )
                                }
                                Segment::Zeros { bytes } => format!("zeros({bytes})"),
                            })
                            .collect();
                        let _ = writeln!(
                            s,
                            "  {} {}{:?} {} bytes <- {} {}",
                            e.key,
                            dtype.torch_name(),
                            shape,
                            bytes,
                            e.source.as_deref().unwrap_or("-"),
                            segs.join(" + ")
                        );
                    }
                    PlanItem::Object { canon, source_rank } => {
                        let _ = writeln!(
                            s,
                            "  {} object <- {}",
                            e.key,
                            match canon {
                                Some(_) => format!(
                                    "{} (rank {source_rank})",
                                    e.source.as_deref().unwrap_or("-")
                                ),
                                None => "None".into(),
                            }
                        );
                    }
                }
            }
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::Checkpoint;

    fn fixture(rel: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    fn opts(tp: u64, pp: u64) -> ReshardOptions {
        ReshardOptions {
            tp,
            pp,
            ..Default::default()
        }
    }

    #[test]
    fn tp1_to_tp2_has_the_fixture_keys_in_order() {
        let c1 =
            Checkpoint::open(fixture("fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo")).unwrap();
        let c2 =
            Checkpoint::open(fixture("fixtures/mcore/llama/nemo/tiny_llama_tp2.nemo")).unwrap();
        let plan = plan_reshard(&Canonical::new(&c1).unwrap(), &opts(2, 1)).unwrap();
        assert_eq!(plan.ranks.len(), 2);
        for (r, want) in plan.ranks.iter().zip(c2.rank_files()) {
            assert_eq!(r.member, want.member);
            let keys: Vec<&str> = r.entries.iter().map(|e| e.key.as_str()).collect();
            let want: Vec<&str> = want.entries().map(|(k, _)| k).collect();
            assert_eq!(keys, want);
        }
        let v = plan.vocab.unwrap();
        assert_eq!((v.true_vocab, v.target_rows), (Some(100), 128));
        assert!(plan
            .config_updates
            .contains(&("tensor_model_parallel_size".into(), "2".into())));
    }

    #[test]
    fn divisibility_errors() {
        let c1 =
            Checkpoint::open(fixture("fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo")).unwrap();
        let canon = Canonical::new(&c1).unwrap();
        // heads 8, groups 2, ffn 96, layers 2
        let e = plan_reshard(&canon, &opts(3, 1)).unwrap_err();
        assert!(
            matches!(e, Error::NotDivisible { ref what, .. } if what == "num_attention_heads"),
            "{e}"
        );
        let e = plan_reshard(&canon, &opts(4, 1)).unwrap_err();
        assert!(
            matches!(e, Error::PartialQueryGroups { groups: 2, tp: 4 }),
            "{e}"
        );
        let mut o = opts(4, 1);
        o.allow_partial_query_groups = true;
        let p = plan_reshard(&canon, &o).unwrap();
        assert_eq!(p.warnings.len(), 1);
        let e = plan_reshard(&canon, &opts(1, 3)).unwrap_err();
        assert!(
            matches!(e, Error::NotDivisible { ref what, .. } if what == "num_layers"),
            "{e}"
        );
        let e = plan_reshard(&canon, &opts(0, 1)).unwrap_err();
        assert!(matches!(e, Error::ZeroSize { what: "TP" }), "{e}");
        let e = plan_reshard(&canon, &opts(1, 0)).unwrap_err();
        assert!(matches!(e, Error::ZeroSize { what: "PP" }), "{e}");
        let mut o = opts(1, 1);
        o.dtype = Some(Dtype::I64);
        let e = plan_reshard(&canon, &o).unwrap_err();
        assert!(matches!(e, Error::Cast { .. }), "{e}");
    }

    #[test]
    fn tied_copy_on_last_stage_only_at_pp_gt_1() {
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = crate::testkit::synth::Spec::tiny();
        spec.tied = true;
        let path = tmp.path().join("t.nemo");
        crate::testkit::synth::write_nemo(
            &spec,
            1,
            1,
            crate::testkit::synth::Fill::Random(1),
            &path,
        )
        .unwrap();
        let c = Checkpoint::open(&path).unwrap();
        let canon = Canonical::new(&c).unwrap();
        let mut o = opts(1, 2);
        o.vocab_size = Some(spec.vocab);
        let p = plan_reshard(&canon, &o).unwrap();
        let last = &p.ranks[1];
        assert!(last
            .entries
            .iter()
            .any(|e| e.key == "model.output_layer.weight"));
        assert!(!p.ranks[0]
            .entries
            .iter()
            .any(|e| e.key == "model.output_layer.weight"));
        let mut o = opts(2, 1);
        o.vocab_size = Some(spec.vocab);
        let p = plan_reshard(&canon, &o).unwrap();
        assert!(!p.ranks[0]
            .entries
            .iter()
            .any(|e| e.key == "model.output_layer.weight"));
        assert!(p.ranks[0]
            .entries
            .iter()
            .any(|e| e.key == "model.output_layer._extra_state"));
    }

    #[test]
    fn vocab_rows_and_unknown_vocab() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = crate::testkit::synth::Spec::tiny(); // vocab 100, m 16: Vp(1)=112, Vp(2)=128
        let path = tmp.path().join("t.nemo");
        crate::testkit::synth::write_nemo(
            &spec,
            1,
            1,
            crate::testkit::synth::Fill::Random(1),
            &path,
        )
        .unwrap();
        let c = Checkpoint::open(&path).unwrap();
        let canon = Canonical::new(&c).unwrap();
        // 112 rows at TP=1 means V in 97..=112: Vp(2) = 128 either way.
        let p = plan_reshard(&canon, &opts(2, 1)).unwrap();
        assert_eq!(p.vocab.as_ref().unwrap().true_vocab, None);
        assert_eq!(p.vocab.unwrap().target_rows, 128);
        let emb = &p.ranks[1].entries[0];
        assert_eq!(emb.key, "model.embedding.word_embeddings.weight");
        let PlanItem::Tensor {
            segments, shape, ..
        } = &emb.item
        else {
            panic!()
        };
        assert_eq!(shape, &vec![64, 64]);
        assert_eq!(
            segments,
            &vec![
                Segment::Slice {
                    axis: Axis::First,
                    start: 64,
                    end: 112
                },
                Segment::Zeros { bytes: 16 * 64 * 4 }
            ]
        );
        // random (non-zero) padding rows cannot be dropped
        let mut o = opts(1, 1);
        o.vocab_size = Some(90); // Vp(1) = 96 < 112 stored
        let e = plan_reshard(&canon, &o).unwrap_err();
        assert!(matches!(e, Error::NonZeroPadding { row: 96, .. }), "{e}");
    }

    #[test]
    fn ambiguous_vocab_needs_the_true_size() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = crate::testkit::synth::Spec::tiny();
        let path = tmp.path().join("t2.nemo");
        crate::testkit::synth::write_nemo(
            &spec,
            2,
            1,
            crate::testkit::synth::Fill::Random(1),
            &path,
        )
        .unwrap();
        let c = Checkpoint::open(&path).unwrap();
        let canon = Canonical::new(&c).unwrap();
        // 128 rows at TP=2 means V in 97..=128: Vp(1) is 112 or 128.
        let e = plan_reshard(&canon, &opts(1, 1)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::VocabUnknown {
                    rows: 128,
                    a: 112,
                    b: 128,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn vocab_size_larger_than_the_rows_is_refused() {
        let c1 =
            Checkpoint::open(fixture("fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo")).unwrap();
        let canon = Canonical::new(&c1).unwrap();
        let mut o = opts(2, 1);
        o.vocab_size = Some(200);
        let e = plan_reshard(&canon, &o).unwrap_err();
        assert!(
            matches!(
                e,
                Error::VocabTooSmall {
                    rows: 128,
                    vocab: 200,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_checkpoint_without_config_cannot_be_planned() {
        let c = Checkpoint::open(fixture("fixtures/zarr/llama_tp2/model_weights")).unwrap();
        let canon = Canonical::new(&c).unwrap();
        let e = plan_reshard(&canon, &opts(2, 1)).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
        assert!(e.to_string().contains("num_attention_heads"), "{e}");
    }

    #[test]
    fn layer_count_mismatch_and_no_template() {
        let c1 =
            Checkpoint::open(fixture("fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo")).unwrap();
        let mut canon = Canonical::new(&c1).unwrap();
        canon.num_layers = 3;
        let e = plan_reshard(&canon, &opts(1, 1)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::LayerCount {
                    config: 2,
                    found: 3
                }
            ),
            "{e}"
        );
    }
}
