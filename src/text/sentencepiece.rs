//! SentencePiece BPE models (`tokenizer.model`, Llama 2 style), encoded as the C++ library
//! encodes them (`SentencePieceProcessor::EncodeAsIds`), without the library:
//!
//! * the `ModelProto` is read with a small protobuf reader (pieces with score and type; the
//!   trainer's model type, byte fallback and special ids; the normalizer's flags);
//! * normalization is the `identity` rule (no precompiled character map; other rules are
//!   refused): leading, trailing and repeated spaces removed (`remove_extra_whitespaces`), a
//!   dummy-prefix space (`add_dummy_prefix`), spaces written as `▁`;
//! * BPE: the text split into characters (user-defined pieces matched whole, longest first, and
//!   never merged), then the adjacent pair whose concatenation is a piece with the highest score
//!   merged, leftmost first on ties, until none is; `UNUSED` pieces split back into their
//!   parts;
//! * a piece not in the vocabulary is the unknown id, consecutive unknowns one id; with byte
//!   fallback its UTF-8 bytes as `<0xXX>` pieces instead.
//!
//! Unigram models are refused (not implemented).

use std::collections::{BinaryHeap, HashMap};

/// Why a model cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The protobuf is malformed.
    #[error("not a SentencePiece model: {0}")]
    Parse(String),
    /// A feature this reader does not implement.
    #[error("{0}")]
    Unsupported(String),
}

/// `SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

/// A SentencePiece BPE model.
#[derive(Debug)]
pub struct SentencePiece {
    /// Normal, user-defined and unused pieces (what merges may form), to their id.
    pieces: HashMap<String, u32>,
    /// Unknown, control and byte pieces, to their id.
    reserved: HashMap<String, u32>,
    scores: Vec<f32>,
    types: Vec<PieceType>,
    /// User-defined pieces, longest first (matched whole before splitting into characters).
    user_defined: Vec<String>,
    unk: u32,
    eos: Option<u32>,
    byte_fallback: bool,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

/// A protobuf wire-format reader over one message.
struct Wire<'a> {
    b: &'a [u8],
    i: usize,
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
    Fixed64,
}

impl<'a> Wire<'a> {
    fn varint(&mut self) -> Result<u64, Error> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .b
                .get(self.i)
                .ok_or_else(|| Error::Parse("truncated varint".into()))?;
            self.i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(v);
            }
        }
        Err(Error::Parse("varint too long".into()))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self
            .i
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| Error::Parse("truncated field".into()))?;
        let s = &self.b[self.i..end];
        self.i = end;
        Ok(s)
    }

    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, Error> {
        if self.i >= self.b.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let f = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Fixed64
            }
            2 => {
                let n = usize::try_from(self.varint()?)
                    .map_err(|_| Error::Parse("length too large".into()))?;
                Field::Bytes(self.take(n)?)
            }
            5 => {
                let s = self.take(4)?;
                Field::Fixed32(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
            }
            w => return Err(Error::Parse(format!("wire type {w}"))),
        };
        Ok(Some((key >> 3, f)))
    }
}

fn text(b: &[u8]) -> Result<String, Error> {
    String::from_utf8(b.to_vec()).map_err(|_| Error::Parse("a piece is not UTF-8".into()))
}

/// A scored merge candidate: higher score first, then the leftmost.
#[derive(Debug, PartialEq)]
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Eq for Pair {}

impl Ord for Pair {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl PartialOrd for Pair {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
    freeze: bool,
}

impl SentencePiece {
    /// Reads a serialized `ModelProto`.
    ///
    /// # Errors
    /// [`Error::Parse`]; [`Error::Unsupported`] for unigram/word/char models and normalization
    /// rules other than identity.
    pub fn from_bytes(b: &[u8]) -> Result<SentencePiece, Error> {
        let mut pieces_raw: Vec<(String, f32, PieceType)> = Vec::new();
        let (mut model_type, mut byte_fallback) = (1u64, false);
        let (mut unk, mut eos) = (0u64, 2i64);
        let (mut norm_name, mut charsmap_len) = (String::new(), 0usize);
        let (mut dummy, mut extra, mut escape) = (true, true, true);
        let mut w = Wire { b, i: 0 };
        while let Some((tag, f)) = w.next()? {
            match (tag, f) {
                (1, Field::Bytes(p)) => {
                    let mut pw = Wire { b: p, i: 0 };
                    let (mut piece, mut score, mut ty) = (String::new(), 0f32, 1u64);
                    while let Some((t, f)) = pw.next()? {
                        match (t, f) {
                            (1, Field::Bytes(s)) => piece = text(s)?,
                            (2, Field::Fixed32(x)) => score = f32::from_bits(x),
                            (3, Field::Varint(x)) => ty = x,
                            _ => {}
                        }
                    }
                    let ty = match ty {
                        1 => PieceType::Normal,
                        2 => PieceType::Unknown,
                        3 => PieceType::Control,
                        4 => PieceType::UserDefined,
                        5 => PieceType::Unused,
                        6 => PieceType::Byte,
                        t => return Err(Error::Parse(format!("piece type {t}"))),
                    };
                    pieces_raw.push((piece, score, ty));
                }
                (2, Field::Bytes(t)) => {
                    let mut tw = Wire { b: t, i: 0 };
                    while let Some((tag, f)) = tw.next()? {
                        match (tag, f) {
                            (3, Field::Varint(x)) => model_type = x,
                            (35, Field::Varint(x)) => byte_fallback = x != 0,
                            (40, Field::Varint(x)) => unk = x,
                            // a negative id (none) is a ten-byte varint
                            (42, Field::Varint(x)) => eos = x as i64,
                            (24, Field::Varint(x)) if x != 0 => {
                                return Err(Error::Unsupported(
                                    "treat_whitespace_as_suffix models are not supported".into(),
                                ))
                            }
                            _ => {}
                        }
                    }
                }
                (3, Field::Bytes(n)) => {
                    let mut nw = Wire { b: n, i: 0 };
                    while let Some((tag, f)) = nw.next()? {
                        match (tag, f) {
                            (1, Field::Bytes(s)) => norm_name = text(s)?,
                            (2, Field::Bytes(s)) => charsmap_len = s.len(),
                            (3, Field::Varint(x)) => dummy = x != 0,
                            (4, Field::Varint(x)) => extra = x != 0,
                            (5, Field::Varint(x)) => escape = x != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if model_type != 2 {
            let name = match model_type {
                1 => "unigram",
                3 => "word",
                4 => "char",
                _ => "unknown",
            };
            return Err(Error::Unsupported(format!(
                "SentencePiece {name} models are not supported yet (BPE models are)"
            )));
        }
        if charsmap_len > 0 {
            return Err(Error::Unsupported(format!(
                "SentencePiece normalization rule `{norm_name}` (a precompiled character map) is not supported yet (identity is)"
            )));
        }
        let mut m = SentencePiece {
            pieces: HashMap::new(),
            reserved: HashMap::new(),
            scores: Vec::with_capacity(pieces_raw.len()),
            types: Vec::with_capacity(pieces_raw.len()),
            user_defined: Vec::new(),
            unk: u32::try_from(unk).map_err(|_| Error::Parse("unk_id".into()))?,
            eos: u32::try_from(eos)
                .ok()
                .filter(|&e| (e as usize) < pieces_raw.len()),
            byte_fallback,
            add_dummy_prefix: dummy,
            remove_extra_whitespaces: extra,
            escape_whitespaces: escape,
        };
        for (id, (piece, score, ty)) in pieces_raw.into_iter().enumerate() {
            let id = id as u32;
            match ty {
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused => {
                    if ty == PieceType::UserDefined {
                        m.user_defined.push(piece.clone());
                    }
                    m.pieces.insert(piece, id);
                }
                _ => {
                    m.reserved.insert(piece, id);
                }
            }
            m.scores.push(score);
            m.types.push(ty);
        }
        if m.types.get(m.unk as usize) != Some(&PieceType::Unknown) {
            return Err(Error::Parse(format!(
                "unk_id {} is not an unknown piece",
                m.unk
            )));
        }
        m.user_defined.sort_by_key(|u| std::cmp::Reverse(u.len()));
        Ok(m)
    }

    /// Number of pieces.
    pub fn vocab_size(&self) -> u64 {
        self.types.len() as u64
    }

    /// The EOS id (`eos_id`), if the model has one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    fn piece_to_id(&self, p: &str) -> u32 {
        self.reserved
            .get(p)
            .or_else(|| self.pieces.get(p))
            .copied()
            .unwrap_or(self.unk)
    }

    /// The identity normalizer.
    fn normalize(&self, text: &str) -> String {
        let space = if self.escape_whitespaces {
            "\u{2581}"
        } else {
            " "
        };
        let mut s = text;
        if self.remove_extra_whitespaces {
            s = s.trim_start_matches(' ');
        }
        if s.is_empty() {
            return String::new();
        }
        let mut out = String::with_capacity(s.len() + 8);
        if self.add_dummy_prefix {
            out.push_str(space);
        }
        let mut prev_space = self.remove_extra_whitespaces;
        for c in s.chars() {
            if c == ' ' {
                if !prev_space {
                    out.push_str(space);
                }
                prev_space = self.remove_extra_whitespaces;
            } else {
                out.push(c);
                prev_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        out
    }

    /// Token ids of `text` (no BOS/EOS), as `EncodeAsIds`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let norm = self.normalize(text);
        let mut symbols: Vec<Symbol> = Vec::new();
        let mut i = 0;
        while i < norm.len() {
            let rest = &norm[i..];
            let (len, freeze) = match self
                .user_defined
                .iter()
                .find(|u| rest.starts_with(u.as_str()))
            {
                Some(u) => (u.len(), true),
                None => (rest.chars().next().map_or(1, char::len_utf8), false),
            };
            let n = symbols.len();
            symbols.push(Symbol {
                start: i,
                len,
                prev: n.checked_sub(1),
                next: (i + len < norm.len()).then_some(n + 1),
                freeze,
            });
            i += len;
        }
        let mut agenda = BinaryHeap::new();
        let mut rev_merge: HashMap<(usize, usize), (usize, usize, usize)> = HashMap::new();
        let add = |l: Option<usize>,
                   r: Option<usize>,
                   symbols: &[Symbol],
                   agenda: &mut BinaryHeap<Pair>,
                   rev: &mut HashMap<(usize, usize), (usize, usize, usize)>| {
            let (Some(l), Some(r)) = (l, r) else { return };
            let (a, b) = (&symbols[l], &symbols[r]);
            if a.freeze || b.freeze {
                return;
            }
            let size = a.len + b.len;
            let Some(&id) = self.pieces.get(&norm[a.start..a.start + size]) else {
                return;
            };
            agenda.push(Pair {
                score: self.scores[id as usize],
                left: l,
                right: r,
                size,
            });
            if self.types[id as usize] == PieceType::Unused {
                rev.insert((a.start, size), (a.start, a.len, b.len));
            }
        };
        for k in 1..symbols.len() {
            add(Some(k - 1), Some(k), &symbols, &mut agenda, &mut rev_merge);
        }
        while let Some(top) = agenda.pop() {
            let (l, r) = (top.left, top.right);
            if symbols[l].len == 0
                || symbols[r].len == 0
                || symbols[l].len + symbols[r].len != top.size
            {
                continue;
            }
            symbols[l].len += symbols[r].len;
            symbols[l].next = symbols[r].next;
            if let Some(n) = symbols[r].next {
                symbols[n].prev = Some(l);
            }
            symbols[r].len = 0;
            let prev = symbols[l].prev;
            let next = symbols[l].next;
            add(prev, Some(l), &symbols, &mut agenda, &mut rev_merge);
            add(Some(l), next, &symbols, &mut agenda, &mut rev_merge);
        }
        // pieces in order, UNUSED ones split back into their parts
        let mut out: Vec<(usize, usize)> = Vec::new();
        fn resegment(
            m: &SentencePiece,
            norm: &str,
            start: usize,
            len: usize,
            rev: &HashMap<(usize, usize), (usize, usize, usize)>,
            out: &mut Vec<(usize, usize)>,
        ) {
            let id = m.piece_to_id(&norm[start..start + len]);
            if m.types[id as usize] == PieceType::Unused {
                if let Some(&(s, a, b)) = rev.get(&(start, len)) {
                    resegment(m, norm, s, a, rev, out);
                    resegment(m, norm, s + a, b, rev, out);
                    return;
                }
            }
            out.push((start, len));
        }
        let mut at = (!symbols.is_empty()).then_some(0);
        while let Some(k) = at {
            resegment(
                self,
                &norm,
                symbols[k].start,
                symbols[k].len,
                &rev_merge,
                &mut out,
            );
            at = symbols[k].next;
        }
        let mut ids = Vec::with_capacity(out.len());
        let mut last_unk = false;
        for (s, len) in out {
            let piece = &norm[s..s + len];
            let id = self.piece_to_id(piece);
            if id == self.unk {
                if self.byte_fallback {
                    for byte in piece.bytes() {
                        ids.push(self.piece_to_id(&format!("<0x{byte:02X}>")));
                    }
                    last_unk = false;
                    continue;
                }
                if last_unk {
                    continue; // consecutive unknowns are one
                }
                last_unk = true;
            } else {
                last_unk = false;
            }
            ids.push(id);
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &[u8] = include_bytes!("../../fixtures/mcore/tokenizer/tokenizer.model");

    #[test]
    fn reads_the_fixture_model() {
        let m = SentencePiece::from_bytes(FIXTURE).unwrap();
        assert_eq!((m.vocab_size(), m.eos(), m.unk), (100, Some(2), 0));
        assert_eq!(m.normalize("  a  b "), "\u{2581}a\u{2581}b");
        assert_eq!(m.normalize("   "), "");
        // what sentencepiece 0.2 gives for this text with this model
        assert_eq!(
            m.encode("Hello  world, héllo 日本 \t end"),
            vec![
                46, 96, 47, 58, 58, 49, 32, 13, 58, 57, 65, 46, 55, 0, 58, 58, 49, 46, 0, 46, 0,
                46, 11, 57
            ]
        );
    }

    #[test]
    fn refuses_what_it_does_not_implement() {
        assert!(SentencePiece::from_bytes(b"\x0a").is_err());
        // an empty ModelProto: a unigram model
        let e = SentencePiece::from_bytes(b"").unwrap_err();
        assert!(e.to_string().contains("unigram"), "{e}");
    }
}
