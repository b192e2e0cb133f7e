//! The member names of a `.nemo` that are not about weights layouts: the config, and
//! artifacts (tokenizer files) as NeMo names them.

use sha2::{Digest, Sha256};

/// The config member every `.nemo` has.
pub const CONFIG_MEMBER: &str = "model_config.yaml";

/// NeMo's artifact naming: `<32 hex>_<file name>` (content-derived here, so
/// the same input gives the same archive).
pub fn artifact_name(name: &str, bytes: &[u8]) -> String {
    let h = Sha256::digest(bytes);
    format!("{}_{name}", hex::encode(h.get(..16).unwrap_or_default()))
}

/// The original name of an artifact member (`<32 hex>_tokenizer.model` ->
/// `tokenizer.model`; a plain name is returned as it is).
pub fn artifact_original(member: &str) -> &str {
    let base = member.rsplit('/').next().unwrap_or(member);
    match base.split_once('_') {
        Some((h, rest)) if h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()) => rest,
        _ => base,
    }
}
