//! The true (unpadded) vocabulary size, read from a tokenizer artifact without
//! loading a tokenizer library: a SentencePiece `.model` (protobuf), a GPT-2
//! style `vocab.json`, or a one-token-per-line vocab file.

/// Errors reading a tokenizer artifact.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The protobuf framing is broken.
    #[error("{file}: malformed SentencePiece model at byte {offset}")]
    BadProtobuf {
        /// The artifact name.
        file: String,
        /// Byte offset of the fault.
        offset: usize,
    },
    /// The JSON did not parse or is not an object.
    #[error("{file}: not a JSON vocabulary object")]
    BadJson {
        /// The artifact name.
        file: String,
    },
}

/// Counts tokens in a tokenizer artifact, by file name and content. Returns
/// `Ok(None)` for a file that is not a vocabulary (a BPE merges file, say).
pub fn vocab_size(name: &str, bytes: &[u8]) -> Result<Option<u64>, Error> {
    if name.ends_with(".model") {
        return sentencepiece_pieces(name, bytes).map(Some);
    }
    if name.ends_with(".json") {
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|_| Error::BadJson {
            file: name.to_string(),
        })?;
        // `tokenizer.json` (HF fast) nests the vocabulary; `vocab.json` is flat.
        let vocab = v.get("model").and_then(|m| m.get("vocab")).unwrap_or(&v);
        let obj = vocab.as_object().ok_or_else(|| Error::BadJson {
            file: name.to_string(),
        })?;
        return Ok(Some(obj.len() as u64));
    }
    if name.ends_with(".vocab") || name.ends_with("vocab.txt") {
        let lines = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count();
        return Ok(Some(lines as u64));
    }
    Ok(None)
}

/// Counts field 1 (`repeated SentencePiece pieces`) of a SentencePiece
/// `ModelProto`, walking the top-level protobuf records.
fn sentencepiece_pieces(name: &str, buf: &[u8]) -> Result<u64, Error> {
    let bad = |offset| Error::BadProtobuf {
        file: name.to_string(),
        offset,
    };
    let mut pos = 0usize;
    let mut count = 0u64;
    while pos < buf.len() {
        let at = pos;
        let key = read_varint(buf, &mut pos).ok_or_else(|| bad(at))?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                read_varint(buf, &mut pos).ok_or_else(|| bad(pos))?;
            }
            1 => {
                pos = pos
                    .checked_add(8)
                    .filter(|p| *p <= buf.len())
                    .ok_or_else(|| bad(pos))?
            }
            2 => {
                let len = read_varint(buf, &mut pos).ok_or_else(|| bad(pos))?;
                let len = usize::try_from(len).map_err(|_| bad(pos))?;
                pos = pos
                    .checked_add(len)
                    .filter(|p| *p <= buf.len())
                    .ok_or_else(|| bad(pos))?;
                if field == 1 {
                    count += 1;
                }
            }
            5 => {
                pos = pos
                    .checked_add(4)
                    .filter(|p| *p <= buf.len())
                    .ok_or_else(|| bad(pos))?
            }
            _ => return Err(bad(at)),
        }
    }
    Ok(count)
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_fixture_sentencepiece() {
        let bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/mcore/tokenizer/tokenizer.model"
        ))
        .unwrap();
        assert_eq!(vocab_size("x_tokenizer.model", &bytes).unwrap(), Some(100));
    }

    #[test]
    fn counts_vocab_files() {
        assert_eq!(
            vocab_size("vocab.json", br#"{"a":0,"b":1}"#).unwrap(),
            Some(2)
        );
        assert_eq!(
            vocab_size(
                "tokenizer.json",
                br#"{"model":{"vocab":{"a":0,"b":1,"c":2}}}"#
            )
            .unwrap(),
            Some(3)
        );
        assert_eq!(vocab_size("t.vocab", b"a\t0\nb\t-1\n").unwrap(), Some(2));
        assert_eq!(vocab_size("merges.txt", b"a b\n").unwrap(), None);
    }

    #[test]
    fn rejects_broken_inputs() {
        assert!(matches!(
            vocab_size("t.model", &[0x0a, 0x10, 1]),
            Err(Error::BadProtobuf { .. })
        ));
        assert!(matches!(
            vocab_size("t.model", &[0x0f]),
            Err(Error::BadProtobuf { .. })
        ));
        assert!(matches!(
            vocab_size("vocab.json", b"[1]"),
            Err(Error::BadJson { .. })
        ));
    }
}
