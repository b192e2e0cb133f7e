//! Which of the four weight layouts an archive uses, from its member names
//! alone (NeMo's restore order, nemo-format.md §1.4): `model_weights/` (a
//! distributed checkpoint), `tp_rank_XX_pp_rank_YYY/`, `mp_rank_XX/`, then a
//! single `model_weights.ckpt`.

use std::collections::BTreeSet;

use serde::Serialize;

/// The weight layout variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Variant {
    /// A: one `model_weights.ckpt` (TP=1, PP=1).
    #[serde(rename = "model_weights.ckpt")]
    SingleFile,
    /// B: `mp_rank_XX/model_weights.ckpt` (TP>1, PP=1).
    #[serde(rename = "mp_rank_XX")]
    TpShards,
    /// C: `tp_rank_XX_pp_rank_YYY/model_weights.ckpt` (PP>1).
    #[serde(rename = "tp_rank_XX_pp_rank_YYY")]
    TpPpShards,
    /// D: `model_weights/` distributed checkpoint (torch_dist or zarr).
    #[serde(rename = "model_weights/")]
    Distributed,
}

impl Variant {
    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Variant::SingleFile => "model_weights.ckpt",
            Variant::TpShards => "mp_rank_XX",
            Variant::TpPpShards => "tp_rank_XX_pp_rank_YYY",
            Variant::Distributed => "model_weights/",
        }
    }

    /// The member name of rank (`tp`, `pp`)'s weights file in this variant.
    pub fn rank_member(self, tp: u64, pp: u64) -> String {
        match self {
            Variant::SingleFile | Variant::Distributed => WEIGHTS_FILE.to_string(),
            Variant::TpShards => format!("mp_rank_{tp:02}/{WEIGHTS_FILE}"),
            Variant::TpPpShards => format!("tp_rank_{tp:02}_pp_rank_{pp:03}/{WEIGHTS_FILE}"),
        }
    }

    /// The per-rank variant NeMo writes for a given TP/PP.
    pub fn for_sizes(tp: u64, pp: u64) -> Variant {
        match (tp, pp) {
            (1, 1) => Variant::SingleFile,
            (_, 1) => Variant::TpShards,
            _ => Variant::TpPpShards,
        }
    }
}

/// The weights file name inside each rank folder.
pub const WEIGHTS_FILE: &str = "model_weights.ckpt";
/// The distributed checkpoint folder.
pub const DIST_DIR: &str = "model_weights";

/// A detected layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// The variant.
    pub variant: Variant,
    /// Tensor-parallel size on disk.
    pub tp: u64,
    /// Pipeline-parallel size on disk.
    pub pp: u64,
    /// `(tp, pp, member)` for each rank file, sorted by (pp, tp); empty for `Distributed`.
    pub ranks: Vec<(u64, u64, String)>,
    /// The distributed checkpoint folder (`model_weights`, or `""` when the
    /// path opened is itself such a folder); empty for per-rank layouts.
    pub dist_dir: String,
}

/// Layout detection errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No weights at all.
    #[error("no model weights found (expected model_weights/, tp_rank_XX_pp_rank_YYY/, mp_rank_XX/ or model_weights.ckpt)")]
    NoWeights,
    /// A rank folder is missing from the TP x PP grid.
    #[error("incomplete rank grid: {missing} is missing (found TP={tp}, PP={pp})")]
    MissingRank {
        /// The missing member.
        missing: String,
        /// TP size implied by the folders present.
        tp: u64,
        /// PP size implied by the folders present.
        pp: u64,
    },
}

fn parse_num(s: &str, digits: usize) -> Option<u64> {
    (s.len() == digits && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Detects the layout from regular-file member names (without `./`).
pub fn detect(names: &[String]) -> Result<Detected, Error> {
    let has = |n: &str| names.iter().any(|m| m == n);
    if has(&format!("{DIST_DIR}/metadata.json")) {
        return Ok(Detected {
            variant: Variant::Distributed,
            tp: 1,
            pp: 1,
            ranks: vec![],
            dist_dir: DIST_DIR.into(),
        });
    }
    // A bare distributed checkpoint folder (what `model_weights/` holds).
    if has("metadata.json") && (has(".metadata") || names.iter().any(|n| n.ends_with("/.zarray"))) {
        return Ok(Detected {
            variant: Variant::Distributed,
            tp: 1,
            pp: 1,
            ranks: vec![],
            dist_dir: String::new(),
        });
    }
    let mut tp_pp = BTreeSet::new();
    let mut mp = BTreeSet::new();
    for n in names {
        let Some(dir) = n.strip_suffix(&format!("/{WEIGHTS_FILE}")) else {
            continue;
        };
        if let Some(rest) = dir.strip_prefix("tp_rank_") {
            if let Some((t, p)) = rest.split_once("_pp_rank_") {
                if let (Some(t), Some(p)) = (parse_num(t, 2), parse_num(p, 3)) {
                    tp_pp.insert((t, p));
                }
            }
        } else if let Some(t) = dir.strip_prefix("mp_rank_").and_then(|t| parse_num(t, 2)) {
            mp.insert(t);
        }
    }
    let (variant, cells): (Variant, Vec<(u64, u64)>) = if !tp_pp.is_empty() {
        (Variant::TpPpShards, tp_pp.into_iter().collect())
    } else if !mp.is_empty() {
        (Variant::TpShards, mp.into_iter().map(|t| (t, 0)).collect())
    } else if has(WEIGHTS_FILE) {
        return Ok(Detected {
            variant: Variant::SingleFile,
            tp: 1,
            pp: 1,
            ranks: vec![(0, 0, WEIGHTS_FILE.to_string())],
            dist_dir: String::new(),
        });
    } else {
        return Err(Error::NoWeights);
    };
    let tp = cells.iter().map(|c| c.0).max().unwrap_or(0) + 1;
    let pp = cells.iter().map(|c| c.1).max().unwrap_or(0) + 1;
    let mut ranks = Vec::new();
    for p in 0..pp {
        for t in 0..tp {
            let member = variant.rank_member(t, p);
            if !cells.contains(&(t, p)) {
                return Err(Error::MissingRank {
                    missing: member,
                    tp,
                    pp,
                });
            }
            ranks.push((t, p, member));
        }
    }
    Ok(Detected {
        variant,
        tp,
        pp,
        ranks,
        dist_dir: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn detects_each_variant() {
        let d = detect(&names(&["model_config.yaml", "model_weights.ckpt"])).unwrap();
        assert_eq!((d.variant, d.tp, d.pp), (Variant::SingleFile, 1, 1));
        let d = detect(&names(&[
            "mp_rank_01/model_weights.ckpt",
            "mp_rank_00/model_weights.ckpt",
        ]))
        .unwrap();
        assert_eq!((d.variant, d.tp, d.pp), (Variant::TpShards, 2, 1));
        assert_eq!(
            d.ranks[1],
            (1, 0, "mp_rank_01/model_weights.ckpt".to_string())
        );
        let grid: Vec<String> = (0..2)
            .flat_map(|t| {
                (0..3).map(move |p| format!("tp_rank_{t:02}_pp_rank_{p:03}/model_weights.ckpt"))
            })
            .collect();
        let d = detect(&grid).unwrap();
        assert_eq!((d.variant, d.tp, d.pp), (Variant::TpPpShards, 2, 3));
        assert_eq!(d.ranks[2].2, "tp_rank_00_pp_rank_001/model_weights.ckpt");
        let d = detect(&names(&[
            "model_weights/metadata.json",
            "model_weights/.metadata",
        ]))
        .unwrap();
        assert_eq!(
            (d.variant, d.dist_dir.as_str()),
            (Variant::Distributed, "model_weights")
        );
        let d = detect(&names(&["metadata.json", ".metadata", "__0_0.distcp"])).unwrap();
        assert_eq!((d.variant, d.dist_dir.as_str()), (Variant::Distributed, ""));
    }

    #[test]
    fn refuses_gaps_and_absence() {
        assert_eq!(
            detect(&names(&["model_config.yaml"])),
            Err(Error::NoWeights)
        );
        let err = detect(&names(&[
            "mp_rank_00/model_weights.ckpt",
            "mp_rank_02/model_weights.ckpt",
        ]))
        .unwrap_err();
        assert!(
            err.to_string().contains("mp_rank_01/model_weights.ckpt"),
            "{err}"
        );
    }

    #[test]
    fn variant_for_sizes() {
        assert_eq!(Variant::for_sizes(1, 1), Variant::SingleFile);
        assert_eq!(Variant::for_sizes(4, 1), Variant::TpShards);
        assert_eq!(Variant::for_sizes(1, 2), Variant::TpPpShards);
    }
}
