//! From indexed datasets to training samples, the way Megatron does it
//! (nemo-format.md §5.4): weighted blends of dataset prefixes, the
//! `splits_string` train/validation/test document split, GPT samples of
//! `seq_length + 1` tokens cut from a shuffled stream of documents, and the
//! greedy blending index that interleaves datasets by weight.
//!
//! Shuffling is deterministic from the seed (SplitMix64 + Fisher-Yates); it
//! is ours, not a bit-for-bit copy of Megatron's numpy shuffles (which also
//! depend on its cache layout), so the same seed gives the same samples on
//! every run and at every TP size.

use std::sync::Arc;

use crate::formats::indexed::IndexedDataset;

/// Errors building samples.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The blend list is malformed.
    #[error("data prefix: {0}")]
    BadBlend(String),
    /// `splits_string` is malformed.
    #[error("splits_string {0:?}: expected up to three non-negative numbers like \"98,1,1\"")]
    BadSplits(String),
    /// A split has no tokens to sample from.
    #[error("{prefix}: the {split} split has no tokens (documents {start}..{end} of {total})")]
    EmptySplit {
        /// Dataset prefix.
        prefix: String,
        /// Split name.
        split: &'static str,
        /// First document.
        start: usize,
        /// End document.
        end: usize,
        /// Documents in the dataset.
        total: usize,
    },
    /// A dataset could not be opened.
    #[error(transparent)]
    Dataset(#[from] crate::formats::indexed::Error),
}

/// A normalised weighted list of dataset prefixes.
#[derive(Debug, Clone, PartialEq)]
pub struct Blend {
    /// (weight, prefix); weights sum to 1.
    pub entries: Vec<(f64, String)>,
}

impl Blend {
    /// Parses `data_prefix` as NeMo does: `[w1, p1, w2, p2, …]` when the list
    /// has even length and every other item is a number, else a list of
    /// prefixes with equal weights. Prefixes are trimmed.
    pub fn parse(items: &[String]) -> Result<Blend, Error> {
        if items.is_empty() {
            return Err(Error::BadBlend("empty list".into()));
        }
        let weighted: Option<Vec<(f64, String)>> = if items.len() % 2 == 0 {
            items
                .chunks(2)
                .map(|c| Some((c[0].trim().parse::<f64>().ok()?, c[1].trim().to_string())))
                .collect()
        } else {
            None
        };
        let entries =
            weighted.unwrap_or_else(|| items.iter().map(|p| (1.0, p.trim().to_string())).collect());
        if entries
            .iter()
            .any(|(w, p)| !w.is_finite() || *w < 0.0 || p.is_empty())
        {
            return Err(Error::BadBlend(format!(
                "weights must be non-negative numbers and prefixes non-empty: {items:?}"
            )));
        }
        let total: f64 = entries.iter().map(|e| e.0).sum();
        if total <= 0.0 {
            return Err(Error::BadBlend("weights sum to zero".into()));
        }
        Ok(Blend {
            entries: entries.into_iter().map(|(w, p)| (w / total, p)).collect(),
        })
    }
}

/// Which split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Training.
    Train,
    /// Validation.
    Validation,
    /// Test.
    Test,
}

impl Split {
    /// 0 train, 1 validation, 2 test.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Parses `train`, `validation` (or `val`), `test`.
    pub fn parse(s: &str) -> Option<Split> {
        match s {
            "train" => Some(Split::Train),
            "validation" | "val" => Some(Split::Validation),
            "test" => Some(Split::Test),
            _ => None,
        }
    }

    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

/// Document ranges of the three splits for `n` documents (`"98,1,1"` style:
/// numbers padded to three and normalised; boundaries rounded as Megatron does).
pub fn split_ranges(splits: &str, n: usize) -> Result<[(usize, usize); 3], Error> {
    let bad = || Error::BadSplits(splits.to_string());
    let mut v: Vec<f64> = splits
        .split([',', '/'])
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse::<f64>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if v.len() > 3 || v.iter().any(|x| !x.is_finite() || *x < 0.0) {
        return Err(bad());
    }
    v.resize(3, 0.0);
    let total: f64 = v.iter().sum();
    if total <= 0.0 {
        return Err(bad());
    }
    let mut bounds = [0usize; 4];
    let mut acc = 0.0;
    for i in 0..3 {
        acc += v[i] / total;
        bounds[i + 1] = ((acc * n as f64).round() as usize).min(n);
    }
    bounds[3] = n;
    Ok([
        (bounds[0], bounds[1]),
        (bounds[1], bounds[2]),
        (bounds[2], bounds[3]),
    ])
}

/// Megatron's greedy blending: sample `i` goes to the dataset maximising
/// `w_d * max(i, 1) - count_d` (ties to the lowest index). Returns, per
/// sample, (dataset, index within that dataset).
pub fn blending_index(weights: &[f64], size: usize) -> Vec<(usize, u64)> {
    let mut counts = vec![0u64; weights.len()];
    let mut out = Vec::with_capacity(size);
    for i in 0..size {
        let x = i.max(1) as f64;
        let mut best = 0;
        let mut best_err = f64::NEG_INFINITY;
        for (d, w) in weights.iter().enumerate() {
            let err = w * x - counts[d] as f64;
            if err > best_err {
                best_err = err;
                best = d;
            }
        }
        out.push((best, counts[best]));
        counts[best] += 1;
    }
    out
}

/// SplitMix64: small, fast, and fully determined by the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// GPT samples of one dataset split: `seq_length + 1` token windows (each
/// overlapping the next by one token) over documents shuffled per epoch,
/// then shuffled themselves.
#[derive(Debug, Clone)]
pub struct GptSamples {
    dataset: Arc<IndexedDataset>,
    seq_length: usize,
    /// Document order over all epochs.
    docs: Vec<u32>,
    /// Start of each sample: (position in `docs`, token offset in that document).
    starts: Vec<(usize, usize)>,
    /// Sample order.
    order: Vec<u32>,
}

impl GptSamples {
    /// At least `num_samples` samples from documents `range` of `dataset`.
    pub fn new(
        dataset: Arc<IndexedDataset>,
        split: Split,
        range: (usize, usize),
        seq_length: usize,
        num_samples: usize,
        seed: u64,
    ) -> Result<GptSamples, Error> {
        let lengths = dataset.lengths();
        let ids: Vec<u32> = (range.0..range.1).map(|d| d as u32).collect();
        let tokens: u64 = ids.iter().map(|&d| u64::from(lengths[d as usize])).sum();
        if tokens < 2 || seq_length == 0 {
            return Err(Error::EmptySplit {
                prefix: dataset.prefix().display().to_string(),
                split: split.name(),
                start: range.0,
                end: range.1,
                total: dataset.len(),
            });
        }
        let mut rng = Rng(seed ^ (split.index() as u64).wrapping_mul(0xa076_1d64_78bd_642f));
        let (mut docs, mut starts) = (Vec::new(), Vec::new());
        // The token stream over epochs; a sample starts every `seq_length`
        // tokens and needs `seq_length + 1` tokens available.
        let (mut stream_len, mut next_start) = (0u64, 0u64);
        let mut doc_starts: Vec<u64> = Vec::new();
        while starts.len() < num_samples.max(1) {
            let mut epoch = ids.clone();
            rng.shuffle(&mut epoch);
            for d in epoch {
                doc_starts.push(stream_len);
                docs.push(d);
                stream_len += u64::from(lengths[d as usize]);
            }
            while next_start + (seq_length as u64) < stream_len && starts.len() < num_samples.max(1)
            {
                let pos = doc_starts.partition_point(|&s| s <= next_start) - 1;
                starts.push((pos, (next_start - doc_starts[pos]) as usize));
                next_start += seq_length as u64;
            }
        }
        let mut order: Vec<u32> = (0..starts.len() as u32).collect();
        rng.shuffle(&mut order);
        Ok(GptSamples {
            dataset,
            seq_length,
            docs,
            starts,
            order,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Where sample `i` (modulo the length) starts: its document's position in the shuffled
    /// multi-epoch document stream (which names the epoch too: a window that starts at the
    /// same document and offset in another epoch runs on into another next document), and the
    /// token offset in that document. The same for any `num_samples` that includes the window,
    /// and for any run layout: what a teacher cache keys its records by.
    pub fn start(&self, i: usize) -> (u64, u32) {
        let k = self.order[i % self.order.len()] as usize;
        let (pos, off) = self.starts[k];
        (pos as u64, u32::try_from(off).unwrap_or(u32::MAX))
    }

    /// Sample `i` (modulo the length): `seq_length + 1` tokens.
    pub fn get(&self, i: usize) -> Vec<i64> {
        let k = self.order[i % self.order.len()] as usize;
        let (mut pos, mut off) = self.starts[k];
        let mut out = Vec::with_capacity(self.seq_length + 1);
        while out.len() < self.seq_length + 1 && pos < self.docs.len() {
            let d = self.docs[pos] as usize;
            let want = self.seq_length + 1 - out.len();
            out.extend(self.dataset.tokens(d, off, want));
            pos += 1;
            off = 0;
        }
        out
    }
}

/// Samples drawn from a weighted blend of datasets.
#[derive(Debug, Clone)]
pub struct BlendedSamples {
    parts: Vec<GptSamples>,
    index: Vec<(usize, u64)>,
}

impl BlendedSamples {
    /// `num_samples` samples of `split` from `blend`, each dataset split by
    /// `splits` (e.g. `"98,1,1"`). Per-dataset budgets get Megatron's 0.5%
    /// surplus so the blending index never runs a dataset dry.
    pub fn new(
        blend: &Blend,
        splits: &str,
        split: Split,
        seq_length: usize,
        num_samples: usize,
        seed: u64,
    ) -> Result<BlendedSamples, Error> {
        let mut parts = Vec::new();
        for (w, prefix) in &blend.entries {
            let ds = Arc::new(IndexedDataset::open(prefix)?);
            let range = split_ranges(splits, ds.len())?[split.index()];
            let budget = ((num_samples as f64 * w * 1.005).ceil() as usize).max(1);
            parts.push(GptSamples::new(ds, split, range, seq_length, budget, seed)?);
        }
        let weights: Vec<f64> = blend.entries.iter().map(|e| e.0).collect();
        Ok(BlendedSamples {
            parts,
            index: blending_index(&weights, num_samples),
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Where sample `i` starts: (dataset index in the blend, [`GptSamples::start`]).
    pub fn start(&self, i: usize) -> (usize, (u64, u32)) {
        let (d, j) = self.index[i % self.index.len()];
        (d, self.parts[d].start(j as usize))
    }

    /// Every dataset's samples (the windows a teacher cache holds: all of them, so that a run
    /// drawing fewer samples, in any order, finds each of its own).
    pub fn parts(&self) -> &[GptSamples] {
        &self.parts
    }

    /// Sample `i`: (dataset index in the blend, `seq_length + 1` tokens).
    pub fn get(&self, i: usize) -> (usize, Vec<i64>) {
        let (d, j) = self.index[i % self.index.len()];
        (d, self.parts[d].get(j as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::indexed::{Builder, TokenType};

    #[test]
    fn parses_blends_like_nemo() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let b = Blend::parse(&s(&["0.3", " a ", "0.7", "b"])).unwrap();
        assert_eq!(
            b.entries,
            vec![(0.3, "a".to_string()), (0.7, "b".to_string())]
        );
        let b = Blend::parse(&s(&["a", "b"])).unwrap();
        assert_eq!(
            b.entries,
            vec![(0.5, "a".to_string()), (0.5, "b".to_string())]
        );
        let b = Blend::parse(&s(&["1.0", "only"])).unwrap();
        assert_eq!(b.entries, vec![(1.0, "only".to_string())]);
        assert!(Blend::parse(&[]).is_err());
        assert!(Blend::parse(&s(&["-1", "a"])).is_err());
    }

    #[test]
    fn splits_round_like_megatron() {
        assert_eq!(
            split_ranges("98,1,1", 1000).unwrap(),
            [(0, 980), (980, 990), (990, 1000)]
        );
        assert_eq!(
            split_ranges("1", 10).unwrap(),
            [(0, 10), (10, 10), (10, 10)]
        );
        assert!(split_ranges("a,b", 10).is_err());
        assert!(split_ranges("0,0,0", 10).is_err());
    }

    #[test]
    fn blending_matches_the_worked_example() {
        // nemo-format.md §5.4: weights [0.3, 0.7], 10 samples.
        let idx = blending_index(&[0.3, 0.7], 10);
        let ds: Vec<usize> = idx.iter().map(|x| x.0).collect();
        let ids: Vec<u64> = idx.iter().map(|x| x.1).collect();
        assert_eq!(ds, vec![1, 0, 1, 1, 0, 1, 1, 0, 1, 1]);
        assert_eq!(ids, vec![0, 0, 1, 2, 1, 3, 4, 2, 5, 6]);
    }

    #[test]
    fn blend_proportions_hold_over_10k_samples() {
        let w = [0.2, 0.5, 0.3];
        let idx = blending_index(&w, 10_000);
        for (d, wd) in w.iter().enumerate() {
            let share = idx.iter().filter(|x| x.0 == d).count() as f64 / 10_000.0;
            assert!((share - wd).abs() < 0.01, "dataset {d}: {share} vs {wd}");
        }
    }

    fn dataset(dir: &std::path::Path, name: &str, docs: usize, base: i64) -> std::path::PathBuf {
        let p = dir.join(name);
        let mut b = Builder::create(&p, TokenType::U16, false).unwrap();
        for d in 0..docs {
            let toks: Vec<i64> = (0..(5 + d as i64 % 7))
                .map(|t| base + d as i64 * 10 + t)
                .collect();
            b.add_document(&toks).unwrap();
        }
        b.finish().unwrap();
        p
    }

    #[test]
    fn samples_are_windows_of_the_shuffled_stream() {
        let dir = tempfile::tempdir().unwrap();
        let p = dataset(dir.path(), "a", 20, 0);
        let ds = Arc::new(IndexedDataset::open(&p).unwrap());
        let s = GptSamples::new(ds.clone(), Split::Train, (0, 20), 8, 30, 1234).unwrap();
        assert_eq!(s.len(), 30);
        for i in 0..s.len() {
            assert_eq!(s.get(i).len(), 9);
        }
        // Deterministic from the seed, different for another seed.
        let again = GptSamples::new(ds.clone(), Split::Train, (0, 20), 8, 30, 1234).unwrap();
        assert!((0..30).all(|i| s.get(i) == again.get(i)));
        let other = GptSamples::new(ds.clone(), Split::Train, (0, 20), 8, 30, 99).unwrap();
        assert!((0..30).any(|i| s.get(i) != other.get(i)));
        // Consecutive windows overlap by exactly one token.
        let k0 = s.starts[0];
        let k1 = s.starts[1];
        assert!(k1 != k0);
        // A window's start names it: the same start gives the same tokens, also in a longer
        // sample list (whose shuffled order differs), and no two samples share one.
        let longer = GptSamples::new(ds.clone(), Split::Train, (0, 20), 8, 60, 1234).unwrap();
        let by_start: std::collections::HashMap<(u64, u32), Vec<i64>> =
            (0..60).map(|i| (longer.start(i), longer.get(i))).collect();
        assert_eq!(by_start.len(), 60);
        assert!((0..30).all(|i| by_start.get(&s.start(i)) == Some(&s.get(i))));
        // Every token comes from the split's documents.
        let all: std::collections::HashSet<i64> = (0..20).flat_map(|d| ds.sequence(d)).collect();
        assert!((0..30).flat_map(|i| s.get(i)).all(|t| all.contains(&t)));
    }

    #[test]
    fn empty_splits_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dataset(dir.path(), "a", 3, 0);
        let ds = Arc::new(IndexedDataset::open(&p).unwrap());
        let e = GptSamples::new(ds, Split::Test, (3, 3), 8, 5, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("test split has no tokens"), "{e}");
    }

    #[test]
    fn blended_samples_follow_weights() {
        let dir = tempfile::tempdir().unwrap();
        let a = dataset(dir.path(), "a", 50, 0);
        let b = dataset(dir.path(), "b", 50, 1000);
        let blend = Blend::parse(&[
            "0.25".into(),
            a.display().to_string(),
            "0.75".into(),
            b.display().to_string(),
        ])
        .unwrap();
        let s = BlendedSamples::new(&blend, "98,1,1", Split::Train, 4, 400, 7).unwrap();
        let from_b = (0..400).filter(|&i| s.get(i).0 == 1).count();
        assert!((from_b as f64 / 400.0 - 0.75).abs() < 0.01);
        // Tokens of dataset b are >= 1000: samples really come from their dataset.
        assert!((0..400).all(|i| {
            let (d, t) = s.get(i);
            t.iter().all(|&x| (x >= 1000) == (d == 1))
        }));
    }
}
