//! Job configuration the way NeMo scripts take it: a YAML tree (a built-in
//! default, or `--config FILE`) edited by Hydra-style overrides on the
//! command line.
//!
//! | override | meaning |
//! |---|---|
//! | `a.b=v` | set an existing key (unknown keys are an error, as in Hydra) |
//! | `+a.b=v` | add a new key (an error if it exists) |
//! | `++a.b=v` | add or set |
//! | `~a.b` | delete |
//!
//! Values are YAML scalars or flow collections: `3`, `1e-4`, `true`, `null`,
//! `[1.0,path/to/data]`, `{train: [a]}`. Hydra's `None` spelling is null.

use serde_yaml_ng::{Mapping, Value};

/// The built-in `distill` configuration.
pub const DISTILL_DEFAULT: &str = include_str!("../../conf/distill.yaml");

/// Configuration errors; each names the key or the override.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The YAML did not parse.
    #[error("{what}: {source}")]
    Yaml {
        /// What was being parsed.
        what: String,
        /// The parser's error.
        source: serde_yaml_ng::Error,
    },
    /// An override is not of the form `key=value`.
    #[error("override {0:?}: expected key=value, +key=value, ++key=value or ~key")]
    Syntax(String),
    /// `key=value` for a key that does not exist.
    #[error("override {arg:?}: key `{key}` is not in the config (to add it use +{key}=… or ++{key}=…){hint}")]
    UnknownKey {
        /// The override.
        arg: String,
        /// The key.
        key: String,
        /// A close existing key, if any.
        hint: String,
    },
    /// `+key=value` for a key that exists.
    #[error("override {arg:?}: key `{key}` already exists (use {key}=… or ++{key}=…)")]
    Exists {
        /// The override.
        arg: String,
        /// The key.
        key: String,
    },
    /// A path goes through a non-mapping value.
    #[error("override {arg:?}: `{key}` is not a mapping")]
    NotMapping {
        /// The override.
        arg: String,
        /// The key.
        key: String,
    },
    /// A key has the wrong type.
    #[error("config key `{key}`: expected {expected}, found {found}")]
    WrongType {
        /// The key.
        key: String,
        /// What was expected.
        expected: &'static str,
        /// What is there.
        found: String,
    },
    /// A required key is missing or null.
    #[error("config key `{0}` is required")]
    Missing(String),
}

/// A configuration tree.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    root: Value,
}

fn short(v: &Value) -> String {
    let s = serde_yaml_ng::to_string(v).unwrap_or_default();
    let s = s.trim();
    if s.len() > 60 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(60).map_or(s.len(), |c| c.0)]
        )
    } else {
        s.to_string()
    }
}

/// Parses an override value.
fn parse_value(arg: &str, text: &str) -> Result<Value, Error> {
    if text == "None" {
        return Ok(Value::Null);
    }
    serde_yaml_ng::from_str(text).map_err(|source| Error::Yaml {
        what: format!("override {arg:?}"),
        source,
    })
}

/// Every dotted key of a tree (for "did you mean").
fn all_keys(v: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Mapping(m) = v {
        for (k, child) in m {
            let Some(k) = k.as_str() else { continue };
            let key = if prefix.is_empty() {
                k.to_string()
            } else {
                format!("{prefix}.{k}")
            };
            all_keys(child, &key, out);
            out.push(key);
        }
    }
}

/// Edit distance, for suggestions.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

impl RunConfig {
    /// Parses a YAML document.
    pub fn from_yaml(what: &str, text: &str) -> Result<RunConfig, Error> {
        let root: Value = serde_yaml_ng::from_str(text).map_err(|source| Error::Yaml {
            what: what.to_string(),
            source,
        })?;
        if !root.is_mapping() {
            return Err(Error::WrongType {
                key: "(root)".into(),
                expected: "a mapping",
                found: short(&root),
            });
        }
        Ok(RunConfig { root })
    }

    /// The built-in `distill` default.
    pub fn distill_default() -> RunConfig {
        RunConfig::from_yaml("conf/distill.yaml", DISTILL_DEFAULT)
            .expect("the built-in config is valid YAML")
    }

    /// Applies overrides in order.
    pub fn apply(&mut self, args: &[String]) -> Result<(), Error> {
        for a in args {
            self.apply_one(a)?;
        }
        Ok(())
    }

    fn apply_one(&mut self, arg: &str) -> Result<(), Error> {
        if let Some(key) = arg.strip_prefix('~') {
            let (parent, last) = self.parent_mut(arg, key, false)?;
            let removed = parent.remove(last);
            if removed.is_none() {
                return Err(self.unknown(arg, key));
            }
            return Ok(());
        }
        let (mode, rest) = if let Some(r) = arg.strip_prefix("++") {
            (2, r)
        } else if let Some(r) = arg.strip_prefix('+') {
            (1, r)
        } else {
            (0, arg)
        };
        let (key, text) = rest
            .split_once('=')
            .ok_or_else(|| Error::Syntax(arg.to_string()))?;
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(Error::Syntax(arg.to_string()));
        }
        let value = parse_value(arg, text)?;
        let exists = self.get(key).is_some();
        match (mode, exists) {
            (0, false) => return Err(self.unknown(arg, key)),
            (1, true) => {
                return Err(Error::Exists {
                    arg: arg.to_string(),
                    key: key.to_string(),
                })
            }
            _ => {}
        }
        let (parent, last) = self.parent_mut(arg, key, mode > 0)?;
        parent.insert(Value::String(last.to_string()), value);
        Ok(())
    }

    fn unknown(&self, arg: &str, key: &str) -> Error {
        let mut keys = Vec::new();
        all_keys(&self.root, "", &mut keys);
        let best = keys.iter().map(|k| (distance(k, key), k)).min();
        let hint = match best {
            Some((d, k)) if d <= 3 => format!("; did you mean `{k}`?"),
            _ => String::new(),
        };
        Error::UnknownKey {
            arg: arg.to_string(),
            key: key.to_string(),
            hint,
        }
    }

    /// The mapping holding `key`'s last segment (creating parents when `create`).
    fn parent_mut<'a, 'k>(
        &'a mut self,
        arg: &str,
        key: &'k str,
        create: bool,
    ) -> Result<(&'a mut Mapping, &'k str), Error> {
        let (path, last) = match key.rsplit_once('.') {
            Some((p, l)) => (Some(p), l),
            None => (None, key),
        };
        let mut cur = &mut self.root;
        let mut walked = String::new();
        for seg in path.into_iter().flat_map(|p| p.split('.')) {
            if !walked.is_empty() {
                walked.push('.');
            }
            walked.push_str(seg);
            let m = cur.as_mapping_mut().ok_or_else(|| Error::NotMapping {
                arg: arg.to_string(),
                key: walked.clone(),
            })?;
            let k = Value::String(seg.to_string());
            if !m.contains_key(&k) {
                if !create {
                    return Err(Error::UnknownKey {
                        arg: arg.to_string(),
                        key: walked.clone(),
                        hint: String::new(),
                    });
                }
                m.insert(k.clone(), Value::Mapping(Mapping::new()));
            }
            cur = m.get_mut(&k).ok_or_else(|| Error::NotMapping {
                arg: arg.to_string(),
                key: walked.clone(),
            })?;
        }
        let m = cur.as_mapping_mut().ok_or_else(|| Error::NotMapping {
            arg: arg.to_string(),
            key: walked.clone(),
        })?;
        Ok((m, last))
    }

    /// The value at a dotted key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        key.split('.')
            .try_fold(&self.root, |v, seg| v.as_mapping()?.get(seg))
    }

    /// The whole tree.
    pub fn root(&self) -> &Value {
        &self.root
    }

    /// YAML text of the tree.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(&self.root).unwrap_or_default()
    }

    fn typed<T>(
        &self,
        key: &str,
        expected: &'static str,
        f: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<T>, Error> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => f(v).map(Some).ok_or_else(|| Error::WrongType {
                key: key.to_string(),
                expected,
                found: short(v),
            }),
        }
    }

    /// A string (numbers are turned into text); `None` for absent or null.
    pub fn str(&self, key: &str) -> Result<Option<String>, Error> {
        self.typed(key, "a string", |v| match v {
            Value::String(s) if s == "None" => None,
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .map(|o| o.filter(|s| s != "None"))
    }

    /// A non-negative integer.
    pub fn u64(&self, key: &str) -> Result<Option<u64>, Error> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }

    /// A number.
    pub fn f64(&self, key: &str) -> Result<Option<f64>, Error> {
        self.typed(key, "a number", |v| {
            v.as_f64().or_else(|| v.as_str()?.parse().ok())
        })
    }

    /// A boolean.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, Error> {
        self.typed(key, "true or false", Value::as_bool)
    }

    /// A list of scalars as strings (`[1.0, prefix]`).
    pub fn list(&self, key: &str) -> Result<Option<Vec<String>>, Error> {
        self.typed(key, "a list", |v| {
            let seq = v.as_sequence()?;
            seq.iter()
                .map(|x| match x {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect()
        })
    }

    /// A required value.
    pub fn require<T>(key: &str, v: Option<T>) -> Result<T, Error> {
        v.ok_or_else(|| Error::Missing(key.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RunConfig {
        RunConfig::distill_default()
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn default_has_nemo_keys() {
        let c = cfg();
        assert_eq!(c.u64("model.micro_batch_size").unwrap(), Some(1));
        assert_eq!(c.f64("model.optim.lr").unwrap(), Some(1e-4));
        assert_eq!(
            c.str("model.data.splits_string").unwrap().as_deref(),
            Some("98,1,1")
        );
        assert_eq!(c.str("model.restore_from_path").unwrap(), None);
    }

    #[test]
    fn applies_the_documented_command_line() {
        let mut c = cfg();
        c.apply(&s(&[
            "model.restore_from_path=None",
            "model.kd_teacher_restore_from_path=/ckpt/teacher.nemo",
            "model.tensor_model_parallel_size=2",
            "model.data.data_prefix=[1.0,path/to/tokenized/data]",
            "model.nemo_path=final.nemo",
            "trainer.precision=bf16",
            "trainer.devices=2",
        ]))
        .unwrap();
        assert_eq!(c.str("model.restore_from_path").unwrap(), None);
        assert_eq!(c.u64("model.tensor_model_parallel_size").unwrap(), Some(2));
        assert_eq!(
            c.list("model.data.data_prefix").unwrap(),
            Some(vec![
                "1.0".to_string(),
                "path/to/tokenized/data".to_string()
            ])
        );
        assert_eq!(c.str("trainer.precision").unwrap().as_deref(), Some("bf16"));
    }

    #[test]
    fn plus_forms_and_deletion() {
        let mut c = cfg();
        c.apply(&s(&["++model.new.deep=3", "+model.other=x", "~model.kd"]))
            .unwrap();
        assert_eq!(c.u64("model.new.deep").unwrap(), Some(3));
        assert_eq!(c.str("model.other").unwrap().as_deref(), Some("x"));
        assert!(c.get("model.kd").is_none());
        let e = c.apply(&s(&["+model.other=y"])).unwrap_err();
        assert!(matches!(e, Error::Exists { .. }), "{e}");
    }

    #[test]
    fn unknown_keys_are_errors_with_a_hint() {
        let mut c = cfg();
        let e = c
            .apply(&s(&["model.micro_batch_sise=2"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not in the config") && e.contains("model.micro_batch_size"),
            "{e}"
        );
        assert!(matches!(c.apply(&s(&["nonsense"])), Err(Error::Syntax(_))));
        assert!(matches!(
            c.apply(&s(&["model..x=1"])),
            Err(Error::Syntax(_))
        ));
        assert!(matches!(
            c.apply(&s(&["~model.nope"])),
            Err(Error::UnknownKey { .. })
        ));
        assert!(matches!(
            c.apply(&s(&["++model.optim.lr.x=1"])),
            Err(Error::NotMapping { .. })
        ));
    }

    #[test]
    fn bad_values_are_typed_errors() {
        let mut c = cfg();
        c.apply(&s(&["model.micro_batch_size=two"])).unwrap();
        let e = c.u64("model.micro_batch_size").unwrap_err().to_string();
        assert!(
            e.contains("model.micro_batch_size") && e.contains("integer"),
            "{e}"
        );
        assert!(matches!(
            c.apply(&s(&["model.data.data_prefix=[1,"])),
            Err(Error::Yaml { .. })
        ));
    }
}
