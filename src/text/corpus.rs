//! Raw-text corpora: JSON Lines (`.jsonl`, `.json`) with one document per line, or plain text
//! with one document per line, either compressed with gzip (`.gz`) or zstd (`.zst`). Lines are read as bytes and
//! checked one by one, so a bad line is reported with its file and line number.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Errors reading a corpus file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A compression this build does not read.
    #[error("{path}: {why}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// Why one line is not a document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadLine {
    /// Not UTF-8.
    #[error("not UTF-8 (byte {0})")]
    NotUtf8(usize),
    /// Not a JSON object.
    #[error("not a JSON object: {0}")]
    NotJson(String),
    /// A JSON key is missing or not a string (nor a list of strings).
    #[error("key `{0}` is missing or not text")]
    MissingKey(String),
    /// A blank line in JSON Lines.
    #[error("blank line (JSON Lines has one object per line)")]
    Blank,
}

/// How a file's lines are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One JSON object per line; the texts are under the JSON keys.
    JsonLines,
    /// One document per line (the line without its `\n` / `\r\n`).
    PlainText,
}

/// A corpus file, opened.
pub struct CorpusFile {
    /// The path.
    pub path: PathBuf,
    /// How lines are read.
    pub kind: Kind,
    reader: Box<dyn BufRead + Send>,
    line: u64,
}

impl std::fmt::Debug for CorpusFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CorpusFile")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("line", &self.line)
            .finish()
    }
}

/// One raw line and where it came from.
#[derive(Debug, Clone)]
pub struct RawLine {
    /// 1-based line number.
    pub line: u64,
    /// The bytes, without the line ending.
    pub bytes: Vec<u8>,
}

/// The kind a file name implies (after a `.gz`): `.jsonl` / `.json` are JSON Lines, anything
/// else plain text.
pub fn kind_of(path: &Path) -> Kind {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let name = name
        .strip_suffix(".gz")
        .or_else(|| name.strip_suffix(".zst"))
        .unwrap_or(name);
    if name.ends_with(".jsonl") || name.ends_with(".json") {
        Kind::JsonLines
    } else {
        Kind::PlainText
    }
}

impl CorpusFile {
    /// Opens `path` (gzip when it ends in `.gz`, zstd in `.zst`).
    ///
    /// # Errors
    /// [`Error::Io`]; [`Error::Unsupported`] for `.xz` / `.bz2`.
    pub fn open(path: &Path) -> Result<CorpusFile, Error> {
        let name = path.to_string_lossy();
        for ext in [".xz", ".bz2"] {
            if name.ends_with(ext) {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    why: format!("{ext} is not read: decompress it, or use .gz or .zst"),
                });
            }
        }
        let f = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: Box<dyn Read + Send> = if name.ends_with(".gz") {
            Box::new(flate2::read::MultiGzDecoder::new(f))
        } else if name.ends_with(".zst") {
            Box::new(
                ruzstd::decoding::StreamingDecoder::new(BufReader::new(f)).map_err(|e| {
                    Error::Unsupported {
                        path: path.to_path_buf(),
                        why: format!("not a zstd stream: {e}"),
                    }
                })?,
            )
        } else {
            Box::new(f)
        };
        Ok(CorpusFile {
            path: path.to_path_buf(),
            kind: kind_of(path),
            reader: Box::new(BufReader::with_capacity(1 << 20, raw)),
            line: 0,
        })
    }

    /// The next line, or None at the end.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn next_line(&mut self) -> Result<Option<RawLine>, Error> {
        let mut bytes = Vec::new();
        let n = self
            .reader
            .read_until(b'\n', &mut bytes)
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        Ok(Some(RawLine {
            line: self.line,
            bytes,
        }))
    }
}

/// The texts of one line, one entry per key (a JSON value that is a list of strings is one
/// text per element, as Megatron's script takes pre-split sentences); plain text has one.
pub fn texts(kind: Kind, bytes: &[u8], keys: &[String]) -> Result<Vec<Vec<String>>, BadLine> {
    let s = std::str::from_utf8(bytes).map_err(|e| BadLine::NotUtf8(e.valid_up_to()))?;
    match kind {
        Kind::PlainText => Ok(vec![vec![s.to_string()]]),
        Kind::JsonLines => {
            if s.trim().is_empty() {
                return Err(BadLine::Blank);
            }
            let v: serde_json::Value =
                serde_json::from_str(s).map_err(|e| BadLine::NotJson(e.to_string()))?;
            let o = v
                .as_object()
                .ok_or_else(|| BadLine::NotJson("not an object".into()))?;
            keys.iter()
                .map(|k| match o.get(k) {
                    Some(serde_json::Value::String(t)) => Ok(vec![t.clone()]),
                    Some(serde_json::Value::Array(a)) => a
                        .iter()
                        .map(|x| x.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| BadLine::MissingKey(k.clone())),
                    _ => Err(BadLine::MissingKey(k.clone())),
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_their_faults() {
        let keys = vec!["text".to_string(), "title".to_string()];
        let j = |s: &str| texts(Kind::JsonLines, s.as_bytes(), &keys);
        assert_eq!(
            j(r#"{"text": "a b", "title": ["x", "y"]}"#),
            Ok(vec![
                vec!["a b".to_string()],
                vec!["x".to_string(), "y".to_string()]
            ])
        );
        assert_eq!(
            j(r#"{"text": "a"}"#),
            Err(BadLine::MissingKey("title".into()))
        );
        assert_eq!(
            j(r#"{"text": 1, "title": ""}"#),
            Err(BadLine::MissingKey("text".into()))
        );
        assert_eq!(j("  "), Err(BadLine::Blank));
        assert!(matches!(j("{\"text\": "), Err(BadLine::NotJson(_))));
        assert!(matches!(j("[1]"), Err(BadLine::NotJson(_))));
        assert_eq!(
            texts(Kind::JsonLines, b"{\"text\": \"\xff\"}", &keys),
            Err(BadLine::NotUtf8(10))
        );
        assert_eq!(
            texts(Kind::PlainText, b"  two  spaces ", &keys),
            Ok(vec![vec!["  two  spaces ".to_string()]])
        );
        assert_eq!(kind_of(Path::new("a/b.jsonl.gz")), Kind::JsonLines);
        assert_eq!(kind_of(Path::new("a/b.txt")), Kind::PlainText);
    }

    #[test]
    fn reads_plain_and_gzip_lines() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.txt.gz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&p).unwrap(),
            flate2::Compression::default(),
        );
        gz.write_all(b"one\r\n\ntwo").unwrap();
        gz.finish().unwrap();
        let mut f = CorpusFile::open(&p).unwrap();
        let mut got = Vec::new();
        while let Some(l) = f.next_line().unwrap() {
            got.push((l.line, String::from_utf8(l.bytes).unwrap()));
        }
        assert_eq!(
            got,
            vec![(1, "one".into()), (2, String::new()), (3, "two".into())]
        );
        // zstd (one frame, as the zstd tool writes)
        let z = dir.path().join("c.jsonl.zst");
        let packed = ruzstd::encoding::compress_to_vec(
            &b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n"[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        std::fs::write(&z, packed).unwrap();
        let mut f = CorpusFile::open(&z).unwrap();
        assert_eq!(f.kind, Kind::JsonLines);
        let mut n = 0;
        while let Some(l) = f.next_line().unwrap() {
            n += 1;
            assert!(l.bytes.starts_with(b"{\"text\""));
        }
        assert_eq!(n, 2);
        let e = CorpusFile::open(&dir.path().join("x.jsonl.xz")).unwrap_err();
        assert!(e.to_string().contains(".xz is not read"), "{e}");
    }
}
