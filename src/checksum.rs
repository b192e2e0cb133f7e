//! Checksums of stored tensors: sha256 over each tensor's logical row-major
//! little-endian bytes, as stored (per rank file, or per global tensor of a
//! distributed checkpoint). Equal bytes give equal sums whatever the strides,
//! storage sharing or zip layout, so this compares our reading with torch's.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::checkpoint::{Checkpoint, Weights};
use crate::torch::tensor::Piece;
use crate::torch::Value;

/// Errors computing checksums; each names the tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor view could not be resolved.
    #[error("{member}: {key}: {source}")]
    Tensor {
        /// Member holding it.
        member: String,
        /// Tensor key.
        key: String,
        /// Why.
        #[source]
        source: crate::torch::tensor::Error,
    },
    /// A distributed-checkpoint tensor could not be assembled.
    #[error("model_weights/: {key}: {source}")]
    Dist {
        /// Tensor key.
        key: String,
        /// Why.
        #[source]
        source: Box<crate::dist::Error>,
    },
}

/// The checksum of one stored tensor or object.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StoredSum {
    /// Member (rank file), or `model_weights/` for distributed checkpoints.
    pub member: String,
    /// Key as stored.
    pub key: String,
    /// dtype name, or `object`.
    pub dtype: String,
    /// Shape as stored (global for distributed checkpoints).
    pub shape: Vec<u64>,
    /// Lowercase hex sha256 of the logical bytes (objects: of their stored bytes).
    pub sha256: String,
}

/// sha256 over a list of pieces.
pub fn sha256_pieces(pieces: &[Piece]) -> String {
    let mut h = Sha256::new();
    let zeros = [0u8; 4096];
    for p in pieces {
        match p {
            Piece::Bytes(b) => h.update(b.as_slice()),
            Piece::Zeros(mut n) => {
                while n > 0 {
                    let k = n.min(zeros.len() as u64) as usize;
                    h.update(&zeros[..k]);
                    n -= k as u64;
                }
            }
        }
    }
    hex::encode(h.finalize())
}

/// Checksums of every stored tensor (reads every payload byte once).
pub fn stored(ckpt: &Checkpoint) -> Result<Vec<StoredSum>, Error> {
    let mut out = Vec::new();
    match &ckpt.weights {
        Weights::PerRank(ranks) => {
            for r in ranks {
                for (key, value) in r.entries() {
                    let Value::Tensor(t) = value else { continue };
                    let pieces = t.pieces().map_err(|source| Error::Tensor {
                        member: r.member.clone(),
                        key: key.to_string(),
                        source,
                    })?;
                    out.push(StoredSum {
                        member: r.member.clone(),
                        key: key.to_string(),
                        dtype: t.dtype.torch_name().to_string(),
                        shape: t.shape.clone(),
                        sha256: sha256_pieces(&pieces),
                    });
                }
            }
        }
        Weights::Dist(dist) => {
            for t in &dist.tensors {
                let pieces = dist
                    .read_global(ckpt.archive(), t)
                    .map_err(|source| Error::Dist {
                        key: t.key.clone(),
                        source: Box::new(source),
                    })?;
                out.push(StoredSum {
                    member: "model_weights/".to_string(),
                    key: t.key.clone(),
                    dtype: t.dtype.torch_name().to_string(),
                    shape: t.shape.clone(),
                    sha256: sha256_pieces(&pieces),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::ByteView;

    #[test]
    fn pieces_hash_like_their_concatenation() {
        let a = ByteView::from_vec(vec![1, 2, 3]);
        let split = sha256_pieces(&[Piece::Bytes(a), Piece::Zeros(5000)]);
        let mut whole = vec![1u8, 2, 3];
        whole.resize(5003, 0);
        let joined = sha256_pieces(&[Piece::Bytes(ByteView::from_vec(whole))]);
        assert_eq!(split, joined);
        assert_ne!(split, sha256_pieces(&[Piece::Zeros(5003)]));
    }
}
