//! The core canonical view ([`crate::model::canonical::Canonical`], which
//! owns the partition rules and reads every source: per-rank, torch_dist,
//! zarr, and an HF folder mapped by [`super::hf`]) keyed by full local-spec
//! names (`model.decoder.layers.3.input_layernorm.weight`) in state-dict
//! order, each tensor whole as zero-copy pieces: what the writers that
//! rename tensors (to Hugging Face, to a stacked `torch_dist` folder) look
//! up by name. The per-rank writer is `reshard`'s and needs no such map.

use crate::formats::torch::value::Value;
use crate::model::canonical::{Axis, EntryValue};
use crate::model::checkpoint::Checkpoint;

use super::tensor::{self, Flat};

/// Errors building the named model; each names the tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor's pieces or shapes are inconsistent.
    #[error(transparent)]
    Tensor(#[from] tensor::Error),
    /// The checkpoint's canonical view could not be built or read.
    #[error(transparent)]
    NamedModel(#[from] crate::model::canonical::Error),
}

/// A tensor or an opaque object.
#[derive(Debug, Clone)]
pub enum Item {
    /// A tensor (global, TP=1).
    Tensor(Flat),
    /// An object (`_extra_state`), as stored on TP rank 0.
    Object(Value),
}

/// One named entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Local-spec key with the global layer number.
    pub name: String,
    /// Its value.
    pub item: Item,
}

/// A whole model at TP=1 in state-dict order.
#[derive(Debug, Clone, Default)]
pub struct NamedModel {
    /// Entries in the order a local-spec mcore state dict lists them.
    pub entries: Vec<Entry>,
}

/// Per-layer key suffixes in state-dict (module registration) order.
pub const LAYER_ORDER: &[&str] = &[
    "input_layernorm.weight",
    "input_layernorm.bias",
    "self_attention.linear_proj.weight",
    "self_attention.linear_proj.bias",
    "self_attention.linear_proj._extra_state",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias",
    "self_attention.linear_qkv._extra_state",
    "self_attention.q_layernorm.weight",
    "self_attention.q_layernorm.bias",
    "self_attention.k_layernorm.weight",
    "self_attention.k_layernorm.bias",
    "pre_mlp_layernorm.weight",
    "pre_mlp_layernorm.bias",
    "mlp.router.weight",
    "mlp.router.expert_bias",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc1.bias",
    "mlp.linear_fc1._extra_state",
    "mlp.linear_fc2.weight",
    "mlp.linear_fc2.bias",
    "mlp.linear_fc2._extra_state",
];

/// TransformerEngine fused-norm names -> local-spec names (the
/// `sharded_state_dict_keys_map` of the local spec, reversed).
const TE_NORMS: &[(&str, &str)] = &[
    (
        "self_attention.linear_qkv.layer_norm_weight",
        "input_layernorm.weight",
    ),
    (
        "self_attention.linear_qkv.layer_norm_bias",
        "input_layernorm.bias",
    ),
    (
        "mlp.linear_fc1.layer_norm_weight",
        "pre_mlp_layernorm.weight",
    ),
    ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"),
];

/// The local-spec name of a key: `model.module.` -> `model.`, TE norm names
/// -> `input_layernorm` / `pre_mlp_layernorm`.
pub fn local_name(key: &str) -> String {
    let key = match key.strip_prefix("model.module.") {
        Some(rest) => format!("model.{rest}"),
        None if key.starts_with("model.") => key.to_string(),
        None => format!("model.{}", key.strip_prefix("module.").unwrap_or(key)),
    };
    for (te, local) in TE_NORMS {
        if let Some(head) = key.strip_suffix(te) {
            return format!("{head}{local}");
        }
    }
    key
}

/// The TE (distributed-checkpoint) name of a local-spec key.
pub fn te_name(key: &str) -> String {
    for (te, local) in TE_NORMS {
        if let Some(head) = key.strip_suffix(local) {
            if head.ends_with("layers.") || head.contains("layers.") {
                return format!("{head}{te}");
            }
        }
    }
    key.to_string()
}

/// `(layer, suffix)` of a per-layer key `model.decoder.layers.{l}.{suffix}`.
pub fn split_layer(name: &str) -> Option<(u64, &str)> {
    let rest = name.strip_prefix("model.decoder.layers.")?;
    let (l, suffix) = rest.split_once('.')?;
    Some((l.parse().ok()?, suffix))
}

/// Sort key giving state-dict order: embedding, layers (suffixes in
/// [`LAYER_ORDER`], unknown ones after), final norm, output layer.
fn order_key(name: &str) -> (u8, u64, usize, String) {
    if let Some((l, s)) = split_layer(name) {
        let i = LAYER_ORDER
            .iter()
            .position(|x| *x == s)
            .unwrap_or(LAYER_ORDER.len());
        return (1, l, i, s.to_string());
    }
    // A module's parameters come before its `_extra_state`.
    let (module, is_extra) = match name.strip_suffix("._extra_state") {
        Some(m) => (m, 1),
        None => (name.rsplit_once('.').map(|(m, _)| m).unwrap_or(name), 0),
    };
    let group = if name.starts_with("model.embedding.") {
        0
    } else if name.starts_with("model.decoder.") {
        2
    } else {
        3
    };
    (group, 0, is_extra, format!("{module}\u{0}{name}"))
}

impl NamedModel {
    /// Sorts entries into state-dict order (stable for unknown keys).
    pub fn sort(&mut self) {
        self.entries.sort_by_cached_key(|e| order_key(&e.name));
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&Flat> {
        self.entries.iter().find_map(|e| match &e.item {
            Item::Tensor(t) if e.name == name => Some(t),
            _ => None,
        })
    }

    /// Layers present (highest layer number + 1).
    pub fn num_layers(&self) -> u64 {
        self.entries
            .iter()
            .filter_map(|e| split_layer(&e.name).map(|(l, _)| l + 1))
            .max()
            .unwrap_or(0)
    }

    /// Builds the TP=1 view of an opened checkpoint from its
    /// [`crate::model::canonical::Canonical`] view, keyed by local-spec names.
    ///
    /// # Errors
    /// [`Error`] for unreadable or inconsistent tensors.
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<NamedModel, Error> {
        let core = crate::model::canonical::Canonical::new(ck)?;
        let mut out = NamedModel::default();
        for e in &core.entries {
            let body = match e.layer {
                Some(l) => format!("{}{l}.{}", core.layer_stem, e.name),
                None => e.name.clone(),
            };
            let name = local_name(&format!("model.{body}"));
            let item = match &e.value {
                // TP rank 0's copy, as mcore loads it.
                EntryValue::Object(v) => Item::Object(v.first().cloned().unwrap_or(Value::None)),
                EntryValue::Tensor(t) => {
                    let rows = t.shape.first().copied().unwrap_or(1);
                    let pieces = core.read(&body, t, Axis::First, 0..rows)?;
                    Item::Tensor(Flat::new(&name, t.dtype, t.shape.clone(), pieces)?)
                }
            };
            out.entries.push(Entry { name, item });
        }
        out.sort();
        Ok(out)
    }
}

/// `…layers.{l}.rest` -> `…layers.rest` (the stacked distributed key).
pub fn stack_name(name: &str) -> Option<(u64, String)> {
    let (l, suffix) = split_layer(name)?;
    Some((l, format!("model.decoder.layers.{suffix}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_between_specs() {
        assert_eq!(
            local_name("model.module.decoder.layers.2.self_attention.linear_qkv.layer_norm_weight"),
            "model.decoder.layers.2.input_layernorm.weight"
        );
        assert_eq!(
            local_name("decoder.final_layernorm.weight"),
            "model.decoder.final_layernorm.weight"
        );
        assert_eq!(
            te_name("model.decoder.layers.2.pre_mlp_layernorm.weight"),
            "model.decoder.layers.2.mlp.linear_fc1.layer_norm_weight"
        );
        assert_eq!(
            te_name("model.decoder.final_layernorm.weight"),
            "model.decoder.final_layernorm.weight"
        );
        assert_eq!(
            stack_name("model.decoder.layers.3.mlp.linear_fc1.weight"),
            Some((3, "model.decoder.layers.mlp.linear_fc1.weight".to_string()))
        );
    }

    #[test]
    fn canonical_of_tp1_and_tp2_fixtures_agree() {
        let root = env!("CARGO_MANIFEST_DIR");
        let one = Checkpoint::open(format!(
            "{root}/fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo"
        ))
        .unwrap();
        let two = Checkpoint::open(format!(
            "{root}/fixtures/mcore/llama/nemo/tiny_llama_tp2.nemo"
        ))
        .unwrap();
        let dist = Checkpoint::open(format!(
            "{root}/fixtures/mcore/llama/nemo/tiny_llama_dist_tp1.nemo"
        ))
        .unwrap();
        let (a, b, c) = (
            NamedModel::from_checkpoint(&one).unwrap(),
            NamedModel::from_checkpoint(&two).unwrap(),
            NamedModel::from_checkpoint(&dist).unwrap(),
        );
        let names = |c: &NamedModel| c.entries.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&a), names(&b));
        // NamedModel order is the state-dict order of the fixture's rank file.
        let stored: Vec<String> = one.rank_files()[0]
            .entries()
            .map(|(k, _)| k.to_string())
            .collect();
        assert_eq!(names(&a), stored);
        assert_eq!(a.entries.len(), 24);
        // The dist checkpoint drops output_layer._extra_state.
        let mut want = names(&a);
        want.retain(|n| n != "model.output_layer._extra_state");
        assert_eq!(names(&c), want);
        for e in &a.entries {
            if let Item::Tensor(t) = &e.item {
                let bytes = crate::io::piece::concat(t.pieces());
                for other in [&b, &c] {
                    let u = other.tensor(&e.name).unwrap();
                    assert_eq!(u.shape, t.shape, "{}", e.name);
                    assert_eq!(crate::io::piece::concat(u.pieces()), bytes, "{}", e.name);
                }
            }
        }
        assert!(matches!(
            c.entries
                .iter()
                .find(|e| e.name.ends_with("1.mlp.linear_fc2._extra_state"))
                .map(|e| &e.item),
            Some(Item::Object(Value::None))
        ));
    }

    /// The TP2 fixture extracted to a folder, with rank 1's state dict edited by `edit`.
    fn edited_tp2(edit: impl Fn(&mut Vec<(Value, Value)>)) -> (tempfile::TempDir, Checkpoint) {
        let root = env!("CARGO_MANIFEST_DIR");
        let src = Checkpoint::open(format!(
            "{root}/fixtures/mcore/llama/nemo/tiny_llama_tp2.nemo"
        ))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        use crate::formats::members::Members;
        for name in src.archive().member_names() {
            let p = dir.path().join(&name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, src.read_member(&name).unwrap().as_slice()).unwrap();
        }
        let r1 = &src.rank_files()[1];
        let mut root_v = r1.file.root.clone();
        if let Value::Object(o) = &mut root_v {
            edit(&mut o.items);
        }
        let f = std::fs::File::create(dir.path().join(&r1.member)).unwrap();
        crate::formats::torch::file::save(f, &r1.file.archive_name, &root_v).unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        (dir, ck)
    }

    #[test]
    fn a_key_missing_on_one_rank_is_named() {
        let (_d, ck) = edited_tp2(|items| {
            items
                .retain(|(k, _)| k.as_str() != Some("model.decoder.layers.1.mlp.linear_fc2.weight"))
        });
        let e = NamedModel::from_checkpoint(&ck).unwrap_err();
        assert!(
            matches!(&e, Error::NamedModel(crate::model::canonical::Error::MissingShard { key, member })
                if key.ends_with("layers.1.mlp.linear_fc2.weight") && member.starts_with("mp_rank_01")),
            "{e}"
        );
    }

    #[test]
    fn a_non_tensor_where_a_tensor_belongs_is_named() {
        let (_d, ck) = edited_tp2(|items| {
            for (k, v) in items.iter_mut() {
                if k.as_str() == Some("model.decoder.layers.0.self_attention.linear_qkv.weight") {
                    *v = Value::Int(3);
                }
            }
        });
        let e = NamedModel::from_checkpoint(&ck).unwrap_err();
        assert!(
            matches!(&e, Error::NamedModel(crate::model::canonical::Error::MissingShard { key, member })
                if key.ends_with("layers.0.self_attention.linear_qkv.weight") && member.starts_with("mp_rank_01")),
            "{e}"
        );
    }
}
