//! The offline teacher cache on the distillation side (its file format is
//! [`crate::formats::kd_cache`]): what a cache is made for (its `source`: tokenizer, padded
//! vocabulary, datasets by content, split, sequence length, seed), writing one from a teacher
//! over dataset splits (`nemo-tool eval --teacher-cache`), and the teacher's top-k logits of a
//! run's micro-batch read back from it (`distill model.kd.teacher_cache=DIR`).
//!
//! Records are addressed by where their window starts in its dataset, so a cache written once
//! serves a run at any TP, PP, DP and micro-batch size.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use super::loss::{self, global_topk, TopK};
use super::model::{self, Gpt};
use super::parallel::{self, ReduceOp};
use super::sampling::{self, Blend, BlendedSamples, Split};
use crate::formats::kd_cache::{self, Key, Manifest, Reader, ValueType, Writer};
use crate::model::checkpoint::Checkpoint;

/// Errors of the teacher cache.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cache files.
    #[error(transparent)]
    Cache(#[from] kd_cache::Error),
    /// The dataset.
    #[error(transparent)]
    Data(#[from] sampling::Error),
    /// The teacher's forward.
    #[error(transparent)]
    Model(#[from] model::Error),
    /// The top-k selection.
    #[error(transparent)]
    Loss(#[from] loss::Error),
    /// A collective.
    #[error(transparent)]
    Parallel(#[from] parallel::Error),
    /// Reading a dataset or tokenizer file.
    #[error("{path}: {why}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A cache that does not serve this run.
    #[error("teacher cache {dir}: {why}")]
    Unusable {
        /// The cache.
        dir: PathBuf,
        /// Why.
        why: String,
    },
}

/// sha256 of a tokenizer: each of its files (`model`, `vocab_file`, `merge_file`; bytes from
/// `read` for `nemo:` members or paths it can open, the setting itself otherwise).
fn tokenizer_hash(fields: [(&str, Option<Vec<u8>>); 3]) -> String {
    let mut h = Sha256::new();
    for (name, bytes) in fields {
        h.update(name.as_bytes());
        match bytes {
            Some(b) => {
                h.update((b.len() as u64).to_le_bytes());
                h.update(&b);
            }
            None => h.update(b"null"),
        }
    }
    hex::encode(h.finalize())
}

/// The tokenizer fingerprint of a checkpoint's config (`model_file` replaces the
/// `tokenizer.model` file when given: `model.tokenizer.model` naming a file on disk).
pub fn tokenizer_fingerprint(ck: &Checkpoint, model_file: Option<&[u8]>) -> String {
    let t = ck.config.tokenizer();
    let read = |v: &Option<String>| -> Option<Vec<u8>> {
        let v = v.as_ref()?;
        match v.strip_prefix("nemo:") {
            Some(m) => ck
                .read_member(m)
                .ok()
                .map(|b| b.as_slice().to_vec())
                .or_else(|| Some(v.as_bytes().to_vec())),
            None => Some(v.as_bytes().to_vec()),
        }
    };
    tokenizer_hash([
        (
            "model",
            model_file.map(<[u8]>::to_vec).or_else(|| read(&t.model)),
        ),
        ("vocab_file", read(&t.vocab_file)),
        ("merge_file", read(&t.merge_file)),
    ])
}

/// A dataset by content: sha256 of its `.idx` (document sizes and offsets) and the `.bin`'s
/// length.
fn dataset_fingerprint(prefix: &str) -> Result<Value, Error> {
    let idx = PathBuf::from(format!("{prefix}.idx"));
    let bin = PathBuf::from(format!("{prefix}.bin"));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| Error::Io {
            path: p.clone(),
            why: e.to_string(),
        }
    };
    let bytes = std::fs::read(&idx).map_err(io(&idx))?;
    let len = std::fs::metadata(&bin).map_err(io(&bin))?.len();
    Ok(json!({
        "idx_sha256": hex::encode(Sha256::digest(&bytes)),
        "bin_bytes": len,
    }))
}

/// What a cache's records depend on: a run that differs in any of these cannot use it.
///
/// # Errors
/// A dataset's files cannot be read.
pub fn source(
    blend: &Blend,
    splits: &str,
    seq_length: usize,
    seed: u64,
    padded_vocab: u64,
    tokenizer: &str,
) -> Result<Value, Error> {
    let datasets = blend
        .entries
        .iter()
        .map(|(_, p)| dataset_fingerprint(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(json!({
        "tokenizer": tokenizer,
        "padded_vocab": padded_vocab,
        "datasets": datasets,
        "splits_string": splits,
        "seq_length": seq_length,
        "seed": seed,
    }))
}

/// The key of window `j` of dataset `d` of `split`.
fn key(split: Split, d: usize, (document, offset): (u64, u32)) -> Key {
    Key {
        split: split.index() as u16,
        dataset: u16::try_from(d).unwrap_or(u16::MAX),
        document,
        offset,
    }
}

/// Options of [`write`].
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Entries per token.
    pub k: i64,
    /// Tokens per window (the samples' windows have one more, the last target).
    pub seq_length: usize,
    /// How values are stored.
    pub dtype: ValueType,
    /// Windows per forward pass.
    pub micro_batch: usize,
    /// Sequence positions whose logits are computed at once (0: all).
    pub chunk: usize,
    /// Records per shard file.
    pub per_shard: u64,
    /// Replace an existing cache.
    pub force: bool,
}

/// Writes the teacher cache of `model` for every window of every dataset of each split's
/// samples (`splits`: the samples a run of that many samples would draw, all their windows
/// cached) to `out`. Every rank calls it (the forward is collective); rank 0 writes.
/// `progress(done, total)` runs after each batch.
///
/// # Errors
/// Forward, collective and write errors.
pub fn write(
    out: &Path,
    model: &Gpt,
    splits: &[(Split, BlendedSamples)],
    source: Value,
    o: &WriteOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Option<Manifest>, Error> {
    let pg = model.group();
    let lead = pg.rank() == 0;
    let seq_length = o.seq_length;
    let mut writer = if lead {
        Some(Writer::create(
            out,
            u32::try_from(o.k).unwrap_or(0),
            seq_length as u32,
            o.dtype,
            source,
            o.per_shard,
            o.force,
        )?)
    } else {
        None
    };
    // (split, dataset, window) of everything to cache
    let todo: Vec<(Split, usize, usize)> = splits
        .iter()
        .flat_map(|(sp, s)| {
            s.parts()
                .iter()
                .enumerate()
                .flat_map(move |(d, p)| (0..p.len()).map(move |j| (*sp, d, j)))
        })
        .collect();
    let find = |sp: Split| splits.iter().find(|(x, _)| *x == sp).map(|(_, s)| s);
    let total = todo.len();
    let s = seq_length as i64;
    let chunk = if o.chunk == 0 { s } else { o.chunk as i64 };
    for (b, group) in todo.chunks(o.micro_batch.max(1)).enumerate() {
        let mut toks = Vec::with_capacity(group.len() * seq_length);
        let mut keys = Vec::with_capacity(group.len());
        for &(sp, d, j) in group {
            let Some(part) = find(sp).and_then(|x| x.parts().get(d)) else {
                continue;
            };
            let mut w = part.get(j);
            if let Some(&bad) = w.iter().find(|&&t| t < 0 || t >= model.spec.padded_vocab) {
                return Err(Error::Unusable {
                    dir: out.to_path_buf(),
                    why: format!(
                        "{} window {j} of dataset {d}: token id {bad} is outside the vocabulary [0, {})",
                        sp.name(),
                        model.spec.padded_vocab
                    ),
                });
            }
            w.resize(seq_length + 1, 0);
            toks.extend_from_slice(&w[..seq_length]);
            keys.push(key(sp, d, part.start(j)));
        }
        let n = keys.len() as i64;
        let tokens = Tensor::from_slice(&toks)
            .view([n, s])
            .to_device(model.device());
        // per chunk: [n, c, k] values and ids, [n, c] lse, gathered to the CPU
        let mut vals = Vec::new();
        let mut ids = Vec::new();
        let mut lses = Vec::new();
        tch::no_grad(|| -> Result<(), Error> {
            let h = model.hidden(&tokens)?;
            let mut s0 = 0;
            while s0 < s {
                let c = chunk.min(s - s0);
                let l = model
                    .logits_from_hidden(&h.narrow(1, s0, c))?
                    .to_kind(Kind::Float);
                let (v, i) = global_topk(pg, &l, o.k)?;
                let mut m = l.amax([-1], true);
                if pg.world() > 1 {
                    pg.all_reduce(&mut m, ReduceOp::Max)?;
                }
                let mut z = (&l - &m).exp().sum_dim_intlist(-1, true, Kind::Float);
                if pg.world() > 1 {
                    pg.all_reduce(&mut z, ReduceOp::Sum)?;
                }
                let lse = (m + z.log()).squeeze_dim(-1);
                vals.push(v.to_device(tch::Device::Cpu));
                ids.push(i.to_device(tch::Device::Cpu));
                lses.push(lse.to_device(tch::Device::Cpu));
                s0 += c;
            }
            Ok(())
        })?;
        if let Some(w) = writer.as_mut() {
            let v = Tensor::cat(&vals, 1).contiguous();
            let i = Tensor::cat(&ids, 1).to_kind(Kind::Int64).contiguous();
            let l = Tensor::cat(&lses, 1).contiguous();
            let per = (s * o.k) as usize;
            let mut vv = vec![0f32; v.numel()];
            v.copy_data(&mut vv, v.numel());
            let mut iv = vec![0i64; i.numel()];
            i.copy_data(&mut iv, i.numel());
            let mut lv = vec![0f32; l.numel()];
            l.copy_data(&mut lv, l.numel());
            for (r, k) in keys.iter().enumerate() {
                let ids32: Vec<u32> = iv[r * per..(r + 1) * per]
                    .iter()
                    .map(|&x| u32::try_from(x).unwrap_or(u32::MAX))
                    .collect();
                w.push(
                    *k,
                    &vv[r * per..(r + 1) * per],
                    &ids32,
                    &lv[r * seq_length..(r + 1) * seq_length],
                )?;
            }
        }
        progress(((b + 1) * o.micro_batch.max(1)).min(total), total);
    }
    match writer {
        Some(w) => Ok(Some(w.finish()?)),
        None => Ok(None),
    }
}

/// A teacher cache opened for a run.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    reader: Reader,
    k: i64,
}

impl Cache {
    /// Opens the cache at `dir` (every shard's sha256 checked) for a run whose top-k loss
    /// keeps `k` entries and whose samples and vocabulary are described by `source`.
    ///
    /// # Errors
    /// A malformed or corrupted cache; one made for another tokenizer, vocabulary, dataset,
    /// split setting, sequence length or seed; fewer than `k` entries per token.
    pub fn open(dir: &Path, k: i64, source: &Value) -> Result<Cache, Error> {
        let reader = Reader::open(dir, true)?;
        reader.check_source(dir, source)?;
        if k > i64::from(reader.manifest.k) {
            return Err(Error::Unusable {
                dir: dir.to_path_buf(),
                why: format!(
                    "it holds the top {} logits per token, logit_kl_topk is {k}",
                    reader.manifest.k
                ),
            });
        }
        Ok(Cache {
            dir: dir.to_path_buf(),
            reader,
            k,
        })
    }

    /// The cache's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.reader.manifest
    }

    /// Checks that samples `0..n` of `split` are all cached.
    ///
    /// # Errors
    /// [`Error::Unusable`] with how many are missing and the first of them.
    pub fn check_covers(
        &self,
        samples: &BlendedSamples,
        split: Split,
        n: usize,
    ) -> Result<(), Error> {
        let missing: Vec<usize> = (0..n)
            .filter(|&i| {
                let (d, st) = samples.start(i);
                !self.reader.contains(&key(split, d, st))
            })
            .collect();
        match missing.first() {
            None => Ok(()),
            Some(&first) => Err(Error::Unusable {
                dir: self.dir.clone(),
                why: format!(
                    "{} of the run's {n} {} samples are not cached (the first is sample {first}): write it with `nemo-tool eval TEACHER --teacher-cache DIR --split {} --samples {n}` or more samples",
                    missing.len(),
                    split.name(),
                    split.name(),
                ),
            }),
        }
    }

    /// The teacher's top-k logits of samples `first..first + n` of `split`: `[n, seq, k]`
    /// values (f32) and ids (i64), on the CPU.
    ///
    /// # Errors
    /// A sample that is not cached.
    pub fn topk(
        &self,
        samples: &BlendedSamples,
        split: Split,
        first: usize,
        n: usize,
    ) -> Result<TopK, Error> {
        let k = self.k as usize;
        let seq = self.reader.manifest.seq_length as i64;
        let mut values = Vec::with_capacity(n * seq as usize * k);
        let mut ids = Vec::with_capacity(n * seq as usize * k);
        for i in first..first + n {
            let (d, st) = samples.start(i);
            let r = self.reader.get(key(split, d, st), k)?;
            values.extend_from_slice(&r.values);
            ids.extend(r.ids.iter().map(|&x| i64::from(x)));
        }
        let shape = [n as i64, seq, self.k];
        Ok(TopK {
            values: Tensor::from_slice(&values).view(shape),
            ids: Tensor::from_slice(&ids).view(shape),
        })
    }
}
