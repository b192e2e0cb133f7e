//! Megatron's memory-mapped indexed dataset: `<prefix>.idx` (an `MMIDIDX`
//! index) plus `<prefix>.bin` (the raw concatenation of every sequence's
//! tokens). Layout from nemo-format.md §5.4 (mcore `indexed_dataset.py`):
//!
//! ```text
//! magic "MMIDIDX\0\0" | u64 version=1 | u8 dtype | u64 N | u64 D
//! i32 lengths[N] | i64 byte offsets[N] | i64 document index[D] | (i8 modes[N], multimodal only)
//! ```
//!
//! Reading maps both files and validates every length and offset against
//! the `.bin` size before handing out a sequence.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::io::bytes::ByteView;
use crate::io::mmap::map_file;
use crate::io::output::OutputFile;

const MAGIC: &[u8; 9] = b"MMIDIDX\0\0";
const HEADER: usize = 34;

/// Token element types (`.idx` dtype codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// code 1
    U8,
    /// code 2
    I8,
    /// code 3
    I16,
    /// code 4
    I32,
    /// code 5
    I64,
    /// code 8
    U16,
}

impl TokenType {
    fn from_code(c: u8) -> Option<TokenType> {
        Some(match c {
            1 => TokenType::U8,
            2 => TokenType::I8,
            3 => TokenType::I16,
            4 => TokenType::I32,
            5 => TokenType::I64,
            8 => TokenType::U16,
            _ => return None,
        })
    }

    fn code(self) -> u8 {
        match self {
            TokenType::U8 => 1,
            TokenType::I8 => 2,
            TokenType::I16 => 3,
            TokenType::I32 => 4,
            TokenType::I64 => 5,
            TokenType::U16 => 8,
        }
    }

    /// Bytes per token.
    pub fn size(self) -> usize {
        match self {
            TokenType::U8 | TokenType::I8 => 1,
            TokenType::I16 | TokenType::U16 => 2,
            TokenType::I32 => 4,
            TokenType::I64 => 8,
        }
    }

    /// What Megatron's preprocessing picks: u16 below 65500 tokens, else i32.
    pub fn for_vocab(vocab: u64) -> TokenType {
        if vocab < 65500 {
            TokenType::U16
        } else {
            TokenType::I32
        }
    }

    fn decode(self, b: &[u8]) -> i64 {
        // Callers pass exactly `size()` bytes.
        let mut a = [0u8; 8];
        a[..b.len()].copy_from_slice(b);
        match self {
            TokenType::U8 => i64::from(b[0]),
            TokenType::I8 => i64::from(b[0] as i8),
            TokenType::I16 => i64::from(i16::from_le_bytes([b[0], b[1]])),
            TokenType::U16 => i64::from(u16::from_le_bytes([b[0], b[1]])),
            TokenType::I32 => i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            TokenType::I64 => i64::from_le_bytes(a),
        }
    }

    fn encode(self, v: i64, out: &mut Vec<u8>) -> bool {
        match self {
            TokenType::U8 => u8::try_from(v).map(|x| out.push(x)).is_ok(),
            TokenType::I8 => i8::try_from(v).map(|x| out.push(x as u8)).is_ok(),
            TokenType::I16 => i16::try_from(v)
                .map(|x| out.extend_from_slice(&x.to_le_bytes()))
                .is_ok(),
            TokenType::U16 => u16::try_from(v)
                .map(|x| out.extend_from_slice(&x.to_le_bytes()))
                .is_ok(),
            TokenType::I32 => i32::try_from(v)
                .map(|x| out.extend_from_slice(&x.to_le_bytes()))
                .is_ok(),
            TokenType::I64 => {
                out.extend_from_slice(&v.to_le_bytes());
                true
            }
        }
    }
}

/// Errors reading or writing an indexed dataset; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or mapping a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The index is malformed.
    #[error("{}: {why}", path.display())]
    BadIndex {
        /// The `.idx` file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A sequence points outside the `.bin` file.
    #[error("{}: sequence {seq} spans bytes {start}..{end} but the file has {len}", path.display())]
    OutOfBin {
        /// The `.bin` file.
        path: PathBuf,
        /// Sequence number.
        seq: u64,
        /// Start byte.
        start: u64,
        /// End byte.
        end: u64,
        /// File length.
        len: u64,
    },
    /// A token does not fit the dataset's token type.
    #[error("token {token} does not fit {ty:?}")]
    TokenRange {
        /// The value.
        token: i64,
        /// The type.
        ty: TokenType,
    },
    /// Writing the output.
    #[error(transparent)]
    Output(#[from] crate::io::output::Error),
}

/// `<prefix>.idx` and `<prefix>.bin`.
pub fn paths(prefix: &Path) -> (PathBuf, PathBuf) {
    let p = prefix.display().to_string();
    (
        PathBuf::from(format!("{p}.idx")),
        PathBuf::from(format!("{p}.bin")),
    )
}

/// An opened indexed dataset (both files memory-mapped).
#[derive(Debug, Clone)]
pub struct IndexedDataset {
    prefix: PathBuf,
    ty: TokenType,
    lengths: Vec<u32>,
    offsets: Vec<u64>,
    documents: Vec<u64>,
    bin: ByteView,
}

fn map(path: &Path) -> Result<ByteView, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(io)?;
    if f.metadata().map_err(io)?.len() == 0 {
        return Ok(ByteView::from_vec(Vec::new()));
    }
    Ok(ByteView::from_mmap(map_file(&f).map_err(io)?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl IndexedDataset {
    /// Opens `<prefix>.idx` + `<prefix>.bin` and validates the index.
    pub fn open(prefix: impl AsRef<Path>) -> Result<IndexedDataset, Error> {
        let prefix = prefix.as_ref().to_path_buf();
        let (idx_path, bin_path) = paths(&prefix);
        let idx = map(&idx_path)?;
        let bin = map(&bin_path)?;
        let bad = |why: String| Error::BadIndex {
            path: idx_path.clone(),
            why,
        };
        let b = idx.as_slice();
        if b.len() < HEADER || &b[..9] != MAGIC {
            return Err(bad("not an MMIDIDX index (bad magic or too short)".into()));
        }
        let version = u64_at(b, 9).unwrap_or(0);
        if version != 1 {
            return Err(bad(format!("unsupported index version {version}")));
        }
        let ty = TokenType::from_code(b[17])
            .ok_or_else(|| bad(format!("unsupported dtype code {}", b[17])))?;
        let n = u64_at(b, 18).unwrap_or(0);
        let d = u64_at(b, 26).unwrap_or(0);
        // Bound the counts by the file size before allocating anything.
        let need = n
            .checked_mul(12)
            .and_then(|x| x.checked_add(d.checked_mul(8)?))
            .and_then(|x| x.checked_add(HEADER as u64));
        match need {
            Some(need) if need <= b.len() as u64 => {}
            _ => {
                return Err(bad(format!(
                    "{n} sequences and {d} document entries do not fit {} bytes",
                    b.len()
                )))
            }
        }
        let (n, d) = (n as usize, d as usize);
        let lengths: Vec<u32> = (0..n)
            .map(|i| {
                let at = HEADER + 4 * i;
                i32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
            })
            .map(|l| u32::try_from(l).map_err(|_| bad(format!("negative sequence length {l}"))))
            .collect::<Result<_, _>>()?;
        let off_at = HEADER + 4 * n;
        let offsets: Vec<u64> = (0..n)
            .map(|i| {
                i64::from_le_bytes(
                    b[off_at + 8 * i..off_at + 8 * i + 8]
                        .try_into()
                        .unwrap_or([0; 8]),
                )
            })
            .map(|o| u64::try_from(o).map_err(|_| bad(format!("negative byte offset {o}"))))
            .collect::<Result<_, _>>()?;
        let doc_at = off_at + 8 * n;
        let documents: Vec<u64> = (0..d)
            .map(|i| {
                i64::from_le_bytes(
                    b[doc_at + 8 * i..doc_at + 8 * i + 8]
                        .try_into()
                        .unwrap_or([0; 8]),
                )
            })
            .map(|o| u64::try_from(o).map_err(|_| bad(format!("negative document index {o}"))))
            .collect::<Result<_, _>>()?;
        if documents.first() != Some(&0)
            || documents.last() != Some(&(n as u64))
            || documents.windows(2).any(|w| w[0] > w[1])
        {
            return Err(bad(
                "document index must rise from 0 to the number of sequences".into(),
            ));
        }
        let size = ty.size() as u64;
        for (i, (&len, &off)) in lengths.iter().zip(&offsets).enumerate() {
            let end = off.checked_add(u64::from(len) * size);
            if end.is_none_or(|e| e > bin.len() as u64) {
                return Err(Error::OutOfBin {
                    path: bin_path.clone(),
                    seq: i as u64,
                    start: off,
                    end: end.unwrap_or(u64::MAX),
                    len: bin.len() as u64,
                });
            }
        }
        Ok(IndexedDataset {
            prefix,
            ty,
            lengths,
            offsets,
            documents,
            bin,
        })
    }

    /// The prefix it was opened from.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// Token type of the `.bin`.
    pub fn token_type(&self) -> TokenType {
        self.ty
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    /// True when there are no sequences.
    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Sequence lengths in tokens.
    pub fn lengths(&self) -> &[u32] {
        &self.lengths
    }

    /// Document boundaries (sequence indices, from 0 to `len()`).
    pub fn documents(&self) -> &[u64] {
        &self.documents
    }

    /// Tokens `[start, start+count)` of sequence `seq` (bounds were validated at open).
    pub fn tokens(&self, seq: usize, start: usize, count: usize) -> Vec<i64> {
        let size = self.ty.size();
        let (Some(&len), Some(&off)) = (self.lengths.get(seq), self.offsets.get(seq)) else {
            return Vec::new();
        };
        let end = (start + count).min(len as usize);
        let bytes = self.bin.as_slice();
        (start.min(end)..end)
            .map(|t| {
                let at = off as usize + t * size;
                self.ty.decode(&bytes[at..at + size])
            })
            .collect()
    }

    /// All tokens of sequence `seq`.
    pub fn sequence(&self, seq: usize) -> Vec<i64> {
        self.tokens(seq, 0, self.lengths.get(seq).map_or(0, |l| *l as usize))
    }
}

/// Writes an indexed dataset, one document per call: one sequence ([`Builder::add_document`]),
/// or any number of them ([`Builder::add_sequences`], megatron-core's
/// `IndexedDatasetBuilder.add_document(tokens, lengths)`; none for an empty document).
pub struct Builder {
    ty: TokenType,
    bin: BufWriter<OutputFile>,
    idx: OutputFile,
    lengths: Vec<u32>,
    /// Sequence index where each document ends (after a leading 0).
    documents: Vec<u64>,
    offset: u64,
}

impl Builder {
    /// Starts `<prefix>.bin`/`.idx` (written atomically; existing files need `force`).
    pub fn create(prefix: impl AsRef<Path>, ty: TokenType, force: bool) -> Result<Builder, Error> {
        let (idx_path, bin_path) = paths(prefix.as_ref());
        let bin = BufWriter::new(OutputFile::create(&bin_path, force)?);
        let idx = OutputFile::create(&idx_path, force)?;
        Ok(Builder {
            ty,
            bin,
            idx,
            lengths: Vec::new(),
            documents: vec![0],
            offset: 0,
        })
    }

    /// Appends one document made of sequences of `lengths` tokens (their sum is
    /// `tokens.len()`); an empty `lengths` adds a document without sequences, as megatron-core
    /// does for a text that tokenizes to nothing.
    ///
    /// # Errors
    /// [`Error::TokenRange`], [`Error::BadIndex`] for lengths that do not add up, I/O.
    pub fn add_sequences(&mut self, tokens: &[i64], lengths: &[u32]) -> Result<(), Error> {
        let total: u64 = lengths.iter().map(|&l| u64::from(l)).sum();
        if total != tokens.len() as u64 {
            return Err(Error::BadIndex {
                path: self.idx.target().to_path_buf(),
                why: format!(
                    "sequence lengths sum to {total}, {} tokens given",
                    tokens.len()
                ),
            });
        }
        let mut start = 0usize;
        for &l in lengths {
            let end = start + l as usize;
            self.add_sequence(&tokens[start..end])?;
            start = end;
        }
        self.documents.push(self.lengths.len() as u64);
        Ok(())
    }

    /// Appends one document.
    pub fn add_document(&mut self, tokens: &[i64]) -> Result<(), Error> {
        self.add_sequence(tokens)?;
        self.documents.push(self.lengths.len() as u64);
        Ok(())
    }

    fn add_sequence(&mut self, tokens: &[i64]) -> Result<(), Error> {
        let mut buf = Vec::with_capacity(tokens.len() * self.ty.size());
        for &t in tokens {
            if !self.ty.encode(t, &mut buf) {
                return Err(Error::TokenRange {
                    token: t,
                    ty: self.ty,
                });
            }
        }
        let len = u32::try_from(tokens.len())
            .ok()
            .filter(|l| *l <= i32::MAX as u32)
            .ok_or_else(|| Error::BadIndex {
                path: self.idx.target().to_path_buf(),
                why: "sequence longer than 2^31 tokens".into(),
            })?;
        self.bin.write_all(&buf).map_err(|source| Error::Io {
            path: self.idx.target().with_extension("bin"),
            source,
        })?;
        self.lengths.push(len);
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Writes the index and renames both files into place.
    pub fn finish(mut self) -> Result<(PathBuf, PathBuf), Error> {
        let n = self.lengths.len() as u64;
        let mut h = Vec::with_capacity(HEADER + 20 * self.lengths.len() + 16);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&1u64.to_le_bytes());
        h.push(self.ty.code());
        h.extend_from_slice(&n.to_le_bytes());
        h.extend_from_slice(&(self.documents.len() as u64).to_le_bytes());
        for l in &self.lengths {
            h.extend_from_slice(&(*l as i32).to_le_bytes());
        }
        let mut off = 0i64;
        for l in &self.lengths {
            h.extend_from_slice(&off.to_le_bytes());
            off += i64::from(*l) * self.ty.size() as i64;
        }
        for &d in &self.documents {
            h.extend_from_slice(&(d as i64).to_le_bytes());
        }
        let idx_target = self.idx.target().to_path_buf();
        self.idx.write_all(&h).map_err(|source| Error::Io {
            path: idx_target.clone(),
            source,
        })?;
        let bin = self.bin.into_inner().map_err(|e| Error::Io {
            path: idx_target.with_extension("bin"),
            source: e.into_error(),
        })?;
        let bin_path = bin.commit()?;
        let idx_path = self.idx.commit()?;
        Ok((idx_path, bin_path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(dir: &Path, docs: &[Vec<i64>], ty: TokenType) -> PathBuf {
        let prefix = dir.join("ds");
        let mut b = Builder::create(&prefix, ty, false).unwrap();
        for d in docs {
            b.add_document(d).unwrap();
        }
        b.finish().unwrap();
        prefix
    }

    #[test]
    fn writes_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let docs = vec![vec![1, 2, 3], vec![], vec![65535, 0]];
        let p = build(dir.path(), &docs, TokenType::U16);
        let ds = IndexedDataset::open(&p).unwrap();
        assert_eq!(ds.len(), 3);
        assert_eq!(ds.documents(), &[0, 1, 2, 3]);
        for (i, d) in docs.iter().enumerate() {
            assert_eq!(&ds.sequence(i), d);
        }
        assert_eq!(ds.tokens(0, 1, 5), vec![2, 3]);
        let idx = std::fs::read(dir.path().join("ds.idx")).unwrap();
        assert_eq!(&idx[..9], MAGIC);
        assert_eq!(idx[17], 8);
        assert_eq!(idx.len(), HEADER + 12 * 3 + 8 * 4);
    }

    #[test]
    fn refuses_tokens_that_do_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Builder::create(dir.path().join("x"), TokenType::U16, false).unwrap();
        assert!(matches!(
            b.add_document(&[70000]),
            Err(Error::TokenRange { .. })
        ));
        assert!(matches!(
            b.add_document(&[-1]),
            Err(Error::TokenRange { .. })
        ));
    }

    #[test]
    fn refuses_broken_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let p = build(dir.path(), &[vec![1, 2, 3], vec![4]], TokenType::I32);
        let (idx_path, bin_path) = paths(&p);
        let good = std::fs::read(&idx_path).unwrap();
        // Bad magic.
        let mut b = good.clone();
        b[0] = b'X';
        std::fs::write(&idx_path, &b).unwrap();
        assert!(matches!(
            IndexedDataset::open(&p),
            Err(Error::BadIndex { .. })
        ));
        // A count far beyond the file.
        let mut b = good.clone();
        b[18..26].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&idx_path, &b).unwrap();
        let e = IndexedDataset::open(&p).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
        // A truncated .bin.
        std::fs::write(&idx_path, &good).unwrap();
        std::fs::write(&bin_path, [0u8; 12]).unwrap();
        assert!(matches!(
            IndexedDataset::open(&p),
            Err(Error::OutOfBin { seq: 1, .. })
        ));
        // Missing files name the path.
        std::fs::remove_file(&idx_path).unwrap();
        let e = IndexedDataset::open(&p).unwrap_err().to_string();
        assert!(e.contains("ds.idx"), "{e}");
    }

    #[test]
    fn token_type_choice_matches_megatron() {
        assert_eq!(TokenType::for_vocab(32000), TokenType::U16);
        assert_eq!(TokenType::for_vocab(128256), TokenType::I32);
    }
}
