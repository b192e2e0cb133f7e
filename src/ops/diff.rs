//! `diff`: compares two checkpoints logically, whatever their layouts (TP,
//! PP, per-rank or distributed): both are read through their canonical views
//! ([`crate::model::canonical`]), so tensors pair up by canonical name. Reports
//! tensors only in one, shape and dtype differences, the max abs difference
//! per tensor (f32/f16/bf16/f64 and integers decoded to f64), and key-level
//! config differences. Vocab padding rows are left out (as in the canonical
//! checksums), as are opaque `_extra_state` objects and the tied output copy.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::canonical::{Axis, Canonical, EntryValue, Tensor};
use crate::model::config::ModelConfig;
use crate::ops::checksum::{canonical_name, is_tied_copy, CanonicalOptions};

/// Config keys that describe the layout, not the model: listed, but they do
/// not make two checkpoints different.
pub const LAYOUT_KEYS: &[&str] = &[
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "dist_ckpt_format",
];

/// Errors comparing; each names the side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A canonical view could not be built or read.
    #[error("{side}: {source}")]
    Canonical {
        /// `a` or `b`.
        side: &'static str,
        /// Why.
        #[source]
        source: Box<crate::model::canonical::Error>,
    },
    /// The vocab rows could not be determined.
    #[error("{side}: {source}")]
    Checksum {
        /// `a` or `b`.
        side: &'static str,
        /// Why.
        #[source]
        source: crate::ops::checksum::Error,
    },
}

/// Options for [`diff`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Values whose max abs difference is at most this count as equal.
    pub atol: f64,
    /// The true vocabulary size, when no tokenizer artifact says it.
    pub vocab_size: Option<u64>,
}

/// One tensor that differs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TensorDiff {
    /// Canonical name.
    pub name: String,
    /// dtype in A and B.
    pub dtype: (String, String),
    /// Canonical shape in A and B (vocab padding rows excluded).
    pub shape: (Vec<u64>, Vec<u64>),
    /// Max abs difference (equal shapes, decodable dtypes); `None` otherwise.
    pub max_abs_diff: Option<f64>,
}

/// One config key that differs.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConfigDiff {
    /// Dotted key relative to the model section.
    pub key: String,
    /// Value in A (YAML text), `None` when absent.
    pub a: Option<String>,
    /// Value in B.
    pub b: Option<String>,
    /// A layout key ([`LAYOUT_KEYS`]): reported, not counted.
    pub layout: bool,
}

/// The comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// True when nothing but layout keys differ.
    pub same: bool,
    /// Tensors in A only.
    pub only_in_a: Vec<String>,
    /// Tensors in B only.
    pub only_in_b: Vec<String>,
    /// Tensors present in both.
    pub compared: u64,
    /// Tensors that differ in shape, dtype or values beyond `atol`.
    pub tensors: Vec<TensorDiff>,
    /// Largest max abs difference over all compared tensors.
    pub max_abs_diff: f64,
    /// Config keys that differ.
    pub config: Vec<ConfigDiff>,
}

/// Key-level differences of two configs (model sections), sorted by key.
pub fn config_diff(a: &ModelConfig, b: &ModelConfig) -> Vec<ConfigDiff> {
    let (mut fa, mut fb) = (BTreeMap::new(), BTreeMap::new());
    flatten(a.section(), "", 0, &mut fa);
    flatten(b.section(), "", 0, &mut fb);
    let keys: std::collections::BTreeSet<&String> = fa.keys().chain(fb.keys()).collect();
    keys.into_iter()
        .filter(|k| fa.get(*k) != fb.get(*k))
        .map(|k| ConfigDiff {
            key: k.clone(),
            a: fa.get(k).cloned(),
            b: fb.get(k).cloned(),
            layout: LAYOUT_KEYS.contains(&k.as_str()),
        })
        .collect()
}

/// Dotted keys -> scalar text; sequences are compared as a whole.
fn flatten(
    v: &serde_yaml_ng::Value,
    prefix: &str,
    depth: usize,
    out: &mut BTreeMap<String, String>,
) {
    use serde_yaml_ng::Value as V;
    match v {
        V::Mapping(m) if depth < 32 => {
            for (k, x) in m {
                let k = match k {
                    V::String(s) => s.clone(),
                    other => scalar_text(other),
                };
                let key = if prefix.is_empty() {
                    k
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(x, &key, depth + 1, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), scalar_text(other));
        }
    }
}

fn scalar_text(v: &serde_yaml_ng::Value) -> String {
    match v {
        serde_yaml_ng::Value::String(s) => s.clone(),
        other => serde_yaml_ng::to_string(other)
            .map(|s| s.trim_end().to_string())
            .unwrap_or_default(),
    }
}

/// Canonical tensors of one side: name -> (entry name, tensor, rows compared).
fn tensors<'c>(
    c: &'c Canonical,
    opts: &Options,
    side: &'static str,
) -> Result<BTreeMap<String, (String, &'c Tensor, u64)>, Error> {
    let copts = CanonicalOptions {
        vocab_size: opts.vocab_size,
        count_special: false,
    };
    let vocab = crate::ops::checksum::vocab_rows(c, &copts)
        .map_err(|source| Error::Checksum { side, source })?;
    let mut out = BTreeMap::new();
    for e in &c.entries {
        let EntryValue::Tensor(t) = &e.value else {
            continue;
        };
        if is_tied_copy(c, e.layer, &e.name) {
            continue;
        }
        let rows = t.shape.first().copied().unwrap_or(1);
        let rows = match (&vocab, t.rule) {
            (Some(v), crate::model::layout::Rule::Vocab) => v.hashed.min(rows),
            _ => rows,
        };
        out.insert(
            canonical_name(c, e.layer, &e.name),
            (e.name.clone(), t, rows),
        );
    }
    Ok(out)
}

/// Compares two canonical views (and their configs).
///
/// # Errors
/// A view that cannot be read ([`Error::Canonical`]).
pub fn diff(a: &Canonical, b: &Canonical, opts: &Options) -> Result<Report, Error> {
    let ta = tensors(a, opts, "a")?;
    let tb = tensors(b, opts, "b")?;
    let mut r = Report {
        same: true,
        only_in_a: ta
            .keys()
            .filter(|k| !tb.contains_key(*k))
            .cloned()
            .collect(),
        only_in_b: tb
            .keys()
            .filter(|k| !ta.contains_key(*k))
            .cloned()
            .collect(),
        compared: 0,
        tensors: Vec::new(),
        max_abs_diff: 0.0,
        config: config_diff(&a.checkpoint().config, &b.checkpoint().config),
    };
    for (name, (na, xa, ra)) in &ta {
        let Some((nb, xb, rb)) = tb.get(name) else {
            continue;
        };
        r.compared += 1;
        let shape = |t: &Tensor, rows: u64| {
            let mut s = t.shape.clone();
            if let Some(d) = s.first_mut() {
                *d = rows;
            }
            s
        };
        let (sa, sb) = (shape(xa, *ra), shape(xb, *rb));
        let max = if sa == sb {
            let pa = a
                .read(na, xa, Axis::First, 0..*ra)
                .map_err(|e| Error::Canonical {
                    side: "a",
                    source: Box::new(e),
                })?;
            let pb = b
                .read(nb, xb, Axis::First, 0..*rb)
                .map_err(|e| Error::Canonical {
                    side: "b",
                    source: Box::new(e),
                })?;
            crate::formats::numeric::max_abs_diff((&pa, xa.dtype), (&pb, xb.dtype)).map(|(m, _)| m)
        } else {
            None
        };
        if let Some(m) = max {
            r.max_abs_diff = r.max_abs_diff.max(m);
        }
        let differs =
            sa != sb || xa.dtype != xb.dtype || max.is_none_or(|m| m > opts.atol || m.is_nan());
        if differs {
            r.tensors.push(TensorDiff {
                name: name.clone(),
                dtype: (
                    xa.dtype.torch_name().to_string(),
                    xb.dtype.torch_name().to_string(),
                ),
                shape: (sa, sb),
                max_abs_diff: max,
            });
        }
    }
    r.same = r.only_in_a.is_empty()
        && r.only_in_b.is_empty()
        && r.tensors.is_empty()
        && r.config.iter().all(|c| c.layout);
    Ok(r)
}

impl Report {
    /// Human-readable text.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        for n in &self.only_in_a {
            let _ = writeln!(s, "- {n} (only in A)");
        }
        for n in &self.only_in_b {
            let _ = writeln!(s, "+ {n} (only in B)");
        }
        for t in &self.tensors {
            let mut parts = Vec::new();
            if t.dtype.0 != t.dtype.1 {
                parts.push(format!("dtype {} -> {}", t.dtype.0, t.dtype.1));
            }
            if t.shape.0 != t.shape.1 {
                parts.push(format!("shape {:?} -> {:?}", t.shape.0, t.shape.1));
            }
            if let Some(m) = t.max_abs_diff {
                parts.push(format!("max abs diff {m:e}"));
            }
            let _ = writeln!(s, "~ {}: {}", t.name, parts.join(", "));
        }
        for c in &self.config {
            let v = |x: &Option<String>| x.clone().unwrap_or_else(|| "(absent)".into());
            let tag = if c.layout { " (layout)" } else { "" };
            let _ = writeln!(s, "config {}: {} -> {}{tag}", c.key, v(&c.a), v(&c.b));
        }
        let _ = writeln!(
            s,
            "{}: {} tensors compared, {} differ, {} only in A, {} only in B, max abs diff {:e}",
            if self.same { "same" } else { "DIFFERENT" },
            self.compared,
            self.tensors.len(),
            self.only_in_a.len(),
            self.only_in_b.len(),
            self.max_abs_diff
        );
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

    #[test]
    fn tp1_tp2_and_dist_are_the_same_model() {
        let a = Checkpoint::open(fixture("fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo")).unwrap();
        let ca = Canonical::new(&a).unwrap();
        for f in ["tiny_llama_tp2.nemo", "tiny_llama_dist_tp1.nemo"] {
            let b = Checkpoint::open(fixture(&format!("fixtures/mcore/llama/nemo/{f}"))).unwrap();
            let cb = Canonical::new(&b).unwrap();
            let r = diff(&ca, &cb, &Options::default()).unwrap();
            assert!(r.same, "{f}: {}", r.render());
            assert_eq!(r.compared, 3 + 2 * 6);
            assert_eq!(r.max_abs_diff, 0.0);
        }
    }

    #[test]
    fn config_diff_is_key_level() {
        let a =
            ModelConfig::parse("a: 1\nb:\n  c: x\n  d: [1, 2]\ntensor_model_parallel_size: 1\n")
                .unwrap();
        let b = ModelConfig::parse("a: 1\nb:\n  c: y\n  e: true\ntensor_model_parallel_size: 2\n")
            .unwrap();
        let d = config_diff(&a, &b);
        let keys: Vec<(&str, bool)> = d.iter().map(|c| (c.key.as_str(), c.layout)).collect();
        assert_eq!(
            keys,
            vec![
                ("b.c", false),
                ("b.d", false),
                ("b.e", false),
                ("tensor_model_parallel_size", true)
            ]
        );
        assert_eq!(d[0].a.as_deref(), Some("x"));
        assert_eq!(d[2].a, None);
    }
}
