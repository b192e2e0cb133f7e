//! The errors of distributed checkpoints: the shared [`Error`] and each
//! backend's own ([`DcpError`], [`ZarrError`], re-exported as `dcp::Error`
//! and `zarr::Error`). They live apart from the backends so that the model,
//! the backends and the reader all name them without importing each other.

use crate::formats::members::MemberError;
use crate::formats::torch::pickle;

/// Why a distributed checkpoint could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A member could not be read.
    #[error("{member}: cannot read: {source}")]
    Member {
        /// Member name.
        member: String,
        /// The reader's error.
        source: MemberError,
    },
    /// `metadata.json` is missing a known backend or is not JSON.
    #[error("{member}: bad metadata.json: {why}")]
    MetadataJson {
        /// Member name.
        member: String,
        /// What was wrong.
        why: String,
    },
    /// A chunk does not fit the tensor (rank mismatch or past the edge).
    #[error(
        "{key}: chunk {index} at {offsets:?} size {sizes:?} does not fit global shape {shape:?}"
    )]
    ChunkOutside {
        /// Tensor key.
        key: String,
        /// Chunk index.
        index: usize,
        /// Its offsets.
        offsets: Vec<u64>,
        /// Its sizes.
        sizes: Vec<u64>,
        /// The global shape.
        shape: Vec<u64>,
    },
    /// Two chunks share elements.
    #[error("{key}: chunks {a} and {b} overlap")]
    Overlap {
        /// Tensor key.
        key: String,
        /// First chunk index.
        a: usize,
        /// Second chunk index.
        b: usize,
    },
    /// The chunks do not cover the whole tensor.
    #[error("{key}: chunks cover {covered} of {numel} elements")]
    Coverage {
        /// Tensor key.
        key: String,
        /// Elements covered by chunks.
        covered: u128,
        /// Elements in the global tensor.
        numel: u128,
    },
    /// A tensor has too many chunks or dimensions.
    #[error("{key}: too many {what}: {count} (limit {limit})")]
    TooMany {
        /// Tensor key.
        key: String,
        /// Chunks or dimensions.
        what: &'static str,
        /// How many.
        count: usize,
        /// The cap.
        limit: usize,
    },
    /// A requested box is not inside the tensor.
    #[error("{key}: requested box at {offsets:?} size {sizes:?} is outside shape {shape:?}")]
    BadBox {
        /// Tensor key.
        key: String,
        /// Requested offsets.
        offsets: Vec<u64>,
        /// Requested sizes.
        sizes: Vec<u64>,
        /// The global shape.
        shape: Vec<u64>,
    },
    /// A chunk's stored tensor disagrees with the metadata.
    #[error("{key}: chunk {index} ({member}): {why}")]
    BadChunk {
        /// Tensor key.
        key: String,
        /// Chunk index.
        index: usize,
        /// Member holding it.
        member: String,
        /// What was wrong.
        why: String,
    },
    /// No tensor or object with this key.
    #[error("no tensor or object `{key}` in the checkpoint")]
    NoSuchKey {
        /// The key asked for.
        key: String,
    },
    /// Writing an output file failed.
    #[error("{member}: write failed: {source}")]
    Write {
        /// Output file name.
        member: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A torch_dist problem.
    #[error(transparent)]
    Dcp(#[from] DcpError),
    /// A zarr problem.
    #[error(transparent)]
    Zarr(#[from] ZarrError),
}

/// Why a DCP folder or item could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DcpError {
    /// The `.metadata` pickle is malformed or names a refused global.
    #[error("{member}: {source}")]
    Pickle {
        /// Member name.
        member: String,
        /// The pickle error.
        source: pickle::Error,
    },
    /// The `.metadata` tree is not the expected dataclass shape.
    #[error("{member}: {key}: bad metadata: {why}")]
    Shape {
        /// Member name.
        member: String,
        /// Tensor/object key, or the field path.
        key: String,
        /// What was wrong.
        why: String,
    },
    /// A feature this reader does not implement (e.g. transforms).
    #[error("{member}: {key}: unsupported: {why}")]
    Unsupported {
        /// Member name.
        member: String,
        /// Key.
        key: String,
        /// What.
        why: String,
    },
    /// A torch.save stream (item or `common.pt`) could not be read.
    #[error("torch.save stream: {why}")]
    TorchSave {
        /// What was wrong.
        why: String,
    },
    /// A chunk item is not a single tensor.
    #[error("chunk item holds {found}, not a tensor")]
    NotATensor {
        /// What it held.
        found: String,
    },
}

/// Why a zarr folder could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ZarrError {
    /// `.zarray` is not valid JSON or misses a field.
    #[error("{member}: bad .zarray: {why}")]
    BadZarray {
        /// Member name.
        member: String,
        /// What was wrong.
        why: String,
    },
    /// A zarr feature mcore never wrote (compressor, filters, F order, ...).
    #[error("{member}: unsupported zarr array: {why}")]
    Unsupported {
        /// Member name.
        member: String,
        /// What.
        why: String,
    },
    /// A file inside an array directory that is no chunk of it.
    #[error("{member}: not a chunk of a {ndim}-d array with chunk grid {grid:?}")]
    BadChunkName {
        /// Member name.
        member: String,
        /// Array rank.
        ndim: usize,
        /// Chunks per dimension.
        grid: Vec<u64>,
    },
    /// A tensor whose chunks cannot be written as one zarr chunk grid.
    #[error("{key}: cannot write as zarr: {why}")]
    NotAGrid {
        /// Tensor key.
        key: String,
        /// Why.
        why: String,
    },
}
