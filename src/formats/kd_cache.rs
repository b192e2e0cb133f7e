//! The offline teacher cache: per-token top-k teacher logits and their vocabulary ids for the
//! samples of a dataset split, addressed by where a sample starts in its dataset
//! (dataset, document, offset) — not by a run's micro-batch or parallel layout — so a cache
//! written once serves a distillation at any TP, PP, DP and micro-batch size.
//!
//! A cache is a folder: `cache.json` (the layout, what it was made from, and every shard with
//! its record count and sha256) and `shard_NNNNN.bin` files of fixed-size records, back to
//! back, little-endian:
//!
//! ```text
//! u16 split | u16 dataset | u32 offset | u64 document   16 bytes: the sample's key
//! seq_length × k values     f32, bf16 or f16: the teacher's logits, largest first
//! seq_length × k ids        u32: their vocabulary ids (any vocabulary size)
//! seq_length × lse          f32: log Σ exp(logits) over the whole (padded) vocabulary
//! ```
//!
//! Values are the raw logits (what ModelOpt's top-k loss takes, so a cached run can equal a
//! live one bit for bit); `value - lse` is the log-probability. With 16-bit values a token
//! costs `k·6 + 4` bytes plus `16 / seq_length` for the key. The folder is written aside
//! (`<dir>.partial`) and renamed when complete.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The format name in `cache.json`.
pub const FORMAT: &str = "nemo-tool-kd-cache";
/// Its version.
pub const VERSION: u32 = 2;
/// Bytes of a record's key.
pub const KEY_BYTES: usize = 16;

/// Errors reading or writing a cache.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// File system.
    #[error("{path}: {why}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A cache that is not well-formed (or not this format).
    #[error("{path}: {why}")]
    Invalid {
        /// Where.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A record that does not fit the cache's layout.
    #[error("teacher cache: {0}")]
    Record(String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

/// How the logits are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    /// fp32: exact.
    F32,
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
}

impl ValueType {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            ValueType::F32 => 4,
            ValueType::Bf16 | ValueType::F16 => 2,
        }
    }

    /// Parses `fp32`/`f32`, `bf16`, `fp16`/`f16`.
    pub fn parse(s: &str) -> Option<ValueType> {
        match s {
            "fp32" | "f32" | "float32" => Some(ValueType::F32),
            "bf16" | "bfloat16" => Some(ValueType::Bf16),
            "fp16" | "f16" | "float16" => Some(ValueType::F16),
            _ => None,
        }
    }
}

/// Where a sample starts: the split, the blend's dataset, the document — as its position in the
/// shuffled multi-epoch document stream, which also names the epoch (a window starting at the
/// same document and offset in another epoch runs on into another next document) — and the
/// token offset in it (`distill::sampling::GptSamples::start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Key {
    /// The split: 0 train, 1 validation, 2 test.
    pub split: u16,
    /// Index of the dataset in the blend.
    pub dataset: u16,
    /// The document's position in the dataset's sample stream.
    pub document: u64,
    /// Token offset in the document.
    pub offset: u32,
}

impl Key {
    fn to_bytes(self) -> [u8; KEY_BYTES] {
        let mut b = [0u8; KEY_BYTES];
        b[0..2].copy_from_slice(&self.split.to_le_bytes());
        b[2..4].copy_from_slice(&self.dataset.to_le_bytes());
        b[4..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..16].copy_from_slice(&self.document.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Option<Key> {
        Some(Key {
            split: u16::from_le_bytes(b.get(0..2)?.try_into().ok()?),
            dataset: u16::from_le_bytes(b.get(2..4)?.try_into().ok()?),
            offset: u32::from_le_bytes(b.get(4..8)?.try_into().ok()?),
            document: u64::from_le_bytes(b.get(8..16)?.try_into().ok()?),
        })
    }
}

/// One shard in `cache.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shard {
    /// File name in the cache folder.
    pub file: String,
    /// Records in it.
    pub records: u64,
    /// sha256 of the file, hex.
    pub sha256: String,
}

/// `cache.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// Entries per token.
    pub k: u32,
    /// Tokens per sample.
    pub seq_length: u32,
    /// How values are stored.
    pub dtype: ValueType,
    /// What the cache was made from (teacher, tokenizer, datasets, split, seed): compared
    /// with a run's before it is used.
    pub source: serde_json::Value,
    /// The shards, in order.
    pub shards: Vec<Shard>,
}

impl Manifest {
    /// Bytes of one record.
    pub fn record_bytes(&self) -> usize {
        let s = self.seq_length as usize;
        KEY_BYTES + s * self.k as usize * (self.dtype.size() + 4) + s * 4
    }
}

/// Writes a cache folder.
#[derive(Debug)]
pub struct Writer {
    dir: PathBuf,
    partial: PathBuf,
    manifest: Manifest,
    per_shard: u64,
    open: Option<(std::io::BufWriter<std::fs::File>, Sha256, u64, String)>,
}

impl Writer {
    /// Starts a cache at `dir` (refused if it exists unless `force`) of `k` entries per
    /// token, `seq_length` tokens per record, at most `per_shard` records per shard.
    ///
    /// # Errors
    /// An existing output without `force`; I/O errors.
    pub fn create(
        dir: &Path,
        k: u32,
        seq_length: u32,
        dtype: ValueType,
        source: serde_json::Value,
        per_shard: u64,
        force: bool,
    ) -> Result<Writer, Error> {
        if dir.exists() && !force {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                why: "exists (use --force to replace it)".to_string(),
            });
        }
        let partial = PathBuf::from(format!("{}.partial", dir.display()));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
        Ok(Writer {
            dir: dir.to_path_buf(),
            partial,
            manifest: Manifest {
                format: FORMAT.to_string(),
                version: VERSION,
                k,
                seq_length,
                dtype,
                source,
                shards: Vec::new(),
            },
            per_shard: per_shard.max(1),
            open: None,
        })
    }

    /// Appends the record of the sample at `key`: `values` and `ids` are `seq_length × k`,
    /// token-major, `lse` one per token.
    ///
    /// # Errors
    /// Wrong lengths; I/O errors.
    pub fn push(
        &mut self,
        key: Key,
        values: &[f32],
        ids: &[u32],
        lse: &[f32],
    ) -> Result<(), Error> {
        let s = self.manifest.seq_length as usize;
        let n = s * self.manifest.k as usize;
        if values.len() != n || ids.len() != n || lse.len() != s {
            return Err(Error::Record(format!(
                "{key:?}: {} values, {} ids and {} lse, the layout needs {n}, {n} and {s}",
                values.len(),
                ids.len(),
                lse.len()
            )));
        }
        if self.open.as_ref().is_some_and(|o| o.2 >= self.per_shard) {
            self.close_shard()?;
        }
        if self.open.is_none() {
            let name = format!("shard_{:05}.bin", self.manifest.shards.len());
            let path = self.partial.join(&name);
            let f = std::fs::File::create(&path).map_err(io(&path))?;
            self.open = Some((std::io::BufWriter::new(f), Sha256::new(), 0, name));
        }
        let dtype = self.manifest.dtype;
        let mut bytes = Vec::with_capacity(self.manifest.record_bytes());
        bytes.extend_from_slice(&key.to_bytes());
        for &v in values {
            match dtype {
                ValueType::F32 => bytes.extend_from_slice(&v.to_le_bytes()),
                ValueType::Bf16 => bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                ValueType::F16 => bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            }
        }
        for &i in ids {
            bytes.extend_from_slice(&i.to_le_bytes());
        }
        for &l in lse {
            bytes.extend_from_slice(&l.to_le_bytes());
        }
        let partial = self.partial.clone();
        if let Some((w, h, count, name)) = self.open.as_mut() {
            let path = partial.join(name.as_str());
            w.write_all(&bytes).map_err(io(&path))?;
            h.update(&bytes);
            *count += 1;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> Result<(), Error> {
        if let Some((mut w, h, records, file)) = self.open.take() {
            let path = self.partial.join(&file);
            w.flush().map_err(io(&path))?;
            w.get_ref().sync_all().map_err(io(&path))?;
            self.manifest.shards.push(Shard {
                file,
                records,
                sha256: hex::encode(h.finalize()),
            });
        }
        Ok(())
    }

    /// Writes `cache.json` and moves the folder into place; returns the manifest.
    ///
    /// # Errors
    /// I/O errors.
    pub fn finish(mut self) -> Result<Manifest, Error> {
        self.close_shard()?;
        let p = self.partial.join("cache.json");
        let json = serde_json::to_vec_pretty(&self.manifest).map_err(|e| Error::Io {
            path: p.clone(),
            why: e.to_string(),
        })?;
        std::fs::write(&p, json).map_err(io(&p))?;
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::rename(&self.partial, &self.dir).map_err(io(&self.dir))?;
        Ok(self.manifest.clone())
    }
}

impl Drop for Writer {
    /// A cache that was not finished leaves nothing behind (after `finish` the partial
    /// folder has been renamed into place and this does nothing).
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.partial);
    }
}

/// One sample's cached teacher outputs, token-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// `seq_length × k` logits, largest first per token.
    pub values: Vec<f32>,
    /// Their vocabulary ids.
    pub ids: Vec<u32>,
    /// Per token, log Σ exp over the whole vocabulary.
    pub lse: Vec<f32>,
}

/// A cache opened for reading: every shard mapped, every record indexed by its key.
#[derive(Debug)]
pub struct Reader {
    /// Its manifest.
    pub manifest: Manifest,
    maps: Vec<crate::io::mmap::Mmap>,
    index: HashMap<Key, (usize, usize)>,
}

impl Reader {
    /// Opens the cache at `dir`, checking each shard's size and (with `verify`) sha256.
    ///
    /// # Errors
    /// A missing or malformed `cache.json`, another format or version, a shard of the wrong
    /// size or checksum, a key twice.
    pub fn open(dir: &Path, verify: bool) -> Result<Reader, Error> {
        let mp = dir.join("cache.json");
        let bad = |path: &Path, why: String| Error::Invalid {
            path: path.to_path_buf(),
            why,
        };
        let text = std::fs::read(&mp).map_err(io(&mp))?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| bad(&mp, format!("not a teacher cache manifest: {e}")))?;
        if manifest.format != FORMAT || manifest.version != VERSION {
            return Err(bad(
                &mp,
                format!(
                    "format {} version {}, this nemo-tool reads {FORMAT} version {VERSION}",
                    manifest.format, manifest.version
                ),
            ));
        }
        let rb = manifest.record_bytes();
        let mut maps = Vec::with_capacity(manifest.shards.len());
        let mut index = HashMap::new();
        for (s, shard) in manifest.shards.iter().enumerate() {
            let p = dir.join(&shard.file);
            let f = std::fs::File::open(&p).map_err(io(&p))?;
            let map = crate::io::mmap::map_file(&f).map_err(io(&p))?;
            let want = shard.records as usize * rb;
            if map.len() != want {
                return Err(bad(
                    &p,
                    format!(
                        "{} bytes, {} records of {rb} need {want}",
                        map.len(),
                        shard.records
                    ),
                ));
            }
            if verify {
                let got = hex::encode(Sha256::digest(&map[..]));
                if got != shard.sha256 {
                    return Err(bad(
                        &p,
                        format!("sha256 {got}, cache.json says {}", shard.sha256),
                    ));
                }
            }
            for r in 0..shard.records as usize {
                let key = Key::from_bytes(&map[r * rb..r * rb + KEY_BYTES])
                    .ok_or_else(|| bad(&p, format!("record {r}: unreadable key")))?;
                if index.insert(key, (s, r * rb)).is_some() {
                    return Err(bad(&p, format!("{key:?} is cached twice")));
                }
            }
            maps.push(map);
        }
        Ok(Reader {
            manifest,
            maps,
            index,
        })
    }

    /// Records cached.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether the sample at `key` is cached.
    pub fn contains(&self, key: &Key) -> bool {
        self.index.contains_key(key)
    }

    /// The record of the sample at `key`, its first `k` entries per token (`k` at most the
    /// cache's: they are the largest, in order).
    ///
    /// # Errors
    /// [`Error::Record`] when the sample is not in the cache or `k` exceeds the cache's.
    pub fn get(&self, key: Key, k: usize) -> Result<Record, Error> {
        let m = &self.manifest;
        let kc = m.k as usize;
        if k > kc {
            return Err(Error::Record(format!(
                "{k} entries per token asked, the cache holds {kc} (write it with --topk {k} or more)"
            )));
        }
        let (s, off) = *self.index.get(&key).ok_or_else(|| {
            Error::Record(format!(
                "no record for {key:?}: the cache was written for other samples (another dataset, split, seq_length, seed or fewer samples)"
            ))
        })?;
        let seq = m.seq_length as usize;
        let w = m.dtype.size();
        let rec = &self.maps[s][off + KEY_BYTES..off + m.record_bytes()];
        let (vals, rest) = rec.split_at(seq * kc * w);
        let (ids, lse) = rest.split_at(seq * kc * 4);
        let mut out = Record {
            values: Vec::with_capacity(seq * k),
            ids: Vec::with_capacity(seq * k),
            lse: lse
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        };
        for t in 0..seq {
            let vs = &vals[t * kc * w..(t * kc + k) * w];
            out.values.extend(vs.chunks_exact(w).map(|c| match m.dtype {
                ValueType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                ValueType::Bf16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                ValueType::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
            }));
            let is = &ids[t * kc * 4..(t * kc + k) * 4];
            out.ids.extend(
                is.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        Ok(out)
    }

    /// Checks that the cache was made from `source` (the run's teacher, tokenizer, datasets,
    /// split, seed): every key of `source` must be in the cache's with the same value.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the first key that differs.
    pub fn check_source(&self, dir: &Path, source: &serde_json::Value) -> Result<(), Error> {
        let have = &self.manifest.source;
        if let Some(want) = source.as_object() {
            for (k, v) in want {
                if have.get(k) != Some(v) {
                    return Err(Error::Invalid {
                        path: dir.join("cache.json"),
                        why: format!(
                            "made for another {k}: the cache has {}, this run {}",
                            have.get(k).map_or("nothing".to_string(), |x| x.to_string()),
                            v
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> Key {
        Key {
            split: (i % 3) as u16,
            dataset: (i % 2) as u16,
            document: i * 7,
            offset: (i * 13 % 50) as u32,
        }
    }

    #[test]
    fn writes_reads_and_refuses() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let out = dir.path().join("cache");
        let (k, seq) = (3u32, 4u32);
        let n = (k * seq) as usize;
        let src = serde_json::json!({"dataset": "abc", "tokenizer": "t1"});
        for dtype in [ValueType::F32, ValueType::Bf16, ValueType::F16] {
            let mut w = Writer::create(&out, k, seq, dtype, src.clone(), 2, true)
                .unwrap_or_else(|e| panic!("{e}"));
            for i in 0..5u64 {
                let vals: Vec<f32> = (0..n).map(|j| (i as f32) + j as f32 * 0.25).collect();
                let ids: Vec<u32> = (0..n).map(|j| (i as u32) * 70_000 + j as u32).collect();
                let lse: Vec<f32> = (0..seq).map(|t| 10.0 + t as f32).collect();
                w.push(key(i), &vals, &ids, &lse)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            assert!(w.push(key(9), &[1.0], &[1], &[0.0]).is_err());
            let m = w.finish().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(m.shards.len(), 3);
            // 16-bit values: k·6 bytes a token plus the key spread over the sequence
            let per_token = m.record_bytes() as f64 / f64::from(seq);
            if dtype != ValueType::F32 {
                assert!(per_token <= f64::from(k) * 6.0 + 16.0, "{per_token}");
                assert_eq!(m.record_bytes(), 16 + 4 * (3 * 6 + 4));
            }
            let r = Reader::open(&out, true).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.len(), 5);
            let rec = r.get(key(3), 3).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(rec.ids[1], 3 * 70_000 + 1, "ids above 2^17 survive");
            assert_eq!(rec.values[0], 3.0);
            assert_eq!(rec.values[5], 3.0 + 1.25, "{dtype:?}");
            assert_eq!(rec.lse, vec![10.0, 11.0, 12.0, 13.0]);
            // the first 2 of 3 per token
            let two = r.get(key(3), 2).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(two.values[2], rec.values[3]);
            assert_eq!(two.ids[3], rec.ids[4]);
            assert!(r.get(key(3), 4).is_err());
            assert!(r.get(key(42), 1).is_err());
            assert!(r.contains(&key(4)) && !r.contains(&key(42)));
            r.check_source(&out, &serde_json::json!({"dataset": "abc"}))
                .unwrap_or_else(|e| panic!("{e}"));
            let e = r
                .check_source(&out, &serde_json::json!({"dataset": "other"}))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("made for another dataset"), "{e}");
        }
        // an unfinished cache leaves nothing behind
        let other = dir.path().join("unfinished");
        let mut w = Writer::create(&other, k, seq, ValueType::F32, src.clone(), 2, true)
            .unwrap_or_else(|e| panic!("{e}"));
        let vals = vec![0f32; n];
        let ids = vec![0u32; n];
        w.push(key(1), &vals, &ids, &[0.0; 4])
            .unwrap_or_else(|e| panic!("{e}"));
        drop(w);
        assert!(!other.exists());
        assert!(!PathBuf::from(format!("{}.partial", other.display())).exists());
        // an existing cache is kept without --force; a corrupted shard is refused
        assert!(Writer::create(&out, 1, 1, ValueType::F32, src, 1, false).is_err());
        let shard = out.join("shard_00000.bin");
        let mut bytes = std::fs::read(&shard).unwrap_or_else(|e| panic!("{e}"));
        bytes[20] ^= 0xff;
        std::fs::write(&shard, bytes).unwrap_or_else(|e| panic!("{e}"));
        let e = Reader::open(&out, true)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("sha256"), "{e}");
        assert!(!PathBuf::from(format!("{}.partial", out.display())).exists());
    }
}
