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
    Hf(Box<tokenizers::Tokenizer>),
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
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| open(e.to_string()))?;
        let eos = dir
            .and_then(eos_token_name)
            .and_then(|t| inner.token_to_id(&t));
        Ok(Tokenizer {
            inner: Inner::Hf(Box::new(inner)),
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
            Inner::Hf(t) => t
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Encode(e.to_string())),
            Inner::Spm(m) => Ok(m.encode(text)),
        }
    }

    /// The end-of-document id (the EOS token), when the tokenizer's config names one.
    pub fn eod(&self) -> Option<u32> {
        self.eos
    }

    /// Vocabulary size with added tokens (`len(tokenizer)` in transformers, what Megatron
    /// picks the token type by).
    pub fn vocab_size(&self) -> u64 {
        match &self.inner {
            Inner::Hf(t) => t.get_vocab_size(true) as u64,
            Inner::Spm(m) => m.vocab_size(),
        }
    }
}
