//! A fast encoder for byte-level BPE `tokenizer.json` files (GPT-2, Llama 3 and Qwen 2 style),
//! giving exactly the `tokenizers` library's ids. It exists for speed: the library tracks
//! offsets and alignments per split, runs a general regex engine and shares one locked word
//! cache between threads; `data make` needs none of that. Here the pre-tokenizer regexes are
//! hand-written matchers (leftmost-first alternation, greedy runs, the `(?!\S)` look-ahead),
//! BPE merges run on byte ids with a per-thread word cache.
//!
//! Exactness by construction where it matters:
//! - Character classes (`\p{L}`, `\p{N}`, `\s`) are read from the library's own regex engine
//!   (oniguruma) once, over every Unicode scalar value, so they follow its Unicode tables.
//! - Only configurations whose every part is understood are taken ([`ByteLevelBpe::from_json`]
//!   returns `None` otherwise and the library encodes everything).
//! - A text containing an added token (`<|endoftext|>`, ...) is left to the library, which
//!   splits such tokens out with options (`lstrip`, `single_word`, ...) not reproduced here.
//!
//! The tests compare splits and ids with the library's on random text over a tricky alphabet.

use std::cell::RefCell;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use serde_json::Value;

/// GPT-2's pattern, the `ByteLevel` pre-tokenizer's own when `use_regex` is on.
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's `Split` pattern (digits in groups of up to three).
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's `Split` pattern (Llama 3's with single digits).
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer patterns implemented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// [`GPT2_PATTERN`].
    Gpt2,
    /// [`LLAMA3_PATTERN`] (`digits` 3) or [`QWEN2_PATTERN`] (`digits` 1).
    Llama3 {
        /// The most digits in one piece.
        digits: usize,
    },
}

impl Pattern {
    /// The pattern whose regex is `re`, if implemented.
    pub fn from_regex(re: &str) -> Option<Pattern> {
        match re {
            GPT2_PATTERN => Some(Pattern::Gpt2),
            LLAMA3_PATTERN => Some(Pattern::Llama3 { digits: 3 }),
            QWEN2_PATTERN => Some(Pattern::Llama3 { digits: 1 }),
            _ => None,
        }
    }
}

const OTHER: u8 = 0;
const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 3;

/// The class of every Unicode scalar value (indexed by code point) as oniguruma sees it:
/// `\p{L}`, `\p{N}`, `\s` or none. `None` if the engine refused the classes (it does not).
fn classes() -> Option<&'static [u8]> {
    static TABLE: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            let all: String = (0..=0x10FFFFu32).filter_map(char::from_u32).collect();
            let mut t = vec![OTHER; 0x110000];
            for (re, class) in [(r"\p{L}+", LETTER), (r"\p{N}+", NUMBER), (r"\s+", SPACE)] {
                let re = tokenizers::utils::SysRegex::new(re).ok()?;
                for (s, e) in re.find_iter(&all) {
                    for c in all[s..e].chars() {
                        t[c as usize] = class;
                    }
                }
            }
            Some(t)
        })
        .as_deref()
}

/// FxHash (rustc's): fast, not DoS-resistant; keys are the tokenizer's own ids and words.
#[derive(Default, Clone, Copy)]
struct Fx(u64);

const FX_K: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Fx {
    fn add(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(FX_K);
    }
}

impl Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            self.add(u64::from_le_bytes(b));
        }
        let r = chunks.remainder();
        if !r.is_empty() {
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(r);
            self.add(u64::from_le_bytes(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

/// GPT-2's byte <-> printable character map (`bytes_to_unicode`): printable Latin-1 bytes map
/// to themselves, the others to U+0100 onwards in byte order.
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        out[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(0xFF + n).unwrap_or('\0')
        };
    }
    out
}

/// A byte-level BPE tokenizer in the subset implemented here.
pub struct ByteLevelBpe {
    pattern: Pattern,
    nfc: bool,
    ignore_merges: bool,
    /// The id of each single byte.
    byte_ids: [u32; 256],
    /// Whole tokens by their bytes (for `ignore_merges`).
    vocab: FxMap<Box<[u8]>, u32>,
    /// `(left << 32 | right)` -> (rank, merged id).
    merges: FxMap<u64, (u32, u32)>,
    /// Added tokens matched in the raw text / in the normalized text.
    added_raw: Option<aho_corasick::AhoCorasick>,
    added_normalized: Option<aho_corasick::AhoCorasick>,
    classes: &'static [u8],
    /// Tells this tokenizer's entries of the per-thread word cache from another's.
    id: u64,
}

impl std::fmt::Debug for ByteLevelBpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteLevelBpe")
            .field("pattern", &self.pattern)
            .field("nfc", &self.nfc)
            .field("merges", &self.merges.len())
            .finish()
    }
}

fn pair(a: u32, b: u32) -> u64 {
    (u64::from(a) << 32) | u64::from(b)
}

/// Words longer than this are encoded without the cache (long CJK runs rarely repeat).
const CACHE_WORD: usize = 64;
const CACHE_ENTRIES: usize = 1 << 17;

type WordCache = FxMap<Box<[u8]>, Box<[u32]>>;

thread_local! {
    static CACHE: RefCell<(u64, WordCache)> = RefCell::new((0, WordCache::default()));
}

impl ByteLevelBpe {
    /// The fast encoder for a parsed `tokenizer.json`, or `None` when any part of it is
    /// outside what this module reproduces exactly (the library then encodes everything).
    pub fn from_json(json: &Value) -> Option<ByteLevelBpe> {
        let nfc = match json.get("normalizer") {
            None | Some(Value::Null) => false,
            Some(n) if n.get("type")?.as_str()? == "NFC" => true,
            Some(_) => return None,
        };
        let pattern = pre_tokenizer(json.get("pre_tokenizer")?)?;
        let model = json.get("model")?;
        let null_or = |key: &str, ok: &dyn Fn(&Value) -> bool| {
            model.get(key).is_none_or(|v| v.is_null() || ok(v))
        };
        if model.get("type")?.as_str()? != "BPE"
            || !null_or("dropout", &|_| false)
            || !null_or("continuing_subword_prefix", &|v| v.as_str() == Some(""))
            || !null_or("end_of_word_suffix", &|v| v.as_str() == Some(""))
            || !null_or("byte_fallback", &|v| v.as_bool() == Some(false))
        {
            return None;
        }
        let ignore_merges = model
            .get("ignore_merges")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let chars = byte_chars();
        let mut char_byte: HashMap<char, u8> = HashMap::new();
        for (b, c) in chars.iter().enumerate() {
            char_byte.insert(*c, b as u8);
        }
        let to_bytes = |s: &str| -> Option<Box<[u8]>> {
            s.chars().map(|c| char_byte.get(&c).copied()).collect()
        };
        let mut vocab: FxMap<Box<[u8]>, u32> = FxMap::default();
        let mut by_string: HashMap<&str, u32> = HashMap::new();
        for (k, v) in model.get("vocab")?.as_object()? {
            let id = u32::try_from(v.as_u64()?).ok()?;
            by_string.insert(k.as_str(), id);
            // tokens outside the byte alphabet (special tokens) are never produced by merges
            if let Some(b) = to_bytes(k) {
                vocab.insert(b, id);
            }
        }
        let mut byte_ids = [0u32; 256];
        for (b, c) in chars.iter().enumerate() {
            byte_ids[b] = *by_string.get(c.to_string().as_str())?;
        }
        let mut merges: FxMap<u64, (u32, u32)> = FxMap::default();
        for (rank, m) in model.get("merges")?.as_array()?.iter().enumerate() {
            let (a, b) = match m {
                Value::String(s) => s.split_once(' ')?,
                Value::Array(v) if v.len() == 2 => (v[0].as_str()?, v[1].as_str()?),
                _ => return None,
            };
            let merged = by_string.get(format!("{a}{b}").as_str())?;
            let key = pair(*by_string.get(a)?, *by_string.get(b)?);
            // a pair listed twice keeps its last rank, as the library's map collects them
            merges.insert(key, (u32::try_from(rank).ok()?, *merged));
        }
        let (mut raw, mut normalized) = (Vec::new(), Vec::new());
        for t in json.get("added_tokens")?.as_array()? {
            let content = t.get("content")?.as_str()?.to_string();
            if content.is_empty() {
                continue;
            }
            if t.get("normalized")
                .and_then(Value::as_bool)
                .unwrap_or(false)
                && nfc
            {
                normalized.push(content);
            } else {
                raw.push(content);
            }
        }
        let automaton = |v: Vec<String>| -> Option<Option<aho_corasick::AhoCorasick>> {
            if v.is_empty() {
                Some(None)
            } else {
                aho_corasick::AhoCorasick::new(v).ok().map(Some)
            }
        };
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Some(ByteLevelBpe {
            pattern,
            nfc,
            ignore_merges,
            byte_ids,
            vocab,
            merges,
            added_raw: automaton(raw)?,
            added_normalized: automaton(normalized)?,
            classes: classes()?,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Appends the ids of `text` to `out`; `false` (nothing appended) when the text holds an
    /// added token or needs a normalization this module leaves to the library.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) -> bool {
        if self.added_raw.as_ref().is_some_and(|a| a.is_match(text)) {
            return false;
        }
        let normalized;
        let text = if self.nfc && !text.is_ascii() {
            let mut n = tokenizers::NormalizedString::from(text);
            if tokenizers::Normalizer::normalize(&tokenizers::normalizers::NFC, &mut n).is_err() {
                return false;
            }
            normalized = n.get().to_string();
            if self
                .added_normalized
                .as_ref()
                .is_some_and(|a| a.is_match(&normalized))
            {
                return false;
            }
            normalized.as_str()
        } else {
            if self
                .added_normalized
                .as_ref()
                .is_some_and(|a| a.is_match(text))
            {
                return false;
            }
            text
        };
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            let (owner, cache) = &mut *c;
            if *owner != self.id {
                *owner = self.id;
                cache.clear();
            }
            let bytes = text.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                let e = match self.pattern {
                    Pattern::Gpt2 => gpt2_piece(bytes, i, self.classes),
                    Pattern::Llama3 { digits } => llama3_piece(bytes, i, self.classes, digits),
                };
                self.word(&bytes[i..e], cache, out);
                i = e;
            }
        });
        true
    }

    /// The ids of one pre-tokenized word.
    fn word(&self, w: &[u8], cache: &mut WordCache, out: &mut Vec<u32>) {
        if w.len() == 1 {
            out.push(self.byte_ids[w[0] as usize]);
            return;
        }
        if self.ignore_merges {
            if let Some(&id) = self.vocab.get(w) {
                out.push(id);
                return;
            }
        }
        if w.len() <= CACHE_WORD {
            if let Some(ids) = cache.get(w) {
                out.extend_from_slice(ids);
                return;
            }
        }
        let mut ids: Vec<u32> = w.iter().map(|&b| self.byte_ids[b as usize]).collect();
        if ids.len() <= 48 {
            self.merge_short(&mut ids);
        } else {
            self.merge_long(&mut ids);
        }
        out.extend_from_slice(&ids);
        if w.len() <= CACHE_WORD {
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(w.into(), ids.into_boxed_slice());
        }
    }

    /// BPE by repeated scans: merge the lowest-ranked adjacent pair, leftmost first, until
    /// none is left (the library's priority-queue order, in O(n²) that wins for short words).
    fn merge_short(&self, ids: &mut Vec<u32>) {
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for p in 0..ids.len().saturating_sub(1) {
                if let Some(&(rank, new)) = self.merges.get(&pair(ids[p], ids[p + 1])) {
                    if best.is_none_or(|b| rank < b.0) {
                        best = Some((rank, p, new));
                    }
                }
            }
            let Some((_, p, new)) = best else { return };
            ids[p] = new;
            ids.remove(p + 1);
        }
    }

    /// The same merges with the library's algorithm: a priority queue of (rank, position)
    /// over a linked list of symbols, stale entries skipped.
    fn merge_long(&self, ids: &mut Vec<u32>) {
        let n = ids.len();
        const NONE: usize = usize::MAX;
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<usize> = (1..=n).map(|i| if i == n { NONE } else { i }).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        for p in 0..n - 1 {
            if let Some(&(rank, new)) = self.merges.get(&pair(ids[p], ids[p + 1])) {
                heap.push(std::cmp::Reverse((rank, p, new)));
            }
        }
        while let Some(std::cmp::Reverse((_, p, new))) = heap.pop() {
            let q = next[p];
            if !alive[p] || q == NONE {
                continue;
            }
            match self.merges.get(&pair(ids[p], ids[q])) {
                Some(&(_, m)) if m == new => {}
                _ => continue,
            }
            ids[p] = new;
            alive[q] = false;
            let r = next[q];
            next[p] = r;
            if r != NONE {
                prev[r] = p;
                if let Some(&(rank, m)) = self.merges.get(&pair(new, ids[r])) {
                    heap.push(std::cmp::Reverse((rank, p, m)));
                }
            }
            let l = prev[p];
            if l != NONE {
                if let Some(&(rank, m)) = self.merges.get(&pair(ids[l], new)) {
                    heap.push(std::cmp::Reverse((rank, l, m)));
                }
            }
        }
        let mut out = Vec::with_capacity(n);
        let mut p = 0;
        while p != NONE {
            out.push(ids[p]);
            p = next[p];
        }
        *ids = out;
    }
}

/// The pre-tokenizer of a `tokenizer.json`, if implemented: `ByteLevel` with its own regex
/// and no prefix space, or `Split(pattern, Isolated)` then `ByteLevel` without regex.
fn pre_tokenizer(p: &Value) -> Option<Pattern> {
    let byte_level = |v: &Value, regex: bool| -> bool {
        v.get("type").and_then(Value::as_str) == Some("ByteLevel")
            && v.get("add_prefix_space").and_then(Value::as_bool) != Some(true)
            && v.get("use_regex").and_then(Value::as_bool).unwrap_or(true) == regex
    };
    if byte_level(p, true) {
        return Some(Pattern::Gpt2);
    }
    if p.get("type")?.as_str()? != "Sequence" {
        return None;
    }
    match p.get("pretokenizers")?.as_array()?.as_slice() {
        [split, bl] if byte_level(bl, false) => {
            if split.get("type")?.as_str()? != "Split"
                || split.get("behavior")?.as_str()? != "Isolated"
                || split
                    .get("invert")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
            {
                return None;
            }
            Pattern::from_regex(split.get("pattern")?.get("Regex")?.as_str()?)
        }
        _ => None,
    }
}

/// The character at byte `i` of valid UTF-8 `s`: (code point, class, length in bytes).
#[inline]
fn at(s: &[u8], i: usize, t: &[u8]) -> (u32, u8, usize) {
    let b = s[i];
    let (c, n) = if b < 0x80 {
        (u32::from(b), 1)
    } else if b < 0xE0 {
        ((u32::from(b & 0x1F) << 6) | u32::from(s[i + 1] & 0x3F), 2)
    } else if b < 0xF0 {
        (
            (u32::from(b & 0x0F) << 12)
                | (u32::from(s[i + 1] & 0x3F) << 6)
                | u32::from(s[i + 2] & 0x3F),
            3,
        )
    } else {
        (
            (u32::from(b & 0x07) << 18)
                | (u32::from(s[i + 1] & 0x3F) << 12)
                | (u32::from(s[i + 2] & 0x3F) << 6)
                | u32::from(s[i + 3] & 0x3F),
            4,
        )
    };
    (c, t[c as usize], n)
}

/// The end of the run of `class` characters starting at `i`.
#[inline]
fn run(s: &[u8], mut i: usize, t: &[u8], class: u8) -> usize {
    while i < s.len() {
        let (_, k, n) = at(s, i, t);
        if k != class {
            break;
        }
        i += n;
    }
    i
}

/// The end of a contraction (`'s`, `'t`, `'re`, `'ve`, `'m`, `'ll`, `'d`) whose letters start
/// at `i`, just after the apostrophe; case-insensitive as oniguruma folds (`ſ` is `s`).
#[inline]
fn contraction(s: &[u8], i: usize, t: &[u8], fold: bool) -> Option<usize> {
    if i >= s.len() {
        return None;
    }
    let lower = |c: u32| -> u32 {
        if !fold {
            return c;
        }
        match c {
            0x41..=0x5A => c + 0x20,
            0x17F => u32::from(b's'),
            _ => c,
        }
    };
    let (c, _, n) = at(s, i, t);
    match char::from_u32(lower(c)) {
        Some('s' | 't' | 'm' | 'd') => Some(i + n),
        Some(first @ ('r' | 'v' | 'l')) => {
            if i + n >= s.len() {
                return None;
            }
            let (c2, _, n2) = at(s, i + n, t);
            let want = if first == 'l' { 'l' } else { 'e' };
            (char::from_u32(lower(c2)) == Some(want)).then_some(i + n + n2)
        }
        _ => None,
    }
}

/// `\s+(?!\S)|\s+` at a whitespace character `i`: the run, less its last character when a
/// non-space follows and the run is longer than one.
#[inline]
fn spaces(s: &[u8], i: usize, t: &[u8]) -> usize {
    let mut e = i;
    let mut last = i;
    while e < s.len() {
        let (_, k, n) = at(s, e, t);
        if k != SPACE {
            break;
        }
        last = e;
        e += n;
    }
    if e == s.len() || last == i {
        e
    } else {
        last
    }
}

/// The end of the piece of [`GPT2_PATTERN`] starting at byte `i`.
fn gpt2_piece(s: &[u8], i: usize, t: &[u8]) -> usize {
    let (c, k, n) = at(s, i, t);
    if c == u32::from(b'\'') {
        if let Some(e) = contraction(s, i + n, t, false) {
            return e;
        }
    }
    if c == u32::from(b' ') && i + 1 < s.len() {
        let (_, k2, _) = at(s, i + 1, t);
        if k2 != SPACE {
            // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
            return run(s, i + 1, t, k2);
        }
    }
    match k {
        SPACE => spaces(s, i, t),
        k => run(s, i, t, k),
    }
}

fn is_crlf(c: u32) -> bool {
    c == u32::from(b'\r') || c == u32::from(b'\n')
}

/// The end of the piece of [`LLAMA3_PATTERN`] (or Qwen 2's) starting at byte `i`.
fn llama3_piece(s: &[u8], i: usize, t: &[u8], digits: usize) -> usize {
    let (c, k, n) = at(s, i, t);
    // (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if c == u32::from(b'\'') {
        if let Some(e) = contraction(s, i + n, t, true) {
            return e;
        }
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if k == LETTER {
        return run(s, i, t, LETTER);
    }
    if k != NUMBER && !is_crlf(c) && i + n < s.len() && at(s, i + n, t).1 == LETTER {
        return run(s, i + n, t, LETTER);
    }
    // \p{N}{1,digits}
    if k == NUMBER {
        let mut e = i + n;
        for _ in 1..digits {
            if e >= s.len() {
                break;
            }
            let (_, k2, n2) = at(s, e, t);
            if k2 != NUMBER {
                break;
            }
            e += n2;
        }
        return e;
    }
    // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
    let other_from = if k == OTHER {
        Some(i)
    } else if c == u32::from(b' ') && i + 1 < s.len() && at(s, i + 1, t).1 == OTHER {
        Some(i + 1)
    } else {
        None
    };
    if let Some(o) = other_from {
        let mut e = run(s, o, t, OTHER);
        while e < s.len() && (s[e] == b'\r' || s[e] == b'\n') {
            e += 1;
        }
        return e;
    }
    // `\s*[\r\n]+`: through the run's last line break, if it has one
    let mut e = i;
    let mut after_break = None;
    while e < s.len() {
        let (c2, k2, n2) = at(s, e, t);
        if k2 != SPACE {
            break;
        }
        e += n2;
        if is_crlf(c2) {
            after_break = Some(e);
        }
    }
    if let Some(b) = after_break {
        return b;
    }
    spaces(s, i, t)
}

#[cfg(test)]
/// Random strings over characters that stress every branch: letters with and without
/// case, `ſ`, digits of several scripts, spaces of several kinds, line breaks, apostrophes,
/// punctuation, emoji, combining marks, CJK, and the Kelvin sign NFC maps to `K`.
pub(crate) fn random_texts(n: usize, seed: u64) -> Vec<String> {
    const ALPHABET: &[&str] = &[
        "a",
        "s",
        "t",
        "r",
        "e",
        "v",
        "l",
        "m",
        "d",
        "S",
        "T",
        "R",
        "E",
        "V",
        "L",
        "M",
        "D",
        "ſ",
        "x",
        "é",
        "e\u{301}",
        "ß",
        "日",
        "本",
        "λ",
        "Ω",
        "\u{212A}",
        "1",
        "2",
        "٣",
        "Ⅻ",
        "½",
        " ",
        " ",
        " ",
        "  ",
        "\t",
        "\n",
        "\r",
        "\r\n",
        "\u{3000}",
        "\u{a0}",
        "\u{85}",
        "\u{200b}",
        "'",
        "'",
        "''",
        ".",
        ",",
        "!",
        "-",
        "—",
        "🦀",
        "(",
        ")",
        "\u{1F3FD}",
        "<|endoftext|>",
        "<|end",
    ];
    let mut state = seed | 1;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|_| {
            let len = (rand() % 24) as usize;
            (0..len)
                .map(|_| ALPHABET[(rand() % ALPHABET.len() as u64) as usize])
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn our_pieces(p: Pattern, text: &str) -> Vec<String> {
        let t = classes().expect("classes");
        let s = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.len() {
            let e = match p {
                Pattern::Gpt2 => gpt2_piece(s, i, t),
                Pattern::Llama3 { digits } => llama3_piece(s, i, t, digits),
            };
            assert!(e > i, "no progress at {i} in {text:?}");
            out.push(text[i..e].to_string());
            i = e;
        }
        out
    }

    fn library_pieces(re: &tokenizers::utils::SysRegex, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut prev = 0;
        for (s, e) in re.find_iter(text) {
            if s != prev {
                out.push(text[prev..s].to_string());
            }
            out.push(text[s..e].to_string());
            prev = e;
        }
        if prev != text.len() {
            out.push(text[prev..].to_string());
        }
        out
    }

    #[test]
    fn pieces_equal_the_regex_engine() {
        for (re, p) in [
            (GPT2_PATTERN, Pattern::Gpt2),
            (LLAMA3_PATTERN, Pattern::Llama3 { digits: 3 }),
            (QWEN2_PATTERN, Pattern::Llama3 { digits: 1 }),
        ] {
            assert_eq!(Pattern::from_regex(re), Some(p));
            let engine = tokenizers::utils::SysRegex::new(re).expect("regex");
            for text in random_texts(20_000, 0x9e37_79b9_7f4a_7c15) {
                assert_eq!(
                    our_pieces(p, &text),
                    library_pieces(&engine, &text),
                    "{p:?} on {text:?}"
                );
            }
        }
    }

    #[test]
    fn classes_follow_the_engine() {
        let t = classes().expect("classes");
        assert_eq!(t['a' as usize], LETTER);
        assert_eq!(t['ſ' as usize], LETTER);
        assert_eq!(t['٣' as usize], NUMBER);
        assert_eq!(t['Ⅻ' as usize], NUMBER);
        assert_eq!(t['\u{3000}' as usize], SPACE);
        assert_eq!(t['\u{85}' as usize], SPACE);
        assert_eq!(t['\u{200b}' as usize], OTHER);
        assert_eq!(t['\u{301}' as usize], OTHER);
    }

    #[test]
    fn byte_chars_are_gpt2s() {
        let c = byte_chars();
        assert_eq!(c[b' ' as usize], 'Ġ');
        assert_eq!(c[b'\n' as usize], 'Ċ');
        assert_eq!(c[b'a' as usize], 'a');
        assert_eq!(c[0xAD], 'Ń');
        let distinct: std::collections::HashSet<char> = c.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
