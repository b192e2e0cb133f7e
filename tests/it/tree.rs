//! The source tree shows the data path (docs/architecture.md): `io` -> `formats` -> `model`
//! -> `ops`/`testkit` -> `distill` -> `cli`, each layer importing only from layers before it,
//! and no two modules importing each other (directly or around a loop). Read from the
//! `use crate::…` / `super::…` paths of non-test code; a child module naming its parent is
//! the normal Rust shape and not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `module path -> file` for every `.rs` under `src/` (`a/mod.rs` is `a`).
fn modules() -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap_or_else(|e| panic!("{e}")).path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let src = root().join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files
        .into_iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(&src).ok()?.with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            Some((parts.join("::"), p))
        })
        .collect()
}

/// The code of a file without comments and without its test modules.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{e}"));
    let text = match text.find("#[cfg(test)]\nmod ") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module a path names: the longest prefix that is a module.
fn resolve(path: &[&str], me: &str, mods: &BTreeMap<String, PathBuf>) -> Option<String> {
    let mut segs: Vec<&str> = match path.first() {
        Some(&"crate") => path[1..].to_vec(),
        Some(&"super") => {
            let mut base: Vec<&str> = me.split("::").collect();
            let mut rest = path;
            while rest.first() == Some(&"super") {
                base.pop();
                rest = &rest[1..];
            }
            base.extend_from_slice(rest);
            base
        }
        _ => return None,
    };
    while !segs.is_empty() {
        let m = segs.join("::");
        if mods.contains_key(&m) {
            return Some(m);
        }
        segs.pop();
    }
    None
}

/// Every `crate::a::b` / `super::a` path in `code`, braces of `use` lists expanded one level.
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let starts = |w: &str| bytes[i..].iter().take(w.len()).copied().eq(w.chars());
        let word_start = i == 0 || !is_ident(bytes[i - 1]);
        if word_start && (starts("crate::") || starts("super::")) {
            let mut j = i;
            while j < bytes.len() && (is_ident(bytes[j]) || bytes[j] == ':') {
                j += 1;
            }
            let head: String = bytes[i..j].iter().collect();
            let head = head.trim_end_matches(':').to_string();
            let segs: Vec<String> = head.split("::").map(str::to_string).collect();
            if bytes.get(j) == Some(&'{') {
                let end = bytes[j..]
                    .iter()
                    .position(|&c| c == '}')
                    .map_or(bytes.len(), |k| j + k);
                let inner: String = bytes[j + 1..end].iter().collect();
                for item in inner.split(',') {
                    let name = item.trim().split([' ', ':', '{']).next().unwrap_or("");
                    if !name.is_empty() && name != "self" {
                        let mut s = segs.clone();
                        s.push(name.to_string());
                        out.push(s);
                    }
                }
            }
            out.push(segs);
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, file) in &mods {
        let e = edges.entry(m.clone()).or_default();
        for p in paths(&code(file)) {
            let p: Vec<&str> = p.iter().map(String::as_str).collect();
            if let Some(t) = resolve(&p, m, &mods) {
                let ancestor = m.starts_with(&format!("{t}::")) || t.is_empty();
                if t != *m && !ancestor {
                    e.insert(t);
                }
            }
        }
    }
    edges
}

/// Strongly connected components of more than one module.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    // reachability by DFS per node: small graph (~100 modules)
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_string()];
        while let Some(v) = stack.pop() {
            for w in edges.get(&v).into_iter().flatten() {
                if seen.insert(w.clone()) {
                    stack.push(w.clone());
                }
            }
        }
        seen
    };
    let all: BTreeMap<&String, BTreeSet<String>> = edges.keys().map(|k| (k, reach(k))).collect();
    let mut out: Vec<BTreeSet<String>> = Vec::new();
    for (v, r) in &all {
        if !r.contains(*v) {
            continue;
        }
        let comp: BTreeSet<String> = r
            .iter()
            .filter(|w| all.get(w).is_some_and(|rw| rw.contains(*v)))
            .cloned()
            .collect();
        if comp.len() > 1 && !out.contains(&comp) {
            out.push(comp);
        }
    }
    out
}

#[test]
fn layers_import_only_from_the_layers_before_them() {
    let layer = |m: &str| match m.split("::").next() {
        Some("io") => Some(0),
        Some("formats") => Some(1),
        Some("model") => Some(2),
        Some("ops" | "testkit") => Some(3),
        Some("distill") => Some(4),
        Some("cli") => Some(5),
        _ => None,
    };
    let edges = edges();
    assert!(edges.len() > 60, "found only {} modules", edges.len());
    let mut upward = Vec::new();
    for (m, ts) in &edges {
        for t in ts {
            if let (Some(a), Some(b)) = (layer(m), layer(t)) {
                if b > a {
                    upward.push(format!("{m} -> {t}"));
                }
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports against the data path: {upward:#?}"
    );
}

#[test]
fn no_import_circles() {
    let found = cycles(&edges());
    // One recursive data type in two files: a Value holds tensors, a legacy tensor's state
    // is a Value.
    let allowed: BTreeSet<String> = ["formats::torch::tensor", "formats::torch::value"]
        .map(String::from)
        .into();
    let bad: Vec<_> = found.into_iter().filter(|c| *c != allowed).collect();
    assert!(bad.is_empty(), "modules that import each other: {bad:#?}");
}

#[test]
fn the_checker_sees_a_circle() {
    // a loop a -> b -> c -> a and a pair d <-> e, plus a DAG edge
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (a, b) in [
        ("a", "b"),
        ("b", "c"),
        ("c", "a"),
        ("d", "e"),
        ("e", "d"),
        ("c", "f"),
    ] {
        g.entry(a.into()).or_default().insert(b.into());
        g.entry(b.into()).or_default();
    }
    let found = cycles(&g);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found.iter().any(|c| c.len() == 3 && c.contains("a")));
    // and the parser finds the paths of a use list
    let p = paths("use crate::formats::{dist::Chunk, torch};\nlet x = super::model::f();");
    assert!(p.contains(&vec!["crate".into(), "formats".into(), "dist".into()]));
    assert!(p.contains(&vec!["super".into(), "model".into(), "f".into()]));
}
