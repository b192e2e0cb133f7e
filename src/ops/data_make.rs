//! `data make` from raw text: corpus lines -> tokenizer -> one Megatron indexed dataset per
//! JSON key, with megatron-core's `preprocess_data.py` semantics: a document's texts (a string,
//! or a list of pre-split sentences) are tokenized without special tokens, each non-empty one a
//! sequence; with `append_eod` the EOD id ends the document's last sequence; a document with no
//! tokens is kept as a document without sequences; datasets are named
//! `{prefix}_{key}_document.{bin,idx}`.
//!
//! Lines are read in batches (bounded memory whatever the corpus size), tokenized by `workers`
//! threads, and written in input order, so the output does not depend on the worker count.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::formats::indexed::{self, Builder, TokenType};
use crate::text::corpus::{self, BadLine, CorpusFile};
use crate::text::tokenizer::{self, Tokenizer};

/// Errors; each names the file and line or the dataset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a corpus file.
    #[error(transparent)]
    Corpus(#[from] corpus::Error),
    /// A line that is not a document (without `skip_bad`).
    #[error("{file}:{line}: {why} (--skip-bad skips such lines)")]
    BadLine {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: u64,
        /// Why.
        why: BadLine,
    },
    /// The tokenizer failed.
    #[error("{file}:{line}: {source}")]
    Tokenize {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: u64,
        /// Why.
        #[source]
        source: tokenizer::Error,
    },
    /// Writing a dataset.
    #[error("{prefix}: {source}")]
    Write {
        /// The dataset prefix.
        prefix: PathBuf,
        /// Why.
        #[source]
        source: indexed::Error,
    },
    /// Options that cannot work together.
    #[error("{0}")]
    Invalid(String),
}

/// What to make.
#[derive(Debug)]
pub struct MakeText<'a> {
    /// Corpus files, read in this order.
    pub inputs: &'a [PathBuf],
    /// JSON keys (one dataset each); plain-text inputs take exactly one.
    pub keys: &'a [String],
    /// The tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// End-of-document id appended to every non-empty document.
    pub append_eod: Option<u32>,
    /// Tokenizing threads (at least 1).
    pub workers: usize,
    /// Output prefix: `{prefix}_{key}_document.{bin,idx}`.
    pub prefix: &'a Path,
    /// Skip (and count) bad lines instead of failing.
    pub skip_bad: bool,
    /// Replace existing outputs.
    pub force: bool,
    /// Token type of the outputs.
    pub token_type: TokenType,
}

/// One dataset written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DatasetReport {
    /// The JSON key.
    pub key: String,
    /// `{prefix}_{key}_document`.
    pub prefix: PathBuf,
    /// Documents.
    pub documents: u64,
    /// Sequences (non-empty sentences).
    pub sequences: u64,
    /// Tokens.
    pub tokens: u64,
}

/// The run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// One per key.
    pub datasets: Vec<DatasetReport>,
    /// Documents read (lines that were documents).
    pub documents: u64,
    /// Bad lines skipped (`skip_bad`).
    pub skipped: u64,
    /// The first skipped lines (`file:line: why`), at most 10.
    pub skipped_examples: Vec<String>,
    /// Documents that tokenized to nothing under some key (kept, as megatron-core keeps them:
    /// a document without sequences).
    pub empty_documents: u64,
    /// The first of those (`file:line`), at most 10.
    pub empty_examples: Vec<String>,
    /// Input bytes read (uncompressed).
    pub bytes: u64,
    /// Tokens written over all datasets.
    pub tokens: u64,
    /// Wall time.
    pub seconds: f64,
    /// Token type written.
    pub token_type: String,
    /// Threads used.
    pub workers: usize,
    /// What encoded the text ([`Tokenizer::encoder`]).
    pub encoder: &'static str,
}

/// Progress, after each batch.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Documents so far.
    pub documents: u64,
    /// Tokens so far.
    pub tokens: u64,
    /// Input bytes so far.
    pub bytes: u64,
    /// Seconds since the start.
    pub seconds: f64,
}

/// Lines per batch, and bytes: what is held in memory at once.
const BATCH_LINES: usize = 4096;
const BATCH_BYTES: usize = 16 << 20;

/// A line's datasets: per key, its tokens and sequence lengths.
type Encoded = Vec<(Vec<u32>, Vec<u32>)>;

fn encode_line(
    kind: corpus::Kind,
    bytes: &[u8],
    keys: &[String],
    tok: &Tokenizer,
    eod: Option<u32>,
) -> Result<Result<Encoded, BadLine>, tokenizer::Error> {
    let texts = match corpus::texts(kind, bytes, keys) {
        Ok(t) => t,
        Err(bad) => return Ok(Err(bad)),
    };
    let mut out = Vec::with_capacity(texts.len());
    for sentences in texts {
        let mut ids = Vec::new();
        let mut lens = Vec::new();
        for s in &sentences {
            let t = tok.encode(s)?;
            if !t.is_empty() {
                lens.push(t.len() as u32);
                ids.extend(t);
            }
        }
        if let (Some(e), Some(last)) = (eod, lens.last_mut()) {
            ids.push(e);
            *last += 1;
        }
        out.push((ids, lens));
    }
    Ok(Ok(out))
}

/// `{prefix}_{key}_document`, as Megatron's script names its outputs.
pub fn dataset_prefix(prefix: &Path, key: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(format!("_{key}_document"));
    PathBuf::from(s)
}

/// Tokenizes the corpus into the datasets, calling `progress` after each batch.
///
/// # Errors
/// [`Error`]; no output exists unless every dataset was written.
pub fn make_text(m: &MakeText, progress: &mut dyn FnMut(&Progress)) -> Result<Report, Error> {
    if m.keys.is_empty() {
        return Err(Error::Invalid("give at least one JSON key".into()));
    }
    let plain = m
        .inputs
        .iter()
        .any(|p| corpus::kind_of(p) == corpus::Kind::PlainText);
    if plain && m.keys.len() != 1 {
        return Err(Error::Invalid(format!(
            "plain-text inputs hold one text per line: give one key (the dataset's name), not {}",
            m.keys.len()
        )));
    }
    let start = Instant::now();
    let mut builders = Vec::with_capacity(m.keys.len());
    let mut reports = Vec::with_capacity(m.keys.len());
    for k in m.keys {
        let prefix = dataset_prefix(m.prefix, k);
        let b = Builder::create(&prefix, m.token_type, m.force).map_err(|source| Error::Write {
            prefix: prefix.clone(),
            source,
        })?;
        builders.push(b);
        reports.push(DatasetReport {
            key: k.clone(),
            prefix,
            documents: 0,
            sequences: 0,
            tokens: 0,
        });
    }
    let workers = m.workers.max(1);
    let (mut documents, mut skipped, mut bytes, mut tokens) = (0u64, 0u64, 0u64, 0u64);
    let mut examples = Vec::new();
    let (mut empty, mut empty_examples) = (0u64, Vec::new());
    for path in m.inputs {
        let mut file = CorpusFile::open(path)?;
        let kind = file.kind;
        loop {
            let mut batch = Vec::new();
            let mut size = 0usize;
            while batch.len() < BATCH_LINES && size < BATCH_BYTES {
                match file.next_line()? {
                    Some(l) => {
                        size += l.bytes.len() + 1;
                        batch.push(l);
                    }
                    None => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            bytes += size as u64;
            // each thread takes the next line as it finishes one (documents vary from a few
            // tokens to thousands), and results go back in line order
            let next = std::sync::atomic::AtomicUsize::new(0);
            let mut slots: Vec<Option<_>> = (0..batch.len()).map(|_| None).collect();
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..workers.min(batch.len()))
                    .map(|_| {
                        s.spawn(|| {
                            let mut done = Vec::new();
                            loop {
                                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let Some(l) = batch.get(k) else { break };
                                done.push((
                                    k,
                                    encode_line(kind, &l.bytes, m.keys, m.tokenizer, m.append_eod),
                                ));
                            }
                            done
                        })
                    })
                    .collect();
                for h in handles {
                    for (k, r) in h.join().unwrap_or_default() {
                        slots[k] = Some(r);
                    }
                }
            });
            let encoded: Vec<_> = slots.into_iter().flatten().collect();
            if encoded.len() != batch.len() {
                return Err(Error::Invalid("a tokenizing thread panicked".into()));
            }
            for (l, r) in batch.iter().zip(encoded) {
                let r = r.map_err(|source| Error::Tokenize {
                    file: path.clone(),
                    line: l.line,
                    source,
                })?;
                let line = match r {
                    Ok(line) => line,
                    Err(why) if m.skip_bad => {
                        skipped += 1;
                        if examples.len() < 10 {
                            examples.push(format!("{}:{}: {why}", path.display(), l.line));
                        }
                        continue;
                    }
                    Err(why) => {
                        return Err(Error::BadLine {
                            file: path.clone(),
                            line: l.line,
                            why,
                        })
                    }
                };
                documents += 1;
                if line.iter().any(|(ids, _)| ids.is_empty()) {
                    empty += 1;
                    if empty_examples.len() < 10 {
                        empty_examples.push(format!("{}:{}", path.display(), l.line));
                    }
                }
                for ((b, rep), (ids, lens)) in builders.iter_mut().zip(&mut reports).zip(line) {
                    let ids: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
                    b.add_sequences(&ids, &lens)
                        .map_err(|source| Error::Write {
                            prefix: rep.prefix.clone(),
                            source,
                        })?;
                    rep.documents += 1;
                    rep.sequences += lens.len() as u64;
                    rep.tokens += ids.len() as u64;
                    tokens += ids.len() as u64;
                }
            }
            progress(&Progress {
                documents,
                tokens,
                bytes,
                seconds: start.elapsed().as_secs_f64(),
            });
        }
    }
    for (b, rep) in builders.into_iter().zip(&reports) {
        b.finish().map_err(|source| Error::Write {
            prefix: rep.prefix.clone(),
            source,
        })?;
    }
    Ok(Report {
        datasets: reports,
        documents,
        skipped,
        skipped_examples: examples,
        empty_documents: empty,
        empty_examples,
        bytes,
        tokens,
        seconds: start.elapsed().as_secs_f64(),
        token_type: format!("{:?}", m.token_type).to_lowercase(),
        workers,
        encoder: m.tokenizer.encoder(),
    })
}
