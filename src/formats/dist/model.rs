//! The backend-neutral data model of a distributed-checkpoint folder: global
//! tensors made of stored boxes ("chunks"), byte objects, where their bytes
//! live, and the chunk geometry (the checks that chunks tile a tensor
//! exactly). Both backends ([`super::dcp`], [`super::zarr`]) fill it in and
//! the reader ([`super`]) and writers read it; it depends on none of them.

use crate::formats::members::Members;
use crate::formats::torch::dtype::Dtype;
use crate::formats::torch::pickle::Value;
use crate::io::bytes::ByteView;
use crate::io::piece::Piece;

use super::error::Error;

/// Most chunks one tensor may have (caps the O(n²) overlap check).
pub const MAX_CHUNKS_PER_TENSOR: usize = 1 << 16;
/// Most dimensions a tensor may have.
pub const MAX_DIMS: usize = 64;

/// Which sharded backend wrote the folder (`metadata.json` `sharded_backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `torch_dist`: torch DCP (`.metadata` + `__R_N.distcp`).
    TorchDist,
    /// `zarr`: one zarr v2 array per key.
    Zarr,
}

/// Where a chunk's or object's bytes live, as member names of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// DCP: `[offset, offset+length)` of a `.distcp` member, a complete
    /// `torch.save` zip stream (tensor chunk) or raw bytes (byte item).
    Item {
        /// Member name, e.g. `model_weights/__0_1.distcp`.
        member: String,
        /// Start of the item in the member.
        offset: u64,
        /// Length of the item.
        length: u64,
    },
    /// zarr: a whole uncompressed chunk file in C order, always holding the
    /// full `.zarray` chunk shape, even at the array edge (zarr v2).
    ZarrChunk {
        /// Member name, e.g. `model_weights/w/0.1`.
        member: String,
        /// The full stored chunk shape (`.zarray` `chunks`).
        chunk_shape: Vec<u64>,
    },
    /// A whole member (zarr ShardedObject `.pt` file).
    File {
        /// Member name.
        member: String,
    },
}

impl Location {
    /// The member holding the bytes.
    pub fn member(&self) -> &str {
        match self {
            Location::Item { member, .. }
            | Location::ZarrChunk { member, .. }
            | Location::File { member } => member,
        }
    }
}

/// One stored box of a global tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Global index of the box's first element, per dimension.
    pub offsets: Vec<u64>,
    /// Box extent per dimension (clipped to the tensor at zarr edges).
    pub sizes: Vec<u64>,
    /// Where its bytes are.
    pub location: Location,
}

/// A global tensor stored as chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistTensor {
    /// The key (DCP fqn / zarr array directory name).
    pub key: String,
    /// Element type.
    pub dtype: Dtype,
    /// Global shape.
    pub shape: Vec<u64>,
    /// Stored boxes, in metadata order; validated to tile `shape` exactly.
    pub chunks: Vec<Chunk>,
}

/// A stored object (DCP byte item / mcore ShardedObject), e.g.
/// `decoder.layers.self_attention.linear_qkv._extra_state/shard_0_2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistObject {
    /// The full unique key, including any `/shard_<offsets>_<shape>` suffix.
    pub key: String,
    /// Where its bytes are (a `torch.save` stream in both backends).
    pub location: Location,
}

/// A distributed-checkpoint folder, metadata only.
#[derive(Debug, Clone)]
pub struct DistCheckpoint {
    /// The folder inside the members (e.g. `model_weights`; empty for the root).
    pub dir: String,
    /// The sharded backend.
    pub backend: Backend,
    /// `metadata.json` text as stored (None for a plain DCP folder without it).
    pub metadata_json: Option<String>,
    /// Global tensors in metadata order (zarr: sorted by key).
    pub tensors: Vec<DistTensor>,
    /// Objects in metadata order (zarr: sorted by key).
    pub objects: Vec<DistObject>,
    /// `common.pt` bytes, if present.
    pub common_bytes: Option<ByteView>,
    /// `common.pt` parsed, if present and readable.
    pub common: Option<Value>,
    /// Non-fatal findings (e.g. an unreadable `common.pt`).
    pub warnings: Vec<String>,
    /// torch_dist only: whether `.metadata` carried Megatron's `mcore_data`.
    pub mcore: bool,
    /// Plain DCP only: `planner_data`, each flattened key's path in the
    /// original nested state dict (torch uses it to unflatten on load).
    pub planner_paths: Vec<(String, Vec<PathPart>)>,
}

/// One step of a `planner_data` path: a dict key or a list index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPart {
    /// A dict key.
    Key(String),
    /// A list index.
    Index(i64),
}

/// Reads a member, naming it on failure.
pub(crate) fn read(members: &dyn Members, member: &str) -> Result<ByteView, Error> {
    members.read_member(member).map_err(|source| Error::Member {
        member: member.to_string(),
        source,
    })
}

/// `dir/name`, or `name` for the root folder.
pub(crate) fn join(dir: &str, name: &str) -> String {
    let dir = dir.trim_end_matches('/');
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Row-major strides (in elements) of a shape.
pub fn c_strides(shape: &[u64]) -> Vec<u64> {
    let mut s = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1].saturating_mul(shape[d + 1]);
    }
    s
}

pub(crate) fn intersects(a_lo: &[u64], a_sz: &[u64], b_lo: &[u64], b_sz: &[u64]) -> bool {
    a_lo.iter()
        .zip(a_sz)
        .zip(b_lo.iter().zip(b_sz))
        .all(|((&al, &asz), (&bl, &bsz))| al < bl + bsz && bl < al + asz)
}

/// Checks that a tensor's chunks lie inside it, do not overlap, and cover it.
///
/// # Errors
/// [`Error::ChunkOutside`], [`Error::Overlap`], [`Error::Coverage`], [`Error::TooMany`].
pub fn validate_chunks(t: &DistTensor) -> Result<(), Error> {
    let nd = t.shape.len();
    if nd > MAX_DIMS {
        return Err(Error::TooMany {
            key: t.key.clone(),
            what: "dimensions",
            count: nd,
            limit: MAX_DIMS,
        });
    }
    if t.chunks.len() > MAX_CHUNKS_PER_TENSOR {
        return Err(Error::TooMany {
            key: t.key.clone(),
            what: "chunks",
            count: t.chunks.len(),
            limit: MAX_CHUNKS_PER_TENSOR,
        });
    }
    let numel: u128 = t.shape.iter().map(|&s| s as u128).product();
    let mut covered: u128 = 0;
    for (i, c) in t.chunks.iter().enumerate() {
        let inside = c.offsets.len() == nd
            && c.sizes.len() == nd
            && (0..nd).all(|d| {
                c.offsets[d]
                    .checked_add(c.sizes[d])
                    .is_some_and(|e| e <= t.shape[d])
            });
        if !inside {
            return Err(Error::ChunkOutside {
                key: t.key.clone(),
                index: i,
                offsets: c.offsets.clone(),
                sizes: c.sizes.clone(),
                shape: t.shape.clone(),
            });
        }
        // Dimensions are capped at 64 and each factor is < 2^64, but the
        // product of many can still pass u128: saturate (then coverage fails).
        let vol = c
            .sizes
            .iter()
            .try_fold(1u128, |a, &s| a.checked_mul(s as u128))
            .unwrap_or(u128::MAX);
        covered = covered.saturating_add(vol);
    }
    // Sweep along dim 0: sort by start, compare each chunk only with later
    // ones starting before it ends there (stacked layers keep this small).
    let mut order: Vec<usize> = (0..t.chunks.len()).collect();
    let start = |i: usize| t.chunks[i].offsets.first().copied().unwrap_or(0);
    let end = |i: usize| start(i) + t.chunks[i].sizes.first().copied().unwrap_or(1);
    order.sort_by_key(|&i| start(i));
    for (n, &i) in order.iter().enumerate() {
        for &j in &order[n + 1..] {
            if start(j) >= end(i) {
                break;
            }
            let (a, b) = (&t.chunks[i], &t.chunks[j]);
            if !a.sizes.contains(&0)
                && !b.sizes.contains(&0)
                && intersects(&a.offsets, &a.sizes, &b.offsets, &b.sizes)
            {
                return Err(Error::Overlap {
                    key: t.key.clone(),
                    a: i.min(j),
                    b: i.max(j),
                });
            }
        }
    }
    if covered != numel {
        return Err(Error::Coverage {
            key: t.key.clone(),
            covered,
            numel,
        });
    }
    Ok(())
}

/// Concatenates pieces into owned bytes (tests, small tensors).
pub fn pieces_to_vec(pieces: &[Piece]) -> Vec<u8> {
    crate::io::piece::concat(pieces)
}
