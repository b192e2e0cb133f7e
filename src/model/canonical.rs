//! The canonical view of a checkpoint: every model tensor in TP=1 global
//! coordinates, one entry per **global** layer, whatever the stored layout
//! (per-rank files at any TP/PP, or a distributed checkpoint with stacked
//! layers). Payloads are never copied: a canonical tensor knows the stored
//! pieces it is made of, and [`Canonical::read`] returns the row-major bytes of
//! a slice of it as [`Piece`]s that borrow the input mapping.
//!
//! Naming (documented contract for `reshard`, `validate`, `diff`, `convert`):
//! - a per-layer entry has `layer = Some(global layer)` and a layer-relative
//!   `name` (`self_attention.linear_qkv.weight`); other entries have
//!   `layer = None` and the key without its family prefix
//!   (`embedding.word_embeddings.weight`);
//! - norms use the TE / distributed-checkpoint names
//!   (`self_attention.linear_qkv.layer_norm_weight`,
//!   `mlp.linear_fc1.layer_norm_weight`) even for local-spec files, whose
//!   `input_layernorm.` / `pre_mlp_layernorm.` names are mapped by the family's
//!   `norm_aliases`; [`Canonical::norm_style`] records what the source used;
//! - vocab-parallel tensors keep the source's padded row count
//!   ([`Canonical::vocab_rows`]); re-padding is the caller's business.
//!
//! Inverse partition rules (nemo-format.md §3.8): column, vocab and fused QKV
//! concatenate dim 0; row concatenates the last dim; gated fc1 is
//! `[all gate halves; all up halves]`; replicated takes TP rank 0; a stacked
//! distributed tensor is read one layer box at a time.
//!
//! The forward rules live here too: [`rank_slices`] says which slices of a
//! canonical tensor (plus vocab zero padding) make TP rank `r`'s local tensor,
//! and [`Canonical::read_segments`] reads them. This module is the one owner
//! of the TP/PP partition rules: `reshard` (via `plan`), `convert`,
//! `validate`/`checksum`/`diff` and the distill weight loader all go through it.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::formats::dist::DistCheckpoint;
use crate::formats::torch::{Dtype, Value};
use crate::io::piece::Piece;
use crate::model::checkpoint::{Checkpoint, GlobalTensor, GlobalValue, Weights};
use crate::model::layout::Rule;

/// Errors building or reading the canonical view; each names the tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config lacks or has an invalid architecture value.
    #[error("model_config.yaml: {0}")]
    Config(#[from] crate::model::config::Error),
    /// Per-rank files whose split the layout rules cannot undo exactly.
    #[error("model_config.yaml: {0}")]
    Layout(String),
    /// A TP rank of a stage lacks a key that rank 0 has, or holds another kind of value.
    #[error("{key}: missing or not a tensor in {member}")]
    MissingShard {
        /// The stored key.
        key: String,
        /// The rank file.
        member: String,
    },
    /// Shards of one tensor disagree in dtype or in the dims that are not split.
    #[error("{key}: shard in {member} has {found}, rank 0 has {expected}")]
    ShardMismatch {
        /// The stored key.
        key: String,
        /// The rank file.
        member: String,
        /// What this shard has.
        found: String,
        /// What rank 0 has.
        expected: String,
    },
    /// A gated fc1 shard with an odd number of rows.
    #[error("{key}: gated fc1 shard in {member} has {rows} rows, expected an even number")]
    OddGatedShard {
        /// The stored key.
        key: String,
        /// The rank file.
        member: String,
        /// Rows found.
        rows: u64,
    },
    /// A tensor's bytes could not be viewed.
    #[error("{key}: {source}")]
    Tensor {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: crate::formats::torch::tensor::Error,
    },
    /// The distributed checkpoint could not be read.
    #[error("{key}: {source}")]
    Dist {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: Box<crate::formats::dist::Error>,
    },
    /// A slice outside the tensor, or along an axis the layout cannot serve.
    #[error("{key}: cannot read {axis:?} slice {start}..{end} of a tensor of shape {shape:?}")]
    BadSlice {
        /// The key.
        key: String,
        /// The axis.
        axis: Axis,
        /// Slice start.
        start: u64,
        /// Slice end.
        end: u64,
        /// Global shape.
        shape: Vec<u64>,
    },
    /// A replicated tensor differs between TP ranks.
    #[error("{key}: replicated tensor differs between TP rank 0 and {member}")]
    ReplicaMismatch {
        /// The key (canonical name).
        key: String,
        /// The rank file whose copy differs.
        member: String,
    },
    /// A stacked distributed tensor whose layer axis disagrees with the model.
    #[error("{key}: stacked layer axis is {found}, other tensors say {expected} layers")]
    LayerCount {
        /// The key.
        key: String,
        /// Its leading dim.
        found: u64,
        /// The layer count.
        expected: u64,
    },
    /// A tensor whose split dim the target TP does not divide.
    #[error("{key}: dim {dim} of shape {shape:?} is not divisible by the target TP = {tp}")]
    Indivisible {
        /// The tensor.
        key: String,
        /// The dim.
        dim: usize,
        /// Its shape.
        shape: Vec<u64>,
        /// Target TP.
        tp: u64,
    },
    /// A stacked layer axis longer than [`MAX_LAYERS`] (hostile metadata
    /// could otherwise make the view loop over 2^40 layers).
    #[error("{key}: stacked layer axis of {found} layers is over the {MAX_LAYERS} cap")]
    TooManyLayers {
        /// The key.
        key: String,
        /// Its leading dim.
        found: u64,
    },
}

/// The layer-relative name megatron-core's distributed checkpoint gives SequentialMLP experts,
/// stacked `[experts, ...]` (and `[layers, experts, ...]` across layers).
const DIST_EXPERTS: &str = "mlp.experts.experts.";
/// The per-expert name of the per-rank state dict.
const LOCAL_EXPERTS: &str = "mlp.experts.local_experts.";

/// The layer-relative prefix of megatron-core's SharedExpertMLP.
const SHARED_EXPERTS: &str = "mlp.shared_experts.";

/// Where an expert's entry sorts within its layer: by expert, then fc1 before fc2, each
/// tensor before its extra state, the shared experts (gate first) after the routed ones, as
/// megatron-core's MoELayer orders its state dict; None (first) for the other entries.
fn expert_order(name: &str) -> Option<(u64, u8)> {
    let (e, tail) = match name.strip_prefix(SHARED_EXPERTS) {
        Some("gate_weight") => return Some((u64::MAX, 0)),
        Some(tail) => (u64::MAX, tail),
        None => {
            let rest = name.strip_prefix(LOCAL_EXPERTS)?;
            let (e, tail) = rest.split_once('.')?;
            (e.parse().ok()?, tail)
        }
    };
    let k = 1 + [
        "linear_fc1.weight",
        "linear_fc1.bias",
        "linear_fc1._extra_state",
        "linear_fc2.weight",
        "linear_fc2.bias",
        "linear_fc2._extra_state",
    ]
    .iter()
    .position(|k| *k == tail)
    .unwrap_or(6) as u8;
    Some((e, k))
}

/// Most layers a stacked distributed tensor may declare.
pub const MAX_LAYERS: u64 = 1 << 16;

/// Which norm naming the source used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NormStyle {
    /// Separate `input_layernorm` / `pre_mlp_layernorm` modules (local spec).
    Local,
    /// Norms fused into the linear layers (TransformerEngine spec, and every
    /// distributed checkpoint).
    Te,
}

/// A slicing axis of a canonical tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    /// Dim 0 (whole rows).
    First,
    /// The last dim (for every index of the other dims).
    Last,
}

/// One slice of a rank-local tensor's bytes, in output order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Segment {
    /// `start..end` along `axis` of the canonical tensor (all other dims).
    Slice {
        /// The axis.
        axis: Axis,
        /// First index.
        start: u64,
        /// End index (exclusive).
        end: u64,
    },
    /// Zero bytes (vocab padding rows).
    Zeros {
        /// Byte count.
        bytes: u64,
    },
}

/// The partition rules forward: the local shape of TP rank `rank` of `tp`
/// and the [`Segment`]s of the canonical tensor (`shape`, `dtype`, `rule`)
/// it is made of (nemo-format.md §3.1). Column, vocab and QKV take a
/// contiguous dim-0 block; row the last dim; gated fc1 `[gate_r; up_r]`;
/// replicated all of it. Vocab tensors are cut from `vocab_rows` rows
/// (default: the stored ones): rows past the stored ones are zero fill.
///
/// # Errors
/// [`Error::Indivisible`] when `tp` does not divide the split dim.
pub fn rank_slices(
    key: &str,
    shape: &[u64],
    dtype: Dtype,
    rule: Rule,
    rank: u64,
    tp: u64,
    vocab_rows: Option<u64>,
) -> Result<(Vec<u64>, Vec<Segment>), Error> {
    let mut local = shape.to_vec();
    let nd = local.len();
    let indivisible = |dim| Error::Indivisible {
        key: key.to_string(),
        dim,
        shape: shape.to_vec(),
        tp,
    };
    let slice = |axis, r: Range<u64>| Segment::Slice {
        axis,
        start: r.start,
        end: r.end,
    };
    let whole = || slice(Axis::First, 0..shape.first().copied().unwrap_or(1));
    let chunk = |n: u64, dim: usize| -> Result<Range<u64>, Error> {
        if tp == 0 || n % tp != 0 {
            return Err(indivisible(dim));
        }
        let w = n / tp;
        Ok(rank * w..(rank + 1) * w)
    };
    if nd == 0 {
        return Ok((local, vec![whole()]));
    }
    let segs = match rule {
        Rule::Replicated | Rule::ExtraState => vec![whole()],
        Rule::Row if nd >= 2 => {
            let r = chunk(local[nd - 1], nd - 1)?;
            local[nd - 1] = r.end - r.start;
            vec![slice(Axis::Last, r)]
        }
        Rule::GatedFc1 => {
            // An odd row count has no [gate; up] halves.
            if local[0] % 2 != 0 {
                return Err(indivisible(0));
            }
            let f = local[0] / 2;
            let r = chunk(f, 0)?;
            local[0] = 2 * (r.end - r.start);
            vec![
                slice(Axis::First, r.clone()),
                slice(Axis::First, f + r.start..f + r.end),
            ]
        }
        Rule::Vocab => {
            let stored = local[0];
            let rows = vocab_rows.unwrap_or(stored);
            let r = chunk(rows, 0)?;
            local[0] = r.end - r.start;
            let row_bytes: u64 = shape[1..]
                .iter()
                .fold(dtype.size() as u64, |a, d| a.saturating_mul(*d));
            let have = r.start.min(stored)..r.end.min(stored);
            let mut v = Vec::new();
            if have.start < have.end {
                v.push(slice(Axis::First, have.clone()));
            }
            let zero_rows = (r.end - r.start) - (have.end - have.start);
            if zero_rows > 0 {
                v.push(Segment::Zeros {
                    bytes: zero_rows * row_bytes,
                });
            }
            v
        }
        // column, qkv, plain fc1, 1-D row
        _ => {
            let r = chunk(local[0], 0)?;
            local[0] = r.end - r.start;
            vec![slice(Axis::First, r)]
        }
    };
    Ok((local, segs))
}

/// One entry of the canonical model.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Global layer, for per-layer entries.
    pub layer: Option<u64>,
    /// Layer-relative name (per-layer entries) or prefix-less key.
    pub name: String,
    /// The tensor or object.
    pub value: EntryValue,
}

/// A canonical tensor or an opaque object.
#[derive(Debug, Clone)]
pub enum EntryValue {
    /// A tensor in TP=1 coordinates.
    Tensor(Tensor),
    /// An opaque object (`_extra_state`): the stored value of each source TP
    /// rank in rank order (one value when the source stores it once).
    Object(Vec<Value>),
}

/// A tensor in TP=1 coordinates.
#[derive(Debug, Clone)]
pub struct Tensor {
    /// Element type.
    pub dtype: Dtype,
    /// Global (TP=1) shape of this layer's tensor.
    pub shape: Vec<u64>,
    /// Partition rule (resolved: `fc1` is `gated_fc1` or `column`);
    /// `replicated` for keys no rule matches.
    pub rule: Rule,
    /// Where the bytes are.
    pub source: Source,
    /// Replicated tensors of per-rank sources: the copies of TP ranks 1..
    /// as (rank file, bytes), for [`Canonical::verify_replicas`].
    pub replicas: Vec<(String, Part)>,
}

/// Where a canonical tensor's bytes are.
#[derive(Debug, Clone)]
pub enum Source {
    /// The concatenation along `axis` of contiguous stored parts.
    Parts {
        /// Concatenation axis.
        axis: Axis,
        /// The parts, in order.
        parts: Vec<Part>,
    },
    /// A box of a distributed-checkpoint tensor.
    Dist {
        /// Index into `DistCheckpoint::tensors`.
        tensor: usize,
        /// Fixed indices of its leading axes: the layer of a stacked tensor, then the expert
        /// of stacked MoE experts (`[layers, experts, ...]`).
        lead: Vec<u64>,
    },
}

/// A contiguous stored block: row-major bytes of `shape`.
#[derive(Debug, Clone)]
pub struct Part {
    /// Its shape.
    pub shape: Vec<u64>,
    /// Its row-major bytes (usually one piece of the mapping).
    pub pieces: Vec<Piece>,
}

/// The canonical view of a checkpoint (see the module docs).
#[derive(Debug)]
pub struct Canonical<'c> {
    ckpt: &'c Checkpoint,
    /// Key prefix of the stored state dict (`model.`).
    pub prefix: String,
    /// The per-layer key stem (`decoder.layers.`).
    pub layer_stem: String,
    /// Number of transformer layers.
    pub num_layers: u64,
    /// Norm naming of the source.
    pub norm_style: NormStyle,
    /// Stored (padded) rows of the vocab-parallel tensors, if any.
    pub vocab_rows: Option<u64>,
    /// Entries: non-layer entries before the layers, layers in global order,
    /// then the other non-layer entries (source order within each group).
    pub entries: Vec<Entry>,
}

impl Tensor {
    /// Bytes of the whole tensor.
    pub fn nbytes(&self) -> u64 {
        self.shape
            .iter()
            .fold(self.dtype.size() as u64, |a, d| a.saturating_mul(*d))
    }
}

/// Per-rank MoE files must hold every expert, split over TP like a dense MLP (the layout rules'
/// expert TP = TP, expert parallelism 1): refuses the configs that say otherwise rather than
/// misread local expert numbers or replicated shards. Distributed checkpoints store global
/// tensors, so any EP / expert TP reads there.
fn expert_split_is_tp(cfg: &crate::model::config::ModelConfig) -> Result<(), Error> {
    let u = |k: &str| cfg.get(k).and_then(|v| v.as_u64());
    if u("num_moe_experts").unwrap_or(0) == 0 {
        return Ok(());
    }
    if let Some(ep) = u("expert_model_parallel_size").filter(|&e| e != 1) {
        return Err(Error::Layout(format!(
            "expert_model_parallel_size {ep} in a per-rank archive: each rank file would hold only its experts, numbered locally; expert-parallel models are read from distributed checkpoints (model_weights/)"
        )));
    }
    let tp = cfg.tensor_model_parallel_size();
    if let Some(etp) = u("expert_tensor_parallel_size").filter(|&e| e != tp) {
        return Err(Error::Layout(format!(
            "expert_tensor_parallel_size {etp} with tensor_model_parallel_size {tp} in a per-rank archive: only experts split like the dense MLP (expert TP = TP) are read from rank files; distributed checkpoints are read at any expert TP"
        )));
    }
    Ok(())
}

impl<'c> Canonical<'c> {
    /// Builds the view from the checkpoint's metadata (no payload is read).
    ///
    /// # Errors
    /// Inconsistent shards ([`Error::MissingShard`], [`Error::ShardMismatch`],
    /// [`Error::OddGatedShard`]), unreadable objects, a bad layer axis.
    pub fn new(ckpt: &'c Checkpoint) -> Result<Canonical<'c>, Error> {
        let layer_stem = ckpt
            .family
            .state_dict
            .as_ref()
            .map(|t| t.layers.clone())
            .unwrap_or_else(|| "decoder.layers.".to_string());
        let mut c = Canonical {
            ckpt,
            prefix: "model.".to_string(),
            layer_stem,
            num_layers: 0,
            norm_style: NormStyle::Te,
            vocab_rows: None,
            entries: Vec::new(),
        };
        match &ckpt.weights {
            Weights::PerRank(_) => {
                expert_split_is_tp(&ckpt.config)?;
                c.build_per_rank()?
            }
            Weights::Dist(dist) => c.build_dist(dist)?,
            Weights::Global(tensors) => c.build_global(tensors),
        }
        c.vocab_rows = c.entries.iter().find_map(|e| match &e.value {
            EntryValue::Tensor(t) if t.rule == Rule::Vocab => t.shape.first().copied(),
            _ => None,
        });
        Ok(c)
    }

    /// The checkpoint this view reads.
    pub fn checkpoint(&self) -> &'c Checkpoint {
        self.ckpt
    }

    /// The entry with this layer and name.
    pub fn get(&self, layer: Option<u64>, name: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.layer == layer && e.name == name)
    }

    /// Splits a prefix-less key into (layer, layer-relative name).
    fn split_layer(&self, body: &str) -> (Option<u64>, String) {
        if let Some(rest) = body.strip_prefix(self.layer_stem.as_str()) {
            if let Some((num, name)) = rest.split_once('.') {
                if let Ok(l) = num.parse::<u64>() {
                    return (Some(l), self.to_te(name));
                }
            }
        }
        (None, body.to_string())
    }

    /// The (layer, canonical name) of a prefix-less key as a per-rank file
    /// names it (`decoder.layers.3.input_layernorm.weight` ->
    /// `(Some(3), self_attention.linear_qkv.layer_norm_weight)`): what
    /// [`Canonical::get`] takes.
    pub fn locate(&self, body: &str) -> (Option<u64>, String) {
        self.split_layer(body)
    }

    /// The tensor entry of a prefix-less key ([`Canonical::locate`]d).
    pub fn tensor(&self, body: &str) -> Option<(&Entry, &Tensor)> {
        let (layer, name) = self.locate(body);
        let e = self.get(layer, &name)?;
        match &e.value {
            EntryValue::Tensor(t) => Some((e, t)),
            EntryValue::Object(_) => None,
        }
    }

    /// Row-major bytes of `segments` of a canonical tensor (see
    /// [`rank_slices`]), borrowed from the input; zero fill as `Zeros`.
    ///
    /// # Errors
    /// As [`Canonical::read`].
    pub fn read_segments(
        &self,
        name: &str,
        t: &Tensor,
        segments: &[Segment],
    ) -> Result<Vec<Piece>, Error> {
        let mut pieces = Vec::new();
        for s in segments {
            match s {
                Segment::Slice { axis, start, end } => {
                    pieces.extend(self.read(name, t, *axis, *start..*end)?)
                }
                Segment::Zeros { bytes } => pieces.push(Piece::Zeros(*bytes)),
            }
        }
        Ok(pieces)
    }

    /// Local-spec norm names -> TE names (layer-relative).
    fn to_te(&self, name: &str) -> String {
        for a in &self.ckpt.family.norm_aliases {
            if let Some(rest) = name.strip_prefix(a.local.as_str()) {
                return format!("{}{rest}", a.te);
            }
        }
        name.to_string()
    }

    /// A layer-relative canonical (TE) name in the given naming.
    pub fn styled_name(&self, name: &str, style: NormStyle) -> String {
        if style == NormStyle::Local {
            for a in &self.ckpt.family.norm_aliases {
                if let Some(rest) = name.strip_prefix(a.te.as_str()) {
                    return format!("{}{rest}", a.local);
                }
            }
        }
        name.to_string()
    }

    fn rule_for(&self, key: &str) -> Rule {
        let cfg = &self.ckpt.config;
        self.ckpt
            .family
            .lookup(key)
            .map(|m| {
                self.ckpt
                    .family
                    .resolve(m.rule, cfg.activation(), cfg.is_gated())
            })
            .unwrap_or(Rule::Replicated)
    }

    fn build_per_rank(&mut self) -> Result<(), Error> {
        let ranks = self.ckpt.rank_files();
        let mut stages: BTreeMap<u64, Vec<&crate::model::checkpoint::RankFile>> = BTreeMap::new();
        for r in ranks {
            stages.entry(r.pp).or_default().push(r);
        }
        let mut head = Vec::new();
        let mut layers = Vec::new();
        let mut tail = Vec::new();
        let mut offset = 0u64;
        let mut prefix = None;
        let mut local_norms = false;
        for stage in stages.values() {
            let Some(first) = stage.first() else { continue };
            let mut stage_layers = 0u64;
            for (key, value) in first.entries() {
                let body = self.ckpt.family.strip_prefix(key);
                if prefix.is_none() {
                    prefix = Some(key[..key.len() - body.len()].to_string());
                }
                let (layer, name) = self.split_layer(body);
                if layer.is_some()
                    && self.ckpt.family.norm_aliases.iter().any(|a| {
                        body.strip_prefix(self.layer_stem.as_str())
                            .and_then(|r| r.split_once('.'))
                            .is_some_and(|(_, n)| n.starts_with(a.local.as_str()))
                    })
                {
                    local_norms = true;
                }
                let value = self.per_rank_value(key, value, stage)?;
                let entry = Entry {
                    layer: layer.map(|l| l + offset),
                    name,
                    value,
                };
                match layer {
                    Some(l) => {
                        stage_layers = stage_layers.max(l + 1);
                        layers.push(entry);
                    }
                    None if layers.is_empty() && stage_layers == 0 && offset == 0 => {
                        head.push(entry)
                    }
                    None => tail.push(entry),
                }
            }
            offset += stage_layers;
        }
        // A tied copy on the last stage of a PP>1 source is a tail entry; a
        // non-layer key on a later stage before its layers too.
        self.num_layers = offset;
        if let Some(p) = prefix {
            self.prefix = p;
        }
        self.norm_style = if local_norms {
            NormStyle::Local
        } else {
            NormStyle::Te
        };
        layers.sort_by_key(|e| e.layer);
        self.entries = head;
        self.entries.extend(layers);
        self.entries.extend(tail);
        Ok(())
    }

    fn per_rank_value(
        &self,
        key: &str,
        value: &Value,
        stage: &[&crate::model::checkpoint::RankFile],
    ) -> Result<EntryValue, Error> {
        let t0 = match value {
            Value::Tensor(t) if self.rule_for(key) != Rule::ExtraState => Some(t),
            _ => None,
        };
        let Some(t0) = t0 else {
            let objs = stage
                .iter()
                .map(|r| {
                    r.entries()
                        .find(|(k, _)| *k == key)
                        .map(|(_, v)| v.clone())
                        .unwrap_or(Value::None)
                })
                .collect();
            return Ok(EntryValue::Object(objs));
        };
        let rule = self.rule_for(key);
        let mut locals = Vec::with_capacity(stage.len());
        for r in stage {
            let t = match r.entries().find(|(k, _)| *k == key) {
                Some((_, Value::Tensor(t))) => t,
                _ => {
                    return Err(Error::MissingShard {
                        key: key.to_string(),
                        member: r.member.clone(),
                    })
                }
            };
            let split = rule.split_dim(t.shape.len());
            let same = t.dtype == t0.dtype
                && t.shape.len() == t0.shape.len()
                && t.shape
                    .iter()
                    .zip(&t0.shape)
                    .enumerate()
                    .all(|(d, (a, b))| a == b || Some(d) == split);
            if !same {
                return Err(Error::ShardMismatch {
                    key: key.to_string(),
                    member: r.member.clone(),
                    found: format!("{}{:?}", t.dtype, t.shape),
                    expected: format!("{}{:?}", t0.dtype, t0.shape),
                });
            }
            let pieces = t.pieces().map_err(|source| Error::Tensor {
                key: key.to_string(),
                source,
            })?;
            locals.push((
                r.member.clone(),
                Part {
                    shape: t.shape.clone(),
                    pieces,
                },
            ));
        }
        // Replicated: rank 0 is the tensor; the other ranks' copies are kept
        // aside for `verify_replicas`.
        let replicas = if rule == Rule::Replicated && locals.len() > 1 {
            locals.split_off(1)
        } else {
            Vec::new()
        };
        let dtype = t0.dtype;
        let (axis, parts) = match rule {
            Rule::Replicated | Rule::ExtraState => {
                (Axis::First, locals.into_iter().map(|(_, p)| p).collect())
            }
            Rule::Row if t0.shape.len() >= 2 => {
                (Axis::Last, locals.into_iter().map(|(_, p)| p).collect())
            }
            Rule::GatedFc1 => {
                let mut gates = Vec::new();
                let mut ups = Vec::new();
                for (member, p) in locals {
                    let rows = p.shape.first().copied().unwrap_or(0);
                    if rows % 2 != 0 {
                        return Err(Error::OddGatedShard {
                            key: key.to_string(),
                            member,
                            rows,
                        });
                    }
                    let (g, u) = split_rows(&p, rows / 2, dtype);
                    gates.push(g);
                    ups.push(u);
                }
                gates.extend(ups);
                (Axis::First, gates)
            }
            _ => (Axis::First, locals.into_iter().map(|(_, p)| p).collect()),
        };
        let mut shape = t0.shape.clone();
        let d = match axis {
            Axis::First => 0,
            Axis::Last => shape.len().saturating_sub(1),
        };
        if let Some(s) = shape.get_mut(d) {
            *s = parts
                .iter()
                .map(|p: &Part| p.shape.get(d).copied().unwrap_or(1))
                .sum();
        }
        Ok(EntryValue::Tensor(Tensor {
            dtype,
            shape,
            rule,
            source: Source::Parts { axis, parts },
            replicas,
        }))
    }

    /// The per-expert entries of a distributed-checkpoint tensor of stacked experts
    /// (`decoder.layers.mlp.experts.experts.X` as `[layers, experts, ...]`, or
    /// `decoder.layers.N.mlp.experts.experts.X` as `[experts, ...]`), named as the per-rank
    /// state dict names them (`mlp.experts.local_experts.E.X`); None for other tensors.
    fn dist_experts(
        &self,
        i: usize,
        t: &crate::formats::dist::DistTensor,
        body: &str,
        num_layers: &mut Option<u64>,
    ) -> Result<Option<Vec<Entry>>, Error> {
        let Some(rest) = body.strip_prefix(self.layer_stem.as_str()) else {
            return Ok(None);
        };
        let (layers, tail): (Vec<u64>, &str) = match rest.strip_prefix(DIST_EXPERTS) {
            Some(tail) => {
                let n = t.shape.first().copied().unwrap_or(0);
                if n > MAX_LAYERS {
                    return Err(Error::TooManyLayers {
                        key: t.key.clone(),
                        found: n,
                    });
                }
                match *num_layers {
                    Some(prev) if prev != n => {
                        return Err(Error::LayerCount {
                            key: t.key.clone(),
                            found: n,
                            expected: prev,
                        })
                    }
                    _ => *num_layers = Some(n),
                }
                ((0..n).collect(), tail)
            }
            None => match rest.split_once('.') {
                Some((num, r)) => match (num.parse::<u64>(), r.strip_prefix(DIST_EXPERTS)) {
                    (Ok(l), Some(tail)) => (vec![l], tail),
                    _ => return Ok(None),
                },
                None => return Ok(None),
            },
        };
        let stacked = usize::from(rest.starts_with(DIST_EXPERTS));
        let experts = t.shape.get(stacked).copied().unwrap_or(0);
        if experts > MAX_LAYERS {
            return Err(Error::TooManyLayers {
                key: t.key.clone(),
                found: experts,
            });
        }
        let shape = t.shape.get(stacked + 1..).unwrap_or(&[]).to_vec();
        let mut out = Vec::new();
        for &l in &layers {
            for e in 0..experts {
                let name = format!("{LOCAL_EXPERTS}{e}.{tail}");
                let key = format!("{}{l}.{name}", self.layer_stem);
                let lead = if stacked == 1 { vec![l, e] } else { vec![e] };
                out.push(Entry {
                    layer: Some(l),
                    name,
                    value: EntryValue::Tensor(Tensor {
                        dtype: t.dtype,
                        shape: shape.clone(),
                        rule: self.rule_for(&key),
                        source: Source::Dist { tensor: i, lead },
                        replicas: Vec::new(),
                    }),
                });
            }
        }
        Ok(Some(out))
    }

    fn build_dist(&mut self, dist: &DistCheckpoint) -> Result<(), Error> {
        let mut head = Vec::new();
        let mut layers = Vec::new();
        let mut num_layers: Option<u64> = None;
        for (i, t) in dist.tensors.iter().enumerate() {
            let body = self.ckpt.family.strip_prefix(&t.key);
            if body.len() < t.key.len() {
                self.prefix = t.key[..t.key.len() - body.len()].to_string();
            }
            if let Some(experts) = self.dist_experts(i, t, body, &mut num_layers)? {
                layers.extend(experts);
                continue;
            }
            let rule = self.rule_for(&t.key);
            let stacked = self.ckpt.family.lookup(&t.key).is_some_and(|m| m.stacked);
            if stacked {
                let n = t.shape.first().copied().unwrap_or(0);
                if n > MAX_LAYERS {
                    return Err(Error::TooManyLayers {
                        key: t.key.clone(),
                        found: n,
                    });
                }
                if let Some(prev) = num_layers {
                    if prev != n {
                        return Err(Error::LayerCount {
                            key: t.key.clone(),
                            found: n,
                            expected: prev,
                        });
                    }
                }
                num_layers = Some(n);
                let name = body
                    .strip_prefix(self.layer_stem.as_str())
                    .unwrap_or(body)
                    .to_string();
                for l in 0..n {
                    layers.push(Entry {
                        layer: Some(l),
                        name: name.clone(),
                        value: EntryValue::Tensor(Tensor {
                            dtype: t.dtype,
                            shape: t.shape.get(1..).unwrap_or(&[]).to_vec(),
                            rule,
                            source: Source::Dist {
                                tensor: i,
                                lead: vec![l],
                            },
                            replicas: Vec::new(),
                        }),
                    });
                }
            } else {
                let (layer, name) = self.split_layer(body);
                let e = Entry {
                    layer,
                    name,
                    value: EntryValue::Tensor(Tensor {
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                        rule,
                        source: Source::Dist {
                            tensor: i,
                            lead: Vec::new(),
                        },
                        replicas: Vec::new(),
                    }),
                };
                if layer.is_some() {
                    layers.push(e)
                } else {
                    head.push(e)
                }
            }
        }
        for o in &dist.objects {
            let (key, shard) = o.key.split_once('/').unwrap_or((o.key.as_str(), ""));
            let body = self.ckpt.family.strip_prefix(key);
            let value = dist
                .read_object(self.ckpt.archive(), o)
                .map_err(|source| Error::Dist {
                    key: o.key.clone(),
                    source: Box::new(source),
                })?;
            // torch_dist items hold Megatron's `[obj]`; zarr files the bare object.
            let value = match value {
                Value::List(mut l) if l.len() == 1 && o.key.contains('/') => l.remove(0),
                v => v,
            };
            let layer = shard
                .strip_prefix("shard_")
                .and_then(|s| s.split(['_', '.']).next())
                .and_then(|s| s.parse::<u64>().ok());
            let stacked_name = body.strip_prefix(self.layer_stem.as_str());
            let (layer, name) = match (stacked_name, layer) {
                (Some(n), Some(l)) if !n.starts_with(|c: char| c.is_ascii_digit()) => {
                    (Some(l), n.to_string())
                }
                _ => self.split_layer(body),
            };
            // a stacked expert's object: `shard_{layer}.{expert}_...` names the expert
            let name = match name.strip_prefix(DIST_EXPERTS) {
                Some(rest) => {
                    let e = shard
                        .strip_prefix("shard_")
                        .and_then(|s| s.split('_').next())
                        .and_then(|s| s.split('.').nth(1))
                        .and_then(|s| s.parse::<u64>().ok());
                    match e {
                        Some(e) => format!("{LOCAL_EXPERTS}{e}.{rest}"),
                        None => name,
                    }
                }
                None => name,
            };
            if let Some(Entry {
                value: EntryValue::Object(_),
                ..
            }) = self.find_in(&layers, &head, layer, &name)
            {
                continue; // one object per layer (replicas of other ranks)
            }
            let e = Entry {
                layer,
                name,
                value: EntryValue::Object(vec![value]),
            };
            if layer.is_some() {
                layers.push(e)
            } else {
                head.push(e)
            }
        }
        self.num_layers = num_layers
            .or_else(|| layers.iter().filter_map(|e| e.layer).max().map(|l| l + 1))
            .unwrap_or(0);
        self.norm_style = NormStyle::Te;
        // stable: metadata order within a layer, each expert's entries together after the rest
        // in megatron-core's order (fc1, its extra state, fc2, its extra state)
        layers.sort_by_key(|e| (e.layer, expert_order(&e.name)));
        self.entries = head;
        self.entries.extend(layers);
        Ok(())
    }

    /// Whole tensors under megatron-core keys: one part each, in the given
    /// (state-dict) order; non-layer keys after the first layer are the tail.
    fn build_global(&mut self, tensors: &[GlobalTensor]) {
        let mut local_norms = false;
        let (mut head, mut layers, mut tail) = (Vec::new(), Vec::new(), Vec::new());
        for t in tensors {
            let body = self.ckpt.family.strip_prefix(&t.key);
            if body.len() < t.key.len() {
                self.prefix = t.key[..t.key.len() - body.len()].to_string();
            }
            let (layer, name) = self.split_layer(body);
            if layer.is_some() && !body.ends_with(name.as_str()) {
                local_norms = true; // a local-spec norm name was mapped
            }
            let value = match &t.value {
                GlobalValue::Object(v) => EntryValue::Object(vec![v.clone()]),
                GlobalValue::Tensor {
                    dtype,
                    shape,
                    pieces,
                } => EntryValue::Tensor(Tensor {
                    dtype: *dtype,
                    shape: shape.clone(),
                    rule: self.rule_for(&t.key),
                    source: Source::Parts {
                        axis: Axis::First,
                        parts: vec![Part {
                            shape: shape.clone(),
                            pieces: pieces.clone(),
                        }],
                    },
                    replicas: Vec::new(),
                }),
            };
            let e = Entry { layer, name, value };
            match layer {
                Some(_) => layers.push(e),
                None if layers.is_empty() => head.push(e),
                None => tail.push(e),
            }
        }
        self.num_layers = layers
            .iter()
            .filter_map(|e| e.layer)
            .max()
            .map_or(0, |l| l + 1);
        self.norm_style = if local_norms {
            NormStyle::Local
        } else {
            NormStyle::Te
        };
        layers.sort_by_key(|e| e.layer);
        self.entries = head;
        self.entries.extend(layers);
        self.entries.extend(tail);
    }

    fn find_in<'a>(
        &self,
        a: &'a [Entry],
        b: &'a [Entry],
        layer: Option<u64>,
        name: &str,
    ) -> Option<&'a Entry> {
        a.iter()
            .chain(b)
            .find(|e| e.layer == layer && e.name == name)
    }

    /// Checks that every replicated tensor is identical on all TP ranks of
    /// its stage (reads those tensors' bytes; per-rank sources only).
    ///
    /// # Errors
    /// [`Error::ReplicaMismatch`] for the first copy that differs.
    pub fn verify_replicas(&self) -> Result<(), Error> {
        for e in &self.entries {
            let EntryValue::Tensor(t) = &e.value else {
                continue;
            };
            let Source::Parts { parts, .. } = &t.source else {
                continue;
            };
            let Some(first) = parts.first() else { continue };
            let a = crate::io::piece::concat(&first.pieces);
            for (member, p) in &t.replicas {
                if crate::io::piece::concat(&p.pieces) != a {
                    return Err(Error::ReplicaMismatch {
                        key: match e.layer {
                            Some(l) => format!("{}{l}.{}", self.layer_stem, e.name),
                            None => e.name.clone(),
                        },
                        member: member.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Row-major bytes of the slice `range` along `axis` of a canonical
    /// tensor (all of the other dims), borrowed from the input.
    ///
    /// # Errors
    /// [`Error::BadSlice`] for a range outside the tensor; unreadable
    /// distributed chunks.
    pub fn read(
        &self,
        name: &str,
        t: &Tensor,
        axis: Axis,
        range: Range<u64>,
    ) -> Result<Vec<Piece>, Error> {
        let nd = t.shape.len();
        let bad = || Error::BadSlice {
            key: name.to_string(),
            axis,
            start: range.start,
            end: range.end,
            shape: t.shape.clone(),
        };
        let d = match axis {
            Axis::First => 0,
            Axis::Last => nd.saturating_sub(1),
        };
        let extent = if nd == 0 { 1 } else { t.shape[d] };
        if range.start > range.end || range.end > extent {
            return Err(bad());
        }
        let es = t.dtype.size() as u64;
        match &t.source {
            Source::Dist { tensor, lead } => {
                let Weights::Dist(dist) = &self.ckpt.weights else {
                    return Err(bad());
                };
                let dt = dist.tensors.get(*tensor).ok_or_else(bad)?;
                let mut offsets = vec![0u64; nd];
                let mut sizes = t.shape.clone();
                if nd > 0 {
                    offsets[d] = range.start;
                    sizes[d] = range.end - range.start;
                }
                for (i, &x) in lead.iter().enumerate() {
                    offsets.insert(i, x);
                    sizes.insert(i, 1);
                }
                dist.read_box(self.ckpt.archive(), dt, &offsets, &sizes)
                    .map_err(|source| Error::Dist {
                        key: name.to_string(),
                        source: Box::new(source),
                    })
            }
            Source::Parts { axis: cat, parts } => {
                // Treat the tensor as [outer, last] (1-D: [1, n]; 0-D: [1, 1]).
                let last = if nd == 0 { 1 } else { t.shape[nd - 1] };
                let outer: u64 = if nd == 0 {
                    1
                } else {
                    t.shape[..nd - 1].iter().product()
                };
                let dim0 = if nd == 0 { 1 } else { t.shape[0] };
                // outer rows per dim-0 index (1-D: the single row spans dim 0)
                let per0 = if nd <= 1 { 1 } else { outer / dim0.max(1) };
                let mut out = Vec::new();
                match (*cat, axis) {
                    (Axis::First, Axis::First) => {
                        // whole rows of dim 0: one byte range per part
                        let row_bytes = if nd <= 1 { es } else { per0 * last * es };
                        let mut start = 0u64;
                        for p in parts {
                            let n = p.shape.first().copied().unwrap_or(1);
                            let (lo, hi) = (range.start.max(start), range.end.min(start + n));
                            if lo < hi {
                                out.extend(sub_pieces(
                                    &p.pieces,
                                    (lo - start) * row_bytes,
                                    (hi - lo) * row_bytes,
                                ));
                            }
                            start += n;
                        }
                    }
                    (Axis::First, Axis::Last) if nd <= 1 => {
                        return self.read(name, t, Axis::First, range);
                    }
                    (Axis::First, Axis::Last) => {
                        // each outer row lives in the part holding its dim-0 index
                        let w = range.end - range.start;
                        let mut start = 0u64;
                        for p in parts {
                            let n = p.shape.first().copied().unwrap_or(1);
                            for o in 0..n * per0 {
                                out.extend(sub_pieces(
                                    &p.pieces,
                                    (o * last + range.start) * es,
                                    w * es,
                                ));
                            }
                            start += n;
                        }
                        let _ = start;
                    }
                    (Axis::Last, _) => {
                        if nd < 2 {
                            return Err(bad());
                        }
                        let (rows, cols) = match axis {
                            Axis::First => (range.start * per0..range.end * per0, 0..last),
                            Axis::Last => (0..outer, range.clone()),
                        };
                        for o in rows {
                            let mut start = 0u64;
                            for p in parts {
                                let w = p.shape.last().copied().unwrap_or(1);
                                let (lo, hi) = (cols.start.max(start), cols.end.min(start + w));
                                if lo < hi {
                                    out.extend(sub_pieces(
                                        &p.pieces,
                                        (o * w + lo - start) * es,
                                        (hi - lo) * es,
                                    ));
                                }
                                start += w;
                            }
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// Splits a part into its first `rows` rows and the rest.
fn split_rows(p: &Part, rows: u64, dtype: Dtype) -> (Part, Part) {
    let row_bytes: u64 = p.shape.iter().skip(1).product::<u64>() * dtype.size() as u64;
    let total: u64 = p.pieces.iter().map(Piece::len).sum();
    let cut = rows * row_bytes;
    let mut a = p.shape.clone();
    let mut b = p.shape.clone();
    if let (Some(x), Some(y)) = (a.first_mut(), b.first_mut()) {
        *y = *x - rows;
        *x = rows;
    }
    (
        Part {
            shape: a,
            pieces: sub_pieces(&p.pieces, 0, cut),
        },
        Part {
            shape: b,
            pieces: sub_pieces(&p.pieces, cut, total.saturating_sub(cut)),
        },
    )
}

/// The byte range `[off, off+len)` of a piece list, as pieces (no copy).
/// Ranges past the end are clipped (callers pass ranges computed from
/// validated shapes).
pub fn sub_pieces(pieces: &[Piece], off: u64, len: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let (mut pos, end) = (0u64, off.saturating_add(len));
    for p in pieces {
        let n = p.len();
        let (lo, hi) = (off.max(pos), end.min(pos + n));
        if lo < hi {
            match p {
                Piece::Bytes(b) => {
                    if let Ok(s) = b.slice((lo - pos)..(hi - pos)) {
                        out.push(Piece::Bytes(s));
                    }
                }
                Piece::Zeros(_) => out.push(Piece::Zeros(hi - lo)),
            }
        }
        pos += n;
        if pos >= end {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::bytes::ByteView;

    fn fixture(rel: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    fn bytes(c: &Canonical, layer: Option<u64>, name: &str) -> Vec<u8> {
        let e = c.get(layer, name).unwrap_or_else(|| panic!("{name}"));
        let EntryValue::Tensor(t) = &e.value else {
            panic!("{name} is not a tensor")
        };
        let n = t.shape.first().copied().unwrap_or(1);
        crate::io::piece::concat(&c.read(name, t, Axis::First, 0..n).unwrap())
    }

    #[test]
    fn tp2_tp1_and_dist_agree_everywhere() {
        let tp1 =
            Checkpoint::open(fixture("fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo")).unwrap();
        let tp2 =
            Checkpoint::open(fixture("fixtures/mcore/llama/nemo/tiny_llama_tp2.nemo")).unwrap();
        let dist = Checkpoint::open(fixture(
            "fixtures/mcore/llama/nemo/tiny_llama_dist_tp1.nemo",
        ))
        .unwrap();
        let (c1, c2, cd) = (
            Canonical::new(&tp1).unwrap(),
            Canonical::new(&tp2).unwrap(),
            Canonical::new(&dist).unwrap(),
        );
        assert_eq!((c1.num_layers, c2.num_layers, cd.num_layers), (2, 2, 2));
        assert_eq!(c1.norm_style, NormStyle::Local);
        assert_eq!(cd.norm_style, NormStyle::Te);
        assert_eq!(c2.vocab_rows, Some(128));
        let mut n = 0;
        for e in &c1.entries {
            if let EntryValue::Tensor(t) = &e.value {
                let a = bytes(&c1, e.layer, &e.name);
                assert_eq!(a.len() as u64, t.nbytes());
                assert_eq!(a, bytes(&c2, e.layer, &e.name), "{:?} {}", e.layer, e.name);
                assert_eq!(a, bytes(&cd, e.layer, &e.name), "{:?} {}", e.layer, e.name);
                n += 1;
            }
        }
        assert_eq!(n, 3 + 2 * 6);
        // last-dim slices of a row-parallel tensor agree between layouts
        let name = "self_attention.linear_proj.weight";
        for c in [&c2, &cd] {
            let EntryValue::Tensor(t) = &c.get(Some(1), name).unwrap().value else {
                panic!()
            };
            let EntryValue::Tensor(t1) = &c1.get(Some(1), name).unwrap().value else {
                panic!()
            };
            let a = crate::io::piece::concat(&c.read(name, t, Axis::Last, 16..48).unwrap());
            let b = crate::io::piece::concat(&c1.read(name, t1, Axis::Last, 16..48).unwrap());
            assert_eq!(a.len(), 64 * 32 * 4);
            assert_eq!(a, b);
        }
        // extra state objects are None in every layout
        let e = cd.get(Some(1), "mlp.linear_fc1._extra_state").unwrap();
        assert!(matches!(&e.value, EntryValue::Object(v) if v == &vec![Value::None]));
        let e = c2.get(Some(0), "mlp.linear_fc1._extra_state").unwrap();
        assert!(matches!(&e.value, EntryValue::Object(v) if v.len() == 2));
    }

    #[test]
    fn styled_names_round_trip() {
        let tp1 =
            Checkpoint::open(fixture("fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo")).unwrap();
        let c = Canonical::new(&tp1).unwrap();
        assert!(c
            .get(Some(0), "self_attention.linear_qkv.layer_norm_weight")
            .is_some());
        assert_eq!(
            c.styled_name("mlp.linear_fc1.layer_norm_weight", NormStyle::Local),
            "pre_mlp_layernorm.weight"
        );
        assert_eq!(
            c.styled_name("mlp.linear_fc1.layer_norm_weight", NormStyle::Te),
            "mlp.linear_fc1.layer_norm_weight"
        );
    }

    #[test]
    fn bad_slice_is_refused() {
        let tp1 =
            Checkpoint::open(fixture("fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo")).unwrap();
        let c = Canonical::new(&tp1).unwrap();
        let e = c.get(None, "embedding.word_embeddings.weight").unwrap();
        let EntryValue::Tensor(t) = &e.value else {
            panic!()
        };
        let err = c.read(&e.name, t, Axis::First, 100..200).unwrap_err();
        assert!(matches!(err, Error::BadSlice { end: 200, .. }), "{err}");
    }

    /// A TP=2 `.nemo` whose two rank files hold the given (key, shape) f32 tensors.
    fn two_ranks(
        dir: &std::path::Path,
        r0: &[(&str, Vec<u64>)],
        r1: &[(&str, Vec<u64>)],
    ) -> Checkpoint {
        use crate::formats::torch::tensor::{StorageRef, TensorRef};
        use crate::formats::torch::value::{Construct, Global, Object};
        let path = dir.join("x.nemo");
        let mut tar =
            crate::formats::tar_write::TarWriter::new(std::fs::File::create(&path).unwrap());
        let cfg = crate::testkit::synth::Spec::tiny().config_yaml(2, 1);
        tar.append_pieces("model_config.yaml", cfg.len() as u64, [cfg.as_bytes()])
            .unwrap();
        for (r, keys) in [r0, r1].iter().enumerate() {
            let mut od = Object::new(
                Global::new("collections", "OrderedDict"),
                Construct::Reduce,
                vec![],
            );
            for (k, shape) in keys.iter() {
                let n: u64 = shape.iter().product::<u64>() * 4;
                let st = StorageRef::from_view(*k, ByteView::from_vec(vec![1u8; n as usize]));
                let t = TensorRef::contiguous(Dtype::F32, shape.clone(), st).unwrap();
                od.items
                    .push((Value::Str(k.to_string()), Value::Tensor(Box::new(t))));
            }
            let root = Value::Object(Box::new(od));
            tar.append_streamed(&format!("mp_rank_0{r}/model_weights.ckpt"), |w| {
                crate::formats::torch::file::save(w, "model_weights", &root)
                    .map(|_| ())
                    .map_err(std::io::Error::other)
            })
            .unwrap();
        }
        tar.finish().unwrap();
        Checkpoint::open(&path).unwrap()
    }

    #[test]
    fn missing_shard_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let k = "model.embedding.word_embeddings.weight";
        let c = two_ranks(
            tmp.path(),
            &[(k, vec![4, 2])],
            &[("model.other", vec![4, 2])],
        );
        let e = Canonical::new(&c).unwrap_err();
        assert!(
            matches!(e, Error::MissingShard { ref key, ref member } if key == k && member.starts_with("mp_rank_01")),
            "{e}"
        );
    }

    #[test]
    fn shard_mismatch_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let k = "model.decoder.layers.0.self_attention.linear_qkv.weight";
        let c = two_ranks(tmp.path(), &[(k, vec![4, 2])], &[(k, vec![4, 3])]);
        let e = Canonical::new(&c).unwrap_err();
        assert!(
            matches!(e, Error::ShardMismatch { ref found, .. } if found == "float32[4, 3]"),
            "{e}"
        );
    }

    #[test]
    fn replicas_are_verified() {
        let tp2 =
            Checkpoint::open(fixture("fixtures/mcore/llama/nemo/tiny_llama_tp2.nemo")).unwrap();
        Canonical::new(&tp2).unwrap().verify_replicas().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let k = "model.decoder.final_layernorm.weight";
        let c = two_ranks(tmp.path(), &[(k, vec![4])], &[(k, vec![4])]);
        let mut canon = Canonical::new(&c).unwrap();
        canon.verify_replicas().unwrap();
        // make rank 1's copy differ
        if let EntryValue::Tensor(t) = &mut canon.entries[0].value {
            t.replicas[0].1.pieces = vec![Piece::Zeros(16)];
        }
        let e = canon.verify_replicas().unwrap_err();
        assert!(
            matches!(e, Error::ReplicaMismatch { ref member, .. } if member.starts_with("mp_rank_01")),
            "{e}"
        );
    }

    #[test]
    fn odd_gated_shard_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let k = "model.decoder.layers.0.mlp.linear_fc1.weight";
        let c = two_ranks(tmp.path(), &[(k, vec![3, 2])], &[(k, vec![3, 2])]);
        let e = Canonical::new(&c).unwrap_err();
        assert!(matches!(e, Error::OddGatedShard { rows: 3, .. }), "{e}");
    }

    #[test]
    fn rank_slices_follow_megatron_rules() {
        let sl = |axis, start, end| Segment::Slice { axis, start, end };
        let f32 = Dtype::F32;
        // gated fc1 [gate 4; up 4] at TP2, rank 1: [gate 2..4; up 6..8]
        let (s, v) = rank_slices("fc1", &[8, 3], f32, Rule::GatedFc1, 1, 2, None).unwrap();
        assert_eq!(s, vec![4, 3]);
        assert_eq!(v, vec![sl(Axis::First, 2, 4), sl(Axis::First, 6, 8)]);
        // row: the last dim
        let (s, v) = rank_slices("proj", &[4, 6], f32, Rule::Row, 2, 3, None).unwrap();
        assert_eq!((s, v), (vec![4, 2], vec![sl(Axis::Last, 4, 6)]));
        // 1-D row-parallel bias: dim 0
        let (s, v) = rank_slices("b", &[6], f32, Rule::Row, 1, 2, None).unwrap();
        assert_eq!((s, v), (vec![3], vec![sl(Axis::First, 3, 6)]));
        // replicated: all of it on every rank
        let (s, v) = rank_slices("n", &[5], f32, Rule::Replicated, 1, 2, None).unwrap();
        assert_eq!((s, v), (vec![5], vec![sl(Axis::First, 0, 5)]));
        // vocab padded from 10 stored rows to 16 at TP2: rank 1 has rows 8..10 and 6 zero rows
        let (s, v) = rank_slices("emb", &[10, 2], f32, Rule::Vocab, 1, 2, Some(16)).unwrap();
        assert_eq!(s, vec![8, 2]);
        assert_eq!(
            v,
            vec![sl(Axis::First, 8, 10), Segment::Zeros { bytes: 6 * 2 * 4 }]
        );
        // rows past the stored ones only: all zeros
        let (_, v) = rank_slices("emb", &[10, 2], f32, Rule::Vocab, 3, 4, Some(16)).unwrap();
        assert_eq!(v, vec![Segment::Zeros { bytes: 4 * 2 * 4 }]);
        // a scalar is whole
        let (s, v) = rank_slices("x", &[], f32, Rule::Column, 0, 2, None).unwrap();
        assert_eq!((s, v), (vec![], vec![sl(Axis::First, 0, 1)]));
        // indivisible dims and odd gated rows are refused, naming the tensor
        for (shape, rule, tp) in [
            (vec![6u64, 4], Rule::Qkv, 4u64),
            (vec![4, 6], Rule::Row, 4),
            (vec![7, 2], Rule::GatedFc1, 1),
            (vec![4, 2], Rule::Column, 0),
        ] {
            let e = rank_slices("k", &shape, f32, rule, 0, tp, None).unwrap_err();
            assert!(
                matches!(&e, Error::Indivisible { key, .. } if key == "k"),
                "{e}"
            );
        }
    }

    #[test]
    fn read_segments_of_tp2_equal_the_tp2_rank_files() {
        // the forward rule inverts the merge: cutting the canonical view of the TP2
        // fixture by rank_slices gives back each rank file's own bytes
        let tp2 =
            Checkpoint::open(fixture("fixtures/mcore/llama/nemo/tiny_llama_tp2.nemo")).unwrap();
        let c = Canonical::new(&tp2).unwrap();
        let ranks = tp2.rank_files();
        let mut n = 0;
        for (rank, r) in ranks.iter().enumerate() {
            for (key, v) in r.entries() {
                let Value::Tensor(stored) = v else { continue };
                let body = tp2.family.strip_prefix(key);
                let Some((_, t)) = c.tensor(body) else {
                    panic!("{key} not in the view")
                };
                let (shape, segs) =
                    rank_slices(key, &t.shape, t.dtype, t.rule, rank as u64, 2, None).unwrap();
                assert_eq!(shape, stored.shape, "{key}");
                let got = crate::io::piece::concat(&c.read_segments(body, t, &segs).unwrap());
                assert_eq!(got, stored.to_vec().unwrap(), "{key} rank {rank}");
                n += 1;
            }
        }
        assert_eq!(n, 2 * 15);
    }

    #[test]
    fn sub_pieces_cross_boundaries() {
        let p = vec![
            Piece::Bytes(ByteView::from_vec(vec![1, 2, 3])),
            Piece::Zeros(2),
            Piece::Bytes(ByteView::from_vec(vec![4, 5])),
        ];
        let s = crate::io::piece::concat(&sub_pieces(&p, 2, 4));
        assert_eq!(s, vec![3, 0, 0, 4]);
    }
}
