//! The layout-independent checkpoint model: config, artifacts, layout and
//! tensors that know their per-rank pieces, over any of the four layouts.
//!
//! Opening reads only metadata: the tar index, `model_config.yaml`, each rank
//! file's zip directory and pickle, or the distributed checkpoint's
//! `.metadata`. Tensor payloads stay in the mapping until someone asks.

pub mod detect;
mod logical;
pub mod names;
pub mod write;

use std::path::Path;

use crate::formats::archive::{Archive, ArchiveKind, MemberKind};
use crate::formats::dist::DistCheckpoint;
use crate::formats::members::{MemberError, Members};
use crate::formats::torch::file::TorchFile;
use crate::formats::torch::pickle::Policy;
use crate::formats::torch::{Dtype, Value};
use crate::io::bytes::ByteView;
use crate::io::piece::Piece;
use crate::model::config::ModelConfig;
use crate::model::layout::Family;

pub use detect::{Detected, Variant};
pub use logical::{LogicalTensor, Shard};

pub use names::CONFIG_MEMBER;

/// Errors opening a checkpoint; each names the member it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The container could not be read.
    #[error(transparent)]
    Archive(#[from] crate::formats::archive::Error),
    /// `model_config.yaml` is not UTF-8 text.
    #[error("model_config.yaml: not UTF-8 text")]
    ConfigNotUtf8,
    /// The config did not parse.
    #[error("model_config.yaml: {0}")]
    Config(#[from] crate::model::config::Error),
    /// The weights layout is not recognised.
    #[error(transparent)]
    Layout(#[from] detect::Error),
    /// A rank's weights file did not parse.
    #[error("{member}: {source}")]
    Torch {
        /// The weights member.
        member: String,
        /// Why.
        #[source]
        source: crate::formats::torch::file::Error,
    },
    /// A rank's weights file is not a state dict.
    #[error("{member}: expected a state dict (a dict of tensors), found {found}")]
    NotStateDict {
        /// The weights member.
        member: String,
        /// What the pickle holds.
        found: String,
    },
    /// The distributed checkpoint did not parse.
    #[error("model_weights/: {0}")]
    Dist(#[from] crate::formats::dist::Error),
    /// Partition rules.
    #[error(transparent)]
    Rules(#[from] crate::model::layout::Error),
    /// A NeMo 2, Megatron-Bridge or Megatron-LM folder that could not be read.
    #[error(transparent)]
    Foreign(#[from] crate::model::foreign::Error),
}

/// One rank's weights file of a per-rank layout.
#[derive(Debug, Clone)]
pub struct RankFile {
    /// TP rank.
    pub tp: u64,
    /// PP rank.
    pub pp: u64,
    /// Archive member (`mp_rank_01/model_weights.ckpt`).
    pub member: String,
    /// The parsed file (tensors are views into the archive mapping).
    pub file: TorchFile,
}

impl RankFile {
    /// `(key, value)` pairs of the state dict, in file order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.file
            .root
            .dict_items()
            .unwrap_or(&[])
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?, v)))
    }
}

/// Where the weights are.
#[derive(Debug)]
pub enum Weights {
    /// Variants A-C: one torch.save file per (TP, PP) rank, sorted by (pp, tp).
    PerRank(Vec<RankFile>),
    /// Variant D: a distributed checkpoint under `model_weights/`.
    Dist(DistCheckpoint),
    /// Whole TP=1 tensors under megatron-core keys, mapped from another
    /// format (a Hugging Face folder read by `convert`); nothing on disk is
    /// in a `.nemo` weight layout.
    Global(Vec<GlobalTensor>),
}

/// A whole (TP=1) tensor whose row-major bytes are the concatenation of
/// stored pieces: how an HF folder's tensors become megatron-core ones without
/// a copy (a fused QKV is its q, k and v row blocks per query group; a gated
/// fc1 is `[gate; up]`). Objects (`_extra_state`) come as values.
#[derive(Debug, Clone)]
pub struct GlobalTensor {
    /// Megatron-core key (`model.decoder.layers.3.mlp.linear_fc1.weight`).
    pub key: String,
    /// The tensor, or an object.
    pub value: GlobalValue,
}

/// What a [`GlobalTensor`] holds.
#[derive(Debug, Clone)]
pub enum GlobalValue {
    /// A tensor: element type, global shape, row-major bytes in order.
    Tensor {
        /// Element type.
        dtype: Dtype,
        /// Global shape.
        shape: Vec<u64>,
        /// The bytes.
        pieces: Vec<Piece>,
    },
    /// An opaque object (`_extra_state`, `None` for a fresh model).
    Object(Value),
}

/// An opened checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    archive: Archive,
    /// The config.
    pub config: ModelConfig,
    /// Layout found on disk.
    pub layout: Detected,
    /// Partition rules for this model family.
    pub family: Family,
    /// The weights.
    pub weights: Weights,
    /// Non-weight, non-config file members (tokenizer files ...), in archive order.
    pub artifacts: Vec<String>,
    /// Non-fatal findings.
    pub warnings: Vec<String>,
    /// For a NeMo 2, Megatron-Bridge or Megatron-LM folder (read through NeMo 1 names, see
    /// [`crate::model::foreign`]): what it is.
    pub source: Option<crate::model::foreign::Source>,
}

impl Members for Archive {
    fn read_member(&self, name: &str) -> Result<ByteView, MemberError> {
        Ok(self.read(name)?)
    }

    fn member_names(&self) -> Vec<String> {
        self.members()
            .iter()
            .filter(|m| m.kind == MemberKind::File)
            .map(|m| m.name.clone())
            .collect()
    }
}

/// The pickle allowlist for `model_weights.ckpt` files: torch's weights_only
/// set (what `Policy::torch` allows, `_io.BytesIO` extra state included).
pub fn weights_policy() -> Policy {
    Policy::torch()
}

impl Checkpoint {
    /// Opens a `.nemo` (tar, tar.gz) or an extracted folder and reads its
    /// metadata; tensors are zero-copy views ready to be read.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint, Error> {
        Checkpoint::open_with(path.as_ref(), true)
    }

    /// A `.nemo`, or a NeMo 2 / Megatron-Bridge / Megatron-LM folder through NeMo 1 names.
    fn open_with(path: &Path, with_data: bool) -> Result<Checkpoint, Error> {
        if let Some(o) = crate::model::foreign::open(path)? {
            return Checkpoint::from_foreign(o, with_data);
        }
        Checkpoint::from_archive(Archive::open(path)?, with_data)
    }

    /// Reads an opened NeMo 2 / Megatron folder ([`crate::model::foreign::open`]);
    /// `with_data` maps tensor storages.
    ///
    /// # Errors
    /// As [`Checkpoint::from_archive`].
    pub fn from_foreign(
        o: crate::model::foreign::Opened,
        with_data: bool,
    ) -> Result<Checkpoint, Error> {
        let mut ck = Checkpoint::from_archive(o.archive, with_data)?;
        ck.warnings.extend(o.source.notes.iter().cloned());
        ck.source = Some(o.source);
        Ok(ck)
    }

    /// Like [`Checkpoint::open`], but rank files are read metadata-only: the
    /// zip directory and pickle, never a storage page (tensors know their
    /// dtype and shape, not their bytes). What `inspect` uses.
    pub fn open_metadata(path: impl AsRef<Path>) -> Result<Checkpoint, Error> {
        Checkpoint::open_with(path.as_ref(), false)
    }

    /// Reads the metadata of an opened archive; `with_data` maps tensor storages.
    pub fn from_archive(archive: Archive, with_data: bool) -> Result<Checkpoint, Error> {
        let names = archive.member_names();
        let layout = detect::detect(&names)?;
        let mut warnings = Vec::new();
        // Bare weight folders (rank folders, a DCP folder) have no config: we
        // still read them, with an empty config and a warning.
        let text = if names.iter().any(|n| n == CONFIG_MEMBER) {
            let bytes = archive.read(CONFIG_MEMBER)?;
            String::from_utf8(bytes.as_slice().to_vec()).map_err(|_| Error::ConfigNotUtf8)?
        } else {
            warnings.push(
                "no model_config.yaml: not a complete .nemo; architecture unknown".to_string(),
            );
            String::from("{}\n")
        };
        let config = ModelConfig::parse(&text)?;

        let weights = if layout.variant == Variant::Distributed {
            let mut dist = DistCheckpoint::open(&archive, &layout.dist_dir)?;
            normalise_dist_keys(&mut dist, &mut warnings);
            Weights::Dist(dist)
        } else {
            // a Megatron-LM model_optim_rng.pt (assembled under NeMo 1 names) also pickles
            // the run's args, RNG and optimizer state
            let policy = if archive.kind() == ArchiveKind::Assembled {
                crate::model::foreign::mlm_policy()
            } else {
                weights_policy()
            };
            let mut ranks = Vec::with_capacity(layout.ranks.len());
            for (tp, pp, member) in &layout.ranks {
                let load = |member: &str| -> Result<TorchFile, Error> {
                    let bytes = archive.read(member)?;
                    let loaded = if with_data {
                        crate::formats::torch::file::load(bytes, &policy)
                    } else {
                        crate::formats::torch::file::load_metadata(bytes, &policy)
                    };
                    let mut file = loaded.map_err(|source| Error::Torch {
                        member: member.to_string(),
                        source,
                    })?;
                    unwrap_megatron_lm(&mut file.root);
                    Ok(file)
                };
                let mut file = load(member)?;
                // a Megatron-LM legacy rank's expert-parallel siblings (see foreign::ep_member)
                let mut siblings = Vec::new();
                let mut e = 1;
                while archive
                    .get(&crate::model::foreign::ep_member(member, e))
                    .is_some()
                {
                    siblings.push(load(&crate::model::foreign::ep_member(member, e))?.root);
                    e += 1;
                }
                if !siblings.is_empty() {
                    merge_expert_ranks(&mut file.root, siblings);
                }
                if file.root.dict_items().is_none() {
                    return Err(Error::NotStateDict {
                        member: member.clone(),
                        found: value_kind(&file.root),
                    });
                }
                ranks.push(RankFile {
                    tp: *tp,
                    pp: *pp,
                    member: member.clone(),
                    file,
                });
            }
            Weights::PerRank(ranks)
        };

        let family_name = if config.mcore_gpt() || looks_mcore(&weights) {
            "mcore-gpt"
        } else {
            "legacy-gpt"
        };
        let family = Family::load(family_name)?;

        // A bare distributed-checkpoint folder holds nothing but weights.
        let bare_dist = layout.variant == Variant::Distributed && layout.dist_dir.is_empty();
        let artifacts = names
            .iter()
            .filter(|n| !bare_dist && n.as_str() != CONFIG_MEMBER && !is_weights_member(n))
            .cloned()
            .collect();

        let (ctp, cpp) = (
            config.tensor_model_parallel_size(),
            config.pipeline_model_parallel_size(),
        );
        let has_config = names.iter().any(|n| n == CONFIG_MEMBER);
        if has_config
            && layout.variant != Variant::Distributed
            && (ctp, cpp) != (layout.tp, layout.pp)
        {
            warnings.push(format!(
                "config says TP={ctp} PP={cpp} but the weights on disk are TP={} PP={}; NeMo will refuse to restore this",
                layout.tp, layout.pp
            ));
        }
        Ok(Checkpoint {
            archive,
            config,
            layout,
            family,
            weights,
            artifacts,
            warnings,
            source: None,
        })
    }

    /// A checkpoint over whole tensors mapped from another format: `archive`
    /// holds `model_config.yaml` and the artifacts (see
    /// [`Archive::assembled`]), `tensors` the weights at TP=1, PP=1.
    ///
    /// # Errors
    /// A missing or unparsable config, an unknown family.
    pub fn from_global(archive: Archive, tensors: Vec<GlobalTensor>) -> Result<Checkpoint, Error> {
        let bytes = archive.read(CONFIG_MEMBER)?;
        let text =
            String::from_utf8(bytes.as_slice().to_vec()).map_err(|_| Error::ConfigNotUtf8)?;
        let config = ModelConfig::parse(&text)?;
        let family = Family::load("mcore-gpt")?;
        let artifacts = archive
            .member_names()
            .into_iter()
            .filter(|n| n != CONFIG_MEMBER)
            .collect();
        Ok(Checkpoint {
            archive,
            config,
            layout: Detected {
                variant: Variant::SingleFile,
                tp: 1,
                pp: 1,
                ranks: Vec::new(),
                dist_dir: String::new(),
            },
            family,
            weights: Weights::Global(tensors),
            artifacts,
            warnings: Vec::new(),
            source: None,
        })
    }

    /// The underlying archive.
    pub fn archive(&self) -> &Archive {
        &self.archive
    }

    /// Path it was opened from.
    pub fn path(&self) -> &Path {
        self.archive.path()
    }

    /// `tar`, `tar.gz` or `folder` (NeMo 2 and Megatron folders included), `assembled` for
    /// a model mapped from another format.
    pub fn container(&self) -> &'static str {
        if self.source.is_some() {
            return "folder";
        }
        match self.archive.kind() {
            ArchiveKind::Tar => "tar",
            ArchiveKind::GzipTar => "tar.gz",
            ArchiveKind::Folder => "folder",
            ArchiveKind::Assembled => "assembled",
        }
    }

    /// The bytes of a member (artifacts, config).
    pub fn read_member(&self, name: &str) -> Result<ByteView, crate::formats::archive::Error> {
        self.archive.read(name)
    }

    /// Rank files (per-rank layouts only).
    pub fn rank_files(&self) -> &[RankFile] {
        match &self.weights {
            Weights::PerRank(r) => r,
            Weights::Dist(_) | Weights::Global(_) => &[],
        }
    }

    /// The logical tensors (global names and shapes, per-rank pieces).
    pub fn tensors(&self) -> Vec<LogicalTensor> {
        logical::build(self)
    }
}

/// True for members that hold weights (rank folders, the dist folder, the single file).
pub fn is_weights_member(name: &str) -> bool {
    name == detect::WEIGHTS_FILE
        || name.starts_with("model_weights.ep")
        || name.starts_with(&format!("{}/", detect::DIST_DIR))
        || name.starts_with("mp_rank_")
        || name.starts_with("tp_rank_")
}

/// The first key components of a megatron-core GPT's state dict.
const MODEL_ROOTS: &[&str] = &[
    "embedding",
    "decoder",
    "output_layer",
    "mtp",
    "rotary_pos_emb",
];

/// Gives a distributed checkpoint NeMo 1's `model.` keys when it has none: NeMo 2 saves
/// `module.*`, Megatron-LM and Megatron-Bridge save the GPT's keys bare. Entries outside the
/// model (optimizer state, RNG state, the common state of megatron-core 0.19+) are dropped:
/// nemo-tool reads weights.
fn normalise_dist_keys(dist: &mut DistCheckpoint, warnings: &mut Vec<String>) {
    if dist.tensors.iter().any(|t| t.key.starts_with("model.")) {
        return;
    }
    let rename = |k: &str| -> Option<String> {
        let bare = k.strip_prefix("module.").unwrap_or(k);
        let root = bare.split(['.', '/']).next().unwrap_or(bare);
        MODEL_ROOTS.contains(&root).then(|| format!("model.{bare}"))
    };
    let before = dist.tensors.len() + dist.objects.len();
    dist.tensors.retain_mut(|t| match rename(&t.key) {
        Some(k) => {
            t.key = k;
            true
        }
        None => false,
    });
    dist.objects.retain_mut(|o| match rename(&o.key) {
        Some(k) => {
            o.key = k;
            true
        }
        None => false,
    });
    // planner paths describe the original nesting; the renamed keys have none
    dist.planner_paths.clear();
    let dropped = before - dist.tensors.len() - dist.objects.len();
    if dropped > 0 {
        warnings.push(format!(
            "{dropped} entries outside the model (optimizer, RNG or common state) not read"
        ));
    }
}

/// A Megatron-LM `model_optim_rng.pt` holds `{args, checkpoint_version, iteration, model,
/// optimizer, rng_state, ...}`: its `model` state dict becomes the root, under NeMo 1's
/// `model.` keys. Anything else is left as it is.
fn unwrap_megatron_lm(root: &mut Value) {
    if root.get("checkpoint_version").is_none() {
        return;
    }
    let Some(items) = root.get("model").and_then(Value::dict_items) else {
        return;
    };
    let renamed: Vec<(Value, Value)> = items
        .iter()
        .filter_map(|(k, v)| Some((Value::Str(format!("model.{}", k.as_str()?)), v.clone())))
        .collect();
    *root = Value::Dict(renamed);
}

/// Where a key numbers an expert: the byte range of the number and its value
/// (`...mlp.experts.local_experts.3.linear_fc1.weight`, TE's grouped
/// `...mlp.experts.linear_fc1.weight3`).
fn expert_number(key: &str) -> Option<(usize, usize, u64)> {
    if let Some(pos) = key.find(".local_experts.") {
        let start = pos + ".local_experts.".len();
        let end = start + key[start..].find('.')?;
        return Some((start, end, key[start..end].parse().ok()?));
    }
    if !key.contains(".mlp.experts.linear_fc") {
        return None;
    }
    let digits = key.len() - key.bytes().rev().take_while(u8::is_ascii_digit).count();
    let head = &key[..digits];
    (digits < key.len() && (head.ends_with(".weight") || head.ends_with(".bias")))
        .then(|| Some((digits, key.len(), key[digits..].parse().ok()?)))
        .flatten()
}

/// Folds a Megatron-LM legacy rank's expert-parallel siblings (EP ranks 1, 2, ...) into its
/// EP-0 state dict: their experts, numbered from 0 on each rank, become `e * local + i` and
/// follow EP 0's experts of the same module, so the order is megatron-core's EP-1 order;
/// their other entries are replicas of EP 0's and are left out.
fn merge_expert_ranks(root: &mut Value, siblings: Vec<Value>) {
    let Value::Dict(items) = root else { return };
    let prefix = |k: &Value| -> Option<String> {
        let key = k.as_str()?;
        expert_number(key).map(|(a, _, _)| key[..a].to_string())
    };
    let local = items
        .iter()
        .filter_map(|(k, _)| expert_number(k.as_str()?).map(|(_, _, i)| i + 1))
        .max()
        .unwrap_or(0);
    // the siblings' experts, renumbered, by the module they belong to
    let mut extra: Vec<(String, Vec<(Value, Value)>)> = Vec::new();
    for (e, sib) in siblings.into_iter().enumerate() {
        let Value::Dict(sib) = sib else { continue };
        for (k, v) in sib {
            let Some(key) = k.as_str() else { continue };
            let Some((a, b, i)) = expert_number(key) else {
                continue;
            };
            let global = (e as u64 + 1) * local + i;
            let entry = (Value::Str(format!("{}{global}{}", &key[..a], &key[b..])), v);
            match extra.iter_mut().find(|(p, _)| p == &key[..a]) {
                Some((_, list)) => list.push(entry),
                None => extra.push((key[..a].to_string(), vec![entry])),
            }
        }
    }
    let old = std::mem::take(items);
    let last: std::collections::HashMap<String, usize> = old
        .iter()
        .enumerate()
        .filter_map(|(n, (k, _))| Some((prefix(k)?, n)))
        .collect();
    for (n, (k, v)) in old.into_iter().enumerate() {
        let p = prefix(&k);
        items.push((k, v));
        if let Some(p) = p.filter(|p| last.get(p) == Some(&n)) {
            if let Some(pos) = extra.iter().position(|(x, _)| *x == p) {
                items.extend(extra.remove(pos).1);
            }
        }
    }
    for (_, rest) in extra {
        items.extend(rest);
    }
}

/// mcore keys have `decoder.`; legacy ones `language_model.`.
fn looks_mcore(weights: &Weights) -> bool {
    match weights {
        Weights::PerRank(ranks) => ranks
            .first()
            .map(|r| r.entries().any(|(k, _)| k.contains(".decoder.")))
            .unwrap_or(false),
        Weights::Dist(_) | Weights::Global(_) => true,
    }
}

/// A short description of a value's type, for errors.
fn value_kind(v: &Value) -> String {
    match v {
        Value::Object(o) => format!("{}.{}", o.class.module, o.class.name),
        Value::Tensor(_) => "a tensor".into(),
        Value::List(_) => "a list".into(),
        Value::Tuple(_) => "a tuple".into(),
        other => format!("{other:?}").chars().take(40).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_numbers() {
        let k = "model.decoder.layers.1.mlp.experts.local_experts.12.linear_fc1.weight";
        let (a, b, i) = expert_number(k).unwrap();
        assert_eq!((&k[a..b], i), ("12", 12));
        let g = "model.decoder.layers.0.mlp.experts.linear_fc2.weight3";
        assert_eq!(expert_number(g).map(|x| x.2), Some(3));
        for other in [
            "model.decoder.layers.0.mlp.router.weight",
            "model.decoder.layers.0.mlp.experts.linear_fc1._extra_state",
            "model.decoder.layers.3.mlp.linear_fc1.weight",
        ] {
            assert_eq!(expert_number(other), None, "{other}");
        }
    }

    /// EP rank 1's experts follow EP 0's of the same module, renumbered; its replicas go.
    #[test]
    fn expert_ranks_merge_in_ep1_order() {
        let s = |k: &str| Value::Str(k.to_string());
        let e = |l: u64, i: u64, w: &str| {
            format!("model.decoder.layers.{l}.mlp.experts.local_experts.{i}.{w}")
        };
        let dict =
            |keys: &[String]| Value::Dict(keys.iter().map(|k| (s(k), Value::None)).collect());
        let ep0 = [
            "model.embedding.word_embeddings.weight".to_string(),
            e(0, 0, "linear_fc1.weight"),
            e(0, 1, "linear_fc1.weight"),
            "model.decoder.layers.1.mlp.router.weight".to_string(),
            e(1, 0, "linear_fc1.weight"),
            e(1, 1, "linear_fc1.weight"),
            "model.output_layer.weight".to_string(),
        ];
        let ep1 = [
            "model.embedding.word_embeddings.weight".to_string(),
            e(0, 0, "linear_fc1.weight"),
            e(0, 1, "linear_fc1.weight"),
            e(1, 0, "linear_fc1.weight"),
            e(1, 1, "linear_fc1.weight"),
        ];
        let mut root = dict(&ep0);
        merge_expert_ranks(&mut root, vec![dict(&ep1)]);
        let keys: Vec<&str> = root
            .dict_items()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_str().unwrap())
            .collect();
        let want = [
            "model.embedding.word_embeddings.weight".to_string(),
            e(0, 0, "linear_fc1.weight"),
            e(0, 1, "linear_fc1.weight"),
            e(0, 2, "linear_fc1.weight"),
            e(0, 3, "linear_fc1.weight"),
            "model.decoder.layers.1.mlp.router.weight".to_string(),
            e(1, 0, "linear_fc1.weight"),
            e(1, 1, "linear_fc1.weight"),
            e(1, 2, "linear_fc1.weight"),
            e(1, 3, "linear_fc1.weight"),
            "model.output_layer.weight".to_string(),
        ];
        assert_eq!(keys, want.iter().map(String::as_str).collect::<Vec<_>>());
    }
}
