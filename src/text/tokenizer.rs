//! The tokenizer `data make` encodes text with, as Megatron's `preprocess_data.py` calls it:
//! the text's own tokens, no special tokens added (megatron-core's `HuggingFaceTokenizer` with
//! `include_special_tokens: false`), the end-of-document id being the tokenizer's EOS token.
//!
//! Hugging Face `tokenizer.json` files are read by the `tokenizers` crate, the library
//! transformers' fast tokenizers are built on, so ids are the Python library's by construction.
//! SentencePiece `tokenizer.model` files (BPE) by our own encoder ([`super::sentencepiece`]),
//! as megatron-core's `SentencePieceTokenizer` calls the C++ library (`encode_as_ids`; EOD =
//! `eos_id`).

use std::path::{Path, PathBuf};

/// Errors opening or running a tokenizer; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read or parsed.
    #[error("{path}: {why}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A tokenizer kind not read yet.
    #[error("{path}: {why}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Encoding failed.
    #[error("tokenizing: {0}")]
    Encode(String),
}

/// A tokenizer loaded from disk.
pub struct Tokenizer {
    inner: Inner,
    eos: Option<u32>,
    path: PathBuf,
}

enum Inner {
    /// The library, and our fast encoder when the file is in its subset.
    Hf(
        Box<tokenizers::Tokenizer>,
        Option<Box<super::bytelevel::ByteLevelBpe>>,
    ),
    Spm(super::sentencepiece::SentencePiece),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("eos", &self.eos)
            .finish()
    }
}

/// The EOS token named by `tokenizer_config.json` or `special_tokens_map.json` beside the
/// tokenizer (a string, or an object with `content`), as transformers reads it.
fn eos_token_name(dir: &Path) -> Option<String> {
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let Ok(text) = std::fs::read(dir.join(name)) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) else {
            continue;
        };
        match v.get("eos_token") {
            Some(serde_json::Value::String(s)) => return Some(s.clone()),
            Some(serde_json::Value::Object(o)) => {
                if let Some(s) = o.get("content").and_then(|c| c.as_str()) {
                    return Some(s.to_string());
                }
            }
            _ => {}
        }
    }
    None
}

impl Tokenizer {
    /// Opens `path`: a `tokenizer.json` or a SentencePiece `tokenizer.model`, a folder
    /// holding one (a Hugging Face model folder: `tokenizer.json` first), or a `.nemo` (file or
    /// extracted folder) whose config references its tokenizer artifact (`tokenizer.model`,
    /// `tokenizer.vocab_file`). A `tokenizer.json`'s EOS token comes from
    /// `tokenizer_config.json` / `special_tokens_map.json` in the same folder, when one names
    /// it; a SentencePiece model's is its `eos_id`.
    ///
    /// # Errors
    /// [`Error::Open`] for an unreadable file or a `.nemo` without a tokenizer artifact,
    /// [`Error::Unsupported`] for SentencePiece models this reader does not implement.
    pub fn open(path: &Path) -> Result<Tokenizer, Error> {
        let is_nemo = path.extension().is_some_and(|e| e == "nemo")
            || path.join(crate::model::checkpoint::CONFIG_MEMBER).is_file();
        if is_nemo {
            return Self::from_nemo(path);
        }
        let file = if path.is_dir() {
            let f = path.join("tokenizer.json");
            match (f.exists(), path.join("tokenizer.model")) {
                (false, spm) if spm.exists() => spm,
                _ => f,
            }
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&file).map_err(|e| Error::Open {
            path: file.clone(),
            why: e.to_string(),
        })?;
        let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
        Self::from_bytes(&bytes, file, Some(&dir))
    }

    /// The tokenizer artifact a `.nemo`'s config references.
    fn from_nemo(path: &Path) -> Result<Tokenizer, Error> {
        let open = |why: String| Error::Open {
            path: path.to_path_buf(),
            why,
        };
        let ck =
            crate::model::checkpoint::Checkpoint::open(path).map_err(|e| open(e.to_string()))?;
        let refs = ck.config.artifact_refs();
        let Some(r) = refs
            .iter()
            .find(|r| ck.artifacts.contains(&r.name) && r.key != "tokenizer.merge_file")
        else {
            return Err(open(
                "no tokenizer artifact (tokenizer.model or tokenizer.vocab_file as nemo:<member>) in its config"
                    .into(),
            ));
        };
        let bytes = ck
            .read_member(&r.name)
            .map_err(|e| open(format!("{}: {e}", r.name)))?;
        let name = PathBuf::from(format!("{}:{}", path.display(), r.name));
        Self::from_bytes(bytes.as_slice(), name, None)
    }

    /// A tokenizer from its file's bytes: a `tokenizer.json` (a JSON object) or a
    /// SentencePiece `ModelProto`; `dir` holds a tokenizer.json's config files.
    fn from_bytes(bytes: &[u8], file: PathBuf, dir: Option<&Path>) -> Result<Tokenizer, Error> {
        let open = |why: String| Error::Open {
            path: file.clone(),
            why,
        };
        // a tokenizer.json is a JSON object; anything else is taken for a ModelProto
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            let m =
                super::sentencepiece::SentencePiece::from_bytes(bytes).map_err(|e| match e {
                    super::sentencepiece::Error::Unsupported(why) => Error::Unsupported {
                        path: file.clone(),
                        why,
                    },
                    e => open(e.to_string()),
                })?;
            return Ok(Tokenizer {
                eos: m.eos(),
                inner: Inner::Spm(m),
                path: file,
            });
        }
        let mut inner =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| open(e.to_string()))?;
        // transformers turns a tokenizer.json's truncation and padding off for an encode
        // without those arguments, as megatron-core calls it
        inner
            .with_truncation(None)
            .map_err(|e| open(e.to_string()))?;
        inner.with_padding(None);
        let fast = serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|v| super::bytelevel::ByteLevelBpe::from_json(&v))
            .map(Box::new);
        let eos = dir
            .and_then(eos_token_name)
            .and_then(|t| inner.token_to_id(&t));
        Ok(Tokenizer {
            inner: Inner::Hf(Box::new(inner), fast),
            eos,
            path: file,
        })
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text`, without special tokens.
    ///
    /// # Errors
    /// [`Error::Encode`] when the library fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, Error> {
        match &self.inner {
            Inner::Hf(_, Some(fast)) => {
                let mut ids = Vec::new();
                if fast.encode(text, &mut ids) {
                    return Ok(ids);
                }
                self.encode_library(text)
            }
            Inner::Hf(_, None) => self.encode_library(text),
            Inner::Spm(m) => Ok(m.encode(text)),
        }
    }

    /// [`Tokenizer::encode`] by the `tokenizers` library alone (for a `tokenizer.json`).
    ///
    /// # Errors
    /// [`Error::Encode`] when the library fails.
    pub fn encode_library(&self, text: &str) -> Result<Vec<u32>, Error> {
        match &self.inner {
            Inner::Hf(t, _) => t
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Encode(e.to_string())),
            Inner::Spm(m) => Ok(m.encode(text)),
        }
    }

    /// What encodes text: `bytelevel-bpe` (our encoder, [`super::bytelevel`]; texts holding
    /// an added token go to the library), `tokenizers` (the library) or `sentencepiece-bpe`
    /// (ours, [`super::sentencepiece`]).
    pub fn encoder(&self) -> &'static str {
        match self.inner {
            Inner::Hf(_, Some(_)) => "bytelevel-bpe",
            Inner::Hf(_, None) => "tokenizers",
            Inner::Spm(_) => "sentencepiece-bpe",
        }
    }

    /// Whether a `tokenizer.json` is encoded by our fast byte-level BPE encoder
    /// ([`super::bytelevel`]) rather than the library.
    pub fn is_fast(&self) -> bool {
        matches!(self.inner, Inner::Hf(_, Some(_)))
    }

    /// The end-of-document id (the EOS token), when the tokenizer's config names one.
    pub fn eod(&self) -> Option<u32> {
        self.eos
    }

    /// Vocabulary size with added tokens (`len(tokenizer)` in transformers, what Megatron
    /// picks the token type by).
    pub fn vocab_size(&self) -> u64 {
        match &self.inner {
            Inner::Hf(t, _) => t.get_vocab_size(true) as u64,
            Inner::Spm(m) => m.vocab_size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::bytelevel::{random_texts, LLAMA3_PATTERN, QWEN2_PATTERN};
    use serde_json::json;

    /// A byte-level BPE trained by the library on `texts`, as `tokenizer.json` (GPT-2 style).
    fn trained(texts: &[String]) -> serde_json::Value {
        use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        let mut tok = tokenizers::Tokenizer::new(BPE::default());
        tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        let mut trainer: tokenizers::models::TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(3000)
            .show_progress(false)
            .special_tokens(vec![tokenizers::AddedToken::from("<|endoftext|>", true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        tok.train(&mut trainer, texts.iter()).expect("train");
        serde_json::from_str(&tok.to_string(false).expect("json")).expect("parse")
    }

    fn split_then_byte_level(pattern: &str) -> serde_json::Value {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
    }

    /// Our encoder gives the library's ids for GPT-2, Llama 3 (with `ignore_merges`) and
    /// Qwen 2 (NFC, a normalized added token) style files, on random text over a tricky
    /// alphabet, long runs included; texts with added tokens go to the library.
    #[test]
    fn fast_byte_level_bpe_equals_the_library() {
        let mut texts = random_texts(4000, 7);
        texts.extend(
            [
                "The quick brown fox's tail isn't THE DOG'S. We'll see, they've gone.",
                "numbers 1234567890 and 3.14159, tabs\tand\r\nnew lines\n\n  ",
            ]
            .map(String::from),
        );
        let json = trained(&texts);
        let long: Vec<String> = (0..40)
            .map(|k| random_texts(300, 100 + k).concat())
            .chain([
                "日本語のテキスト".repeat(30),
                "ab".repeat(500),
                " ".repeat(300),
            ])
            .collect();
        let mut llama3 = json.clone();
        llama3["pre_tokenizer"] = split_then_byte_level(LLAMA3_PATTERN);
        llama3["model"]["ignore_merges"] = json!(true);
        let mut qwen2 = json.clone();
        qwen2["pre_tokenizer"] = split_then_byte_level(QWEN2_PATTERN);
        qwen2["normalizer"] = json!({"type": "NFC"});
        let next = qwen2["model"]["vocab"].as_object().map_or(0, |v| v.len());
        qwen2["added_tokens"]
            .as_array_mut()
            .expect("added tokens")
            .push(json!({"id": next, "content": "K1", "single_word": false,
                         "lstrip": false, "rstrip": false, "normalized": true, "special": false}));
        for (name, j) in [("gpt2", json), ("llama3", llama3), ("qwen2", qwen2)] {
            let bytes = serde_json::to_vec(&j).expect("json");
            let tok = Tokenizer::from_bytes(&bytes, name.into(), None).expect("open");
            assert!(tok.is_fast(), "{name}");
            let mut fast = 0;
            for t in texts.iter().chain(&long) {
                let mut ids = Vec::new();
                if let Inner::Hf(_, Some(f)) = &tok.inner {
                    fast += usize::from(f.encode(t, &mut ids));
                }
                assert_eq!(
                    tok.encode(t).expect("encode"),
                    tok.encode_library(t).expect("library"),
                    "{name} on {t:?}"
                );
            }
            // most texts took the fast path; the rest held an added token
            assert!(fast > texts.len() / 2, "{name}: {fast}");
        }
    }

    /// Files outside the subset (another pre-tokenizer, dropout, a normalizer) are encoded by
    /// the library.
    #[test]
    fn other_byte_level_files_use_the_library() {
        let json = trained(&random_texts(200, 3));
        let mut changes: Vec<serde_json::Value> = Vec::new();
        let mut j = json.clone();
        j["model"]["dropout"] = json!(0.1);
        changes.push(j);
        let mut j = json.clone();
        j["normalizer"] = json!({"type": "Lowercase"});
        changes.push(j);
        let mut j = json.clone();
        j["pre_tokenizer"] = split_then_byte_level(r"\s+|\S+");
        changes.push(j);
        let mut j = json.clone();
        j["pre_tokenizer"]["add_prefix_space"] = json!(true);
        changes.push(j);
        for j in changes {
            let bytes = serde_json::to_vec(&j).expect("json");
            let tok = Tokenizer::from_bytes(&bytes, "t".into(), None).expect("open");
            assert!(!tok.is_fast(), "{}", j["pre_tokenizer"]);
        }
    }
}
