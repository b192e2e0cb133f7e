//! Tensor-parallel partition rules, loaded from the declarative files in
//! `formats/` (embedded at build time). A model family is a file there, not a
//! match arm here: this module only matches key patterns and answers "how is
//! this tensor split across TP ranks, and what is its global shape".

use serde::Deserialize;

/// How one tensor is partitioned over tensor-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Identical on every rank.
    Replicated,
    /// Contiguous split of dim 0.
    Column,
    /// Contiguous split of the last dim.
    Row,
    /// Contiguous split of dim 0 of the padded vocabulary.
    Vocab,
    /// Contiguous split of dim 0 of the query-group-interleaved fused QKV.
    Qkv,
    /// MLP input projection: `[gate_r; up_r]` per rank when gated, else `column`.
    Fc1,
    /// Gated fc1 as resolved for a given config: rank r holds `[gate_r; up_r]`.
    GatedFc1,
    /// An opaque per-rank object (`_extra_state`).
    ExtraState,
}

impl Rule {
    /// The dimension (of the per-layer tensor) that is split, if any.
    pub fn split_dim(self, ndim: usize) -> Option<usize> {
        match self {
            Rule::Replicated | Rule::ExtraState => None,
            Rule::Row => ndim.checked_sub(1),
            Rule::Column | Rule::Vocab | Rule::Qkv | Rule::Fc1 | Rule::GatedFc1 => {
                if ndim == 0 {
                    None
                } else {
                    Some(0)
                }
            }
        }
    }

    /// Short name as used in `formats/*.yaml`.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Replicated => "replicated",
            Rule::Column => "column",
            Rule::Row => "row",
            Rule::Vocab => "vocab",
            Rule::Qkv => "qkv",
            Rule::Fc1 => "fc1",
            Rule::GatedFc1 => "gated_fc1",
            Rule::ExtraState => "extra_state",
        }
    }
}

/// Errors loading a rules file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The YAML did not parse.
    #[error("formats/{file}: {source}")]
    Parse {
        /// The file name.
        file: String,
        /// The parser's error.
        source: serde_yaml_ng::Error,
    },
    /// No family of that name.
    #[error("no partition rules for model family `{0}`")]
    UnknownFamily(String),
}

#[derive(Debug, Clone, Deserialize)]
struct RuleEntry {
    #[serde(rename = "match")]
    pattern: String,
    rule: Rule,
}

/// The partition rules of one model family.
#[derive(Debug, Clone, Deserialize)]
pub struct Family {
    /// Family name (`mcore-gpt`, `legacy-gpt`).
    pub family: String,
    /// Key prefixes stripped before matching, longest first.
    pub prefixes: Vec<String>,
    /// Activations whose gate and up halves are stored apart in this family.
    #[serde(default)]
    pub separate_glu: Vec<String>,
    rules: Vec<RuleEntry>,
    /// Norm name pairs (local spec vs TE / distributed-checkpoint names).
    #[serde(default)]
    pub norm_aliases: Vec<NormAlias>,
    /// Per-rank state-dict key order, if the family defines one.
    #[serde(default)]
    pub state_dict: Option<StateDictTemplate>,
}

/// A norm naming pair: the layer-relative key prefix in the local spec and in
/// the TE spec (which the distributed checkpoint always uses).
#[derive(Debug, Clone, Deserialize)]
pub struct NormAlias {
    /// Local-spec prefix (`input_layernorm.`).
    pub local: String,
    /// TE prefix (`self_attention.linear_qkv.layer_norm_`).
    pub te: String,
}

/// The order of keys in a per-rank state dict, as data (`formats/*.yaml`).
#[derive(Debug, Clone, Deserialize)]
pub struct StateDictTemplate {
    /// The per-layer key stem (`decoder.layers.`).
    pub layers: String,
    /// Key of the tied output copy on the last stage at PP>1.
    #[serde(default)]
    pub tied_output: Option<String>,
    /// The tensor that `tied_output` copies.
    #[serde(default)]
    pub tied_source: Option<String>,
    /// Objects (value None) always present on the last stage.
    #[serde(default)]
    pub last_stage_objects: Vec<String>,
    /// First-stage keys before the layers.
    #[serde(default)]
    pub head: Vec<String>,
    /// Layer-relative keys, local spec.
    #[serde(default)]
    pub layer_local: Vec<String>,
    /// Layer-relative keys, TE spec.
    #[serde(default)]
    pub layer_te: Vec<String>,
    /// Last-stage keys after the layers.
    #[serde(default)]
    pub tail: Vec<String>,
}

/// The result of matching one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match {
    /// The rule.
    pub rule: Rule,
    /// The layer number found in the key, for per-layer keys.
    pub layer: Option<u64>,
    /// True for a stacked key (distributed checkpoints): the layer is a leading axis.
    pub stacked: bool,
}

const FILES: &[(&str, &str)] = &[
    (
        "mcore-gpt.yaml",
        include_str!("../../formats/mcore-gpt.yaml"),
    ),
    (
        "legacy-gpt.yaml",
        include_str!("../../formats/legacy-gpt.yaml"),
    ),
];

impl Family {
    /// Loads a family by name from the embedded `formats/` files.
    pub fn load(name: &str) -> Result<Family, Error> {
        for (file, text) in FILES {
            let fam: Family = serde_yaml_ng::from_str(text).map_err(|source| Error::Parse {
                file: file.to_string(),
                source,
            })?;
            if fam.family == name {
                return Ok(fam);
            }
        }
        Err(Error::UnknownFamily(name.to_string()))
    }

    /// Strips the first matching prefix.
    pub fn strip_prefix<'k>(&self, key: &'k str) -> &'k str {
        self.prefixes
            .iter()
            .find_map(|p| key.strip_prefix(p.as_str()))
            .unwrap_or(key)
    }

    /// Matches a full state-dict key (prefix included).
    pub fn lookup(&self, key: &str) -> Option<Match> {
        let key = key.split('/').next().unwrap_or(key); // DCP ShardedObject: `key/shard_i_L`
        let body = self.strip_prefix(key);
        let segs: Vec<&str> = body.split('.').collect();
        self.rules
            .iter()
            .find_map(|r| match_pattern(&r.pattern, &segs, r.rule))
    }

    /// `rule` as it applies under a config's activation: `fc1` becomes
    /// `gated_fc1` or `column`.
    pub fn resolve(&self, rule: Rule, activation: &str, gated: bool) -> Rule {
        match rule {
            Rule::Fc1 if gated && !self.separate_glu.iter().any(|a| a == activation) => {
                Rule::GatedFc1
            }
            Rule::Fc1 => Rule::Column,
            other => other,
        }
    }
}

/// Segment-wise equality where a later `*` matches one numeric segment (an expert's index).
fn segs_match(pat: &[&str], segs: &[&str]) -> bool {
    pat.len() == segs.len()
        && pat.iter().zip(segs).all(|(p, s)| {
            *p == *s || (*p == "*" && !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// Matches `pattern` against key segments. `*` as the first segment matches any
/// prefix (for `*._extra_state`); elsewhere the first `*` matches the layer number, or
/// nothing at all (a stacked distributed-checkpoint key), and a later one any numeric
/// segment (`local_experts.*`).
fn match_pattern(pattern: &str, segs: &[&str], rule: Rule) -> Option<Match> {
    let pat: Vec<&str> = pattern.split('.').collect();
    if pat.first() == Some(&"*") && pat.len() >= 2 {
        let tail = &pat[1..];
        if segs.len() > tail.len() && segs[segs.len() - tail.len()..] == *tail {
            return Some(Match {
                rule,
                layer: find_layer(segs),
                stacked: false,
            });
        }
        return None;
    }
    if let Some(star) = pat.iter().position(|s| *s == "*") {
        let (before, after) = (&pat[..star], &pat[star + 1..]);
        if segs.len() == pat.len()
            && segs[..star] == *before
            && segs_match(after, &segs[star + 1..])
            && segs[star].bytes().all(|b| b.is_ascii_digit())
        {
            let layer = segs[star].parse().ok();
            return Some(Match {
                rule,
                layer,
                stacked: false,
            });
        }
        if segs.len() + 1 == pat.len()
            && segs[..star] == *before
            && segs_match(after, &segs[star..])
        {
            return Some(Match {
                rule,
                layer: None,
                stacked: true,
            });
        }
        return None;
    }
    (segs == pat.as_slice()).then_some(Match {
        rule,
        layer: None,
        stacked: false,
    })
}

/// The first numeric segment after a `layers` segment.
fn find_layer(segs: &[&str]) -> Option<u64> {
    let i = segs.iter().position(|s| *s == "layers")?;
    segs.get(i + 1)?.parse().ok()
}

/// Replaces the layer number of a per-layer key (`...layers.3.foo` -> `...layers.7.foo`);
/// used to go between stage-local and global layer numbering.
pub fn renumber_layer(key: &str, new_layer: u64) -> Option<String> {
    let marker = "layers.";
    let start = key.find(marker)? + marker.len();
    let rest = &key[start..];
    let end = rest.find('.').unwrap_or(rest.len());
    if end == 0 || !rest[..end].bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!("{}{}{}", &key[..start], new_layer, &rest[end..]))
}

/// The global shape of a tensor whose rank-local shape is `local` under `rule`
/// at tensor-parallel size `tp`. `stacked` keys carry a leading layer axis.
pub fn global_shape(rule: Rule, local: &[u64], tp: u64, stacked: bool) -> Vec<u64> {
    let mut shape = local.to_vec();
    let off = usize::from(stacked);
    if let Some(d) = rule.split_dim(local.len().saturating_sub(off)) {
        if let Some(v) = shape.get_mut(d + off) {
            *v = v.saturating_mul(tp);
        }
    }
    shape
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_families_parse() {
        for name in ["mcore-gpt", "legacy-gpt"] {
            let f = Family::load(name).unwrap();
            assert!(!f.rules.is_empty());
        }
        assert!(matches!(Family::load("t5"), Err(Error::UnknownFamily(_))));
    }

    #[test]
    fn mcore_keys_match() {
        let f = Family::load("mcore-gpt").unwrap();
        let m = f
            .lookup("model.decoder.layers.3.self_attention.linear_qkv.weight")
            .unwrap();
        assert_eq!(
            m,
            Match {
                rule: Rule::Qkv,
                layer: Some(3),
                stacked: false
            }
        );
        let m = f
            .lookup("model.decoder.layers.self_attention.linear_proj.weight")
            .unwrap();
        assert_eq!(
            m,
            Match {
                rule: Rule::Row,
                layer: None,
                stacked: true
            }
        );
        let m = f
            .lookup("model.decoder.layers.0.mlp.linear_fc1._extra_state")
            .unwrap();
        assert_eq!(m.rule, Rule::ExtraState);
        assert_eq!(m.layer, Some(0));
        let m = f
            .lookup("model.decoder.layers.mlp.linear_fc1._extra_state/shard_1_2")
            .unwrap();
        assert_eq!(m.rule, Rule::ExtraState);
        assert_eq!(
            f.lookup("model.embedding.word_embeddings.weight")
                .unwrap()
                .rule,
            Rule::Vocab
        );
        assert!(f
            .lookup("model.decoder.layers.x.mlp.linear_fc1.weight")
            .is_none());
        // mixture-of-experts: the layer is the first number, the expert any later one
        let m = f
            .lookup("model.decoder.layers.1.mlp.experts.local_experts.7.linear_fc1.weight")
            .unwrap();
        assert_eq!((m.rule, m.layer, m.stacked), (Rule::Fc1, Some(1), false));
        let m = f
            .lookup("model.decoder.layers.1.mlp.experts.local_experts.7.linear_fc2.weight")
            .unwrap();
        assert_eq!(m.rule, Rule::Row);
        let m = f
            .lookup("model.decoder.layers.0.mlp.router.weight")
            .unwrap();
        assert_eq!((m.rule, m.layer), (Rule::Replicated, Some(0)));
        assert!(f
            .lookup("model.decoder.layers.1.mlp.experts.local_experts.x.linear_fc2.weight")
            .is_none());
        assert!(f.lookup("model.something_else").is_none());
    }

    #[test]
    fn fc1_resolves_by_activation() {
        let mcore = Family::load("mcore-gpt").unwrap();
        assert_eq!(mcore.resolve(Rule::Fc1, "swiglu", true), Rule::GatedFc1);
        assert_eq!(mcore.resolve(Rule::Fc1, "gelu", false), Rule::Column);
        let legacy = Family::load("legacy-gpt").unwrap();
        assert_eq!(legacy.resolve(Rule::Fc1, "swiglu", true), Rule::Column);
        assert_eq!(
            legacy.resolve(Rule::Fc1, "fast-swiglu", true),
            Rule::GatedFc1
        );
    }

    #[test]
    fn global_shapes() {
        assert_eq!(global_shape(Rule::Row, &[64, 32], 2, false), vec![64, 64]);
        assert_eq!(global_shape(Rule::Qkv, &[48, 64], 2, false), vec![96, 64]);
        assert_eq!(
            global_shape(Rule::Row, &[2, 64, 32], 2, true),
            vec![2, 64, 64]
        );
        assert_eq!(global_shape(Rule::Replicated, &[64], 4, false), vec![64]);
    }

    #[test]
    fn renumbers_layers() {
        assert_eq!(
            renumber_layer("model.decoder.layers.3.mlp.linear_fc1.weight", 11).as_deref(),
            Some("model.decoder.layers.11.mlp.linear_fc1.weight")
        );
        assert_eq!(renumber_layer("model.output_layer.weight", 1), None);
    }
}
