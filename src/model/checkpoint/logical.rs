//! Logical tensors: one entry per model tensor with its global name (global
//! layer numbers), global shape and partition rule, and the stored pieces it
//! is made of (per-rank local tensors, or distributed-checkpoint chunks).

use std::collections::{BTreeMap, HashMap};

use crate::formats::torch::{Dtype, Value};
use crate::model::layout::{self, renumber_layer, Rule};

use super::{Checkpoint, GlobalValue, Weights};

/// One model tensor (or opaque object such as `_extra_state`).
#[derive(Debug, Clone, PartialEq)]
pub struct LogicalTensor {
    /// Global key (per-rank layouts: stage-local layer numbers made global).
    pub name: String,
    /// Element type; `None` for opaque objects.
    pub dtype: Option<Dtype>,
    /// Global (TP=1) shape; empty for objects.
    pub global_shape: Vec<u64>,
    /// Partition rule, resolved for the config (`fc1` -> gated or column).
    pub rule: Option<Rule>,
    /// True when the key carries a stacked leading layer axis (distributed checkpoints).
    pub stacked: bool,
    /// Stored pieces.
    pub shards: Vec<Shard>,
}

/// One stored piece of a logical tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    /// TP rank (per-rank layouts).
    pub tp: Option<u64>,
    /// PP rank (per-rank layouts).
    pub pp: Option<u64>,
    /// Key as stored (stage-local layer numbers).
    pub key: String,
    /// Local shape; empty for objects.
    pub shape: Vec<u64>,
    /// Offsets into the global tensor (distributed-checkpoint chunks).
    pub offsets: Option<Vec<u64>>,
}

impl LogicalTensor {
    /// Number of elements of the global tensor (0 for objects).
    pub fn numel(&self) -> u64 {
        if self.dtype.is_none() {
            return 0;
        }
        self.global_shape
            .iter()
            .try_fold(1u64, |a, d| a.checked_mul(*d))
            .unwrap_or(u64::MAX)
    }
}

/// The number of layers each pipeline stage holds, from the stored keys.
pub(crate) fn layers_per_stage(ckpt: &Checkpoint) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for r in ckpt.rank_files() {
        let n = out.entry(r.pp).or_insert(0u64);
        for (k, _) in r.entries() {
            if let Some(m) = ckpt.family.lookup(k) {
                if let Some(l) = m.layer {
                    *n = (*n).max(l + 1);
                }
            }
        }
    }
    out
}

pub(crate) fn build(ckpt: &Checkpoint) -> Vec<LogicalTensor> {
    let activation = ckpt.config.activation();
    let gated = ckpt.config.is_gated();
    let resolve = |key: &str| {
        ckpt.family
            .lookup(key)
            .map(|m| (ckpt.family.resolve(m.rule, activation, gated), m))
    };
    match &ckpt.weights {
        Weights::Dist(dist) => {
            let mut out: Vec<LogicalTensor> = dist
                .tensors
                .iter()
                .map(|t| {
                    let m = resolve(&t.key);
                    LogicalTensor {
                        name: t.key.clone(),
                        dtype: Some(t.dtype),
                        global_shape: t.shape.clone(),
                        rule: m.map(|(r, _)| r),
                        stacked: m.map(|(_, m)| m.stacked).unwrap_or(false),
                        shards: t
                            .chunks
                            .iter()
                            .map(|c| Shard {
                                tp: None,
                                pp: None,
                                key: t.key.clone(),
                                shape: c.sizes.clone(),
                                offsets: Some(c.offsets.clone()),
                            })
                            .collect(),
                    }
                })
                .collect();
            out.extend(dist.objects.iter().map(|o| LogicalTensor {
                name: o.key.clone(),
                dtype: None,
                global_shape: vec![],
                rule: Some(Rule::ExtraState).filter(|_| o.key.contains("_extra_state")),
                stacked: false,
                shards: vec![Shard {
                    tp: None,
                    pp: None,
                    key: o.key.clone(),
                    shape: vec![],
                    offsets: None,
                }],
            }));
            out
        }
        Weights::Global(tensors) => tensors
            .iter()
            .map(|t| {
                let (dtype, shape) = match &t.value {
                    GlobalValue::Tensor { dtype, shape, .. } => (Some(*dtype), shape.clone()),
                    GlobalValue::Object(_) => (None, Vec::new()),
                };
                LogicalTensor {
                    name: t.key.clone(),
                    dtype,
                    global_shape: shape.clone(),
                    rule: resolve(&t.key).map(|(r, _)| r),
                    stacked: false,
                    shards: vec![Shard {
                        tp: None,
                        pp: None,
                        key: t.key.clone(),
                        shape,
                        offsets: None,
                    }],
                }
            })
            .collect(),
        Weights::PerRank(ranks) => {
            let stages = layers_per_stage(ckpt);
            let tp_size = ckpt.layout.tp;
            let mut out = Vec::new();
            for &pp in stages.keys() {
                let offset: u64 = stages.range(..pp).map(|(_, n)| *n).sum();
                let stage: Vec<_> = ranks.iter().filter(|r| r.pp == pp).collect();
                let Some(first) = stage.first() else { continue };
                // One index per rank file, so matching keys across ranks stays linear.
                let by_key: Vec<HashMap<&str, &Value>> =
                    stage.iter().map(|r| r.entries().collect()).collect();
                for (key, value) in first.entries() {
                    let m = resolve(key);
                    let name = match m.and_then(|(_, m)| m.layer) {
                        Some(l) => {
                            renumber_layer(key, offset + l).unwrap_or_else(|| key.to_string())
                        }
                        None => key.to_string(),
                    };
                    let shards: Vec<Shard> = stage
                        .iter()
                        .zip(&by_key)
                        .map(|(r, entries)| {
                            let shape = match entries.get(key) {
                                Some(Value::Tensor(t)) => t.shape.clone(),
                                _ => vec![],
                            };
                            Shard {
                                tp: Some(r.tp),
                                pp: Some(pp),
                                key: key.to_string(),
                                shape,
                                offsets: None,
                            }
                        })
                        .collect();
                    let (dtype, local) = match value {
                        Value::Tensor(t) => (Some(t.dtype), t.shape.clone()),
                        _ => (None, vec![]),
                    };
                    let rule = m.map(|(r, _)| r);
                    let global_shape = match (dtype, rule) {
                        (Some(_), Some(r)) => layout::global_shape(r, &local, tp_size, false),
                        _ => local,
                    };
                    out.push(LogicalTensor {
                        name,
                        dtype,
                        global_shape,
                        rule,
                        stacked: false,
                        shards,
                    });
                }
            }
            out
        }
    }
}
