//! The backend-neutral model of a distributed-checkpoint folder (mcore
//! `model_weights/`, written as `torch_dist` or `zarr`): global tensors made
//! of boxes ("chunks") stored somewhere, byte objects, and the non-sharded
//! common state. This module owns the chunk geometry: validating that chunks
//! tile a tensor exactly, and turning any box of a global tensor into
//! row-major [`Piece`]s that borrow from the chunk storages (zero copy).
//!
//! [`DistCheckpoint::open`] detects the backend from `metadata.json` and hands
//! off to [`crate::dcp`] or [`crate::zarr`]; only metadata is read there.
//!
//! # Errors
//! [`Error`] names the member, tensor key or chunk index involved.

use crate::bytes::ByteView;
use crate::members::{MemberError, Members};
use crate::torch::dtype::Dtype;
use crate::torch::pickle::Value;
use crate::torch::tensor::{Piece, StorageRef, TensorKind, TensorRef};

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
}

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
    /// A torch_dist problem.
    #[error(transparent)]
    Dcp(#[from] crate::dcp::Error),
    /// A zarr problem.
    #[error(transparent)]
    Zarr(#[from] crate::zarr::Error),
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

impl DistCheckpoint {
    /// Opens the distributed checkpoint in `dir` (e.g. `model_weights`),
    /// choosing the backend from `dir/metadata.json` (`sharded_backend`); a
    /// folder without `metadata.json` but with `.metadata` is plain DCP.
    ///
    /// # Errors
    /// Unreadable or malformed metadata, or chunks that do not tile a tensor.
    pub fn open(members: &dyn Members, dir: &str) -> Result<DistCheckpoint, Error> {
        let dir = dir.trim_end_matches('/');
        let json_name = join(dir, "metadata.json");
        let names = members.members_under(dir);
        let has = |n: &str| {
            if dir.is_empty() {
                members.member_names().iter().any(|m| m == n)
            } else {
                names.iter().any(|m| m == n)
            }
        };
        let (backend, json) = if has(&json_name) {
            let bytes = read(members, &json_name)?;
            let text = std::str::from_utf8(bytes.as_slice())
                .map_err(|e| Error::MetadataJson {
                    member: json_name.clone(),
                    why: e.to_string(),
                })?
                .to_string();
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::MetadataJson {
                    member: json_name.clone(),
                    why: e.to_string(),
                })?;
            let backend = match v.get("sharded_backend").and_then(|b| b.as_str()) {
                Some("torch_dist") => Backend::TorchDist,
                Some("zarr") => Backend::Zarr,
                other => {
                    return Err(Error::MetadataJson {
                        member: json_name,
                        why: format!("unsupported sharded_backend {other:?}"),
                    })
                }
            };
            (backend, Some(text))
        } else if has(&join(dir, ".metadata")) {
            (Backend::TorchDist, None)
        } else {
            return Err(Error::MetadataJson {
                member: json_name,
                why: "missing (and no .metadata)".into(),
            });
        };
        let mut ck = DistCheckpoint {
            dir: dir.to_string(),
            backend,
            metadata_json: json,
            tensors: Vec::new(),
            objects: Vec::new(),
            common_bytes: None,
            common: None,
            warnings: Vec::new(),
            mcore: false,
        };
        match backend {
            Backend::TorchDist => crate::dcp::read_metadata(members, &mut ck)?,
            Backend::Zarr => crate::zarr::read_metadata(members, &mut ck)?,
        }
        let common = join(dir, "common.pt");
        if has(&common) {
            let bytes = read(members, &common)?;
            match crate::dcp::load_torch_save(&bytes) {
                Ok(v) => ck.common = Some(v),
                Err(e) => ck.warnings.push(format!("{common}: not parsed: {e}")),
            }
            ck.common_bytes = Some(bytes);
        }
        for t in &ck.tensors {
            validate_chunks(t)?;
        }
        Ok(ck)
    }

    /// The tensor with this key.
    pub fn tensor(&self, key: &str) -> Option<&DistTensor> {
        self.tensors.iter().find(|t| t.key == key)
    }

    /// The object with this (full unique) key.
    pub fn object(&self, key: &str) -> Option<&DistObject> {
        self.objects.iter().find(|o| o.key == key)
    }

    /// The bytes of chunk `index` of `tensor` as a tensor view (zero copy).
    ///
    /// # Errors
    /// Unreadable member, malformed item, or a stored tensor whose dtype or
    /// shape disagrees with the metadata.
    pub fn read_chunk(
        &self,
        members: &dyn Members,
        tensor: &DistTensor,
        index: usize,
    ) -> Result<TensorRef, Error> {
        let chunk = tensor.chunks.get(index).ok_or_else(|| Error::NoSuchKey {
            key: format!("{}[chunk {index}]", tensor.key),
        })?;
        let bad = |why: String| Error::BadChunk {
            key: tensor.key.clone(),
            index,
            member: chunk.location.member().to_string(),
            why,
        };
        let t = match &chunk.location {
            Location::Item {
                member,
                offset,
                length,
            } => {
                let file = read(members, member)?;
                let item = file
                    .slice_len(*offset, *length)
                    .map_err(|e| bad(format!("item: {e}")))?;
                crate::dcp::load_chunk_item(&item).map_err(|e| bad(e.to_string()))?
            }
            Location::ZarrChunk {
                member,
                chunk_shape,
            } => {
                let file = read(members, member)?;
                zarr_chunk_view(file, member, tensor.dtype, chunk_shape, &chunk.sizes)
                    .map_err(bad)?
            }
            Location::File { .. } => return Err(bad("a tensor chunk stored as an object".into())),
        };
        if t.dtype != tensor.dtype {
            return Err(bad(format!(
                "stored dtype {} but metadata says {}",
                t.dtype, tensor.dtype
            )));
        }
        if t.shape != chunk.sizes {
            return Err(bad(format!(
                "stored shape {:?} but chunk sizes {:?}",
                t.shape, chunk.sizes
            )));
        }
        t.validate().map_err(|e| bad(e.to_string()))?;
        if !t.storage.composed.is_empty() {
            return Err(bad("composed storage".into()));
        }
        Ok(t)
    }

    /// The whole global tensor's row-major bytes, as pieces borrowed from the
    /// chunk storages.
    ///
    /// # Errors
    /// As [`DistCheckpoint::read_box`].
    pub fn read_global(
        &self,
        members: &dyn Members,
        tensor: &DistTensor,
    ) -> Result<Vec<Piece>, Error> {
        let zeros = vec![0; tensor.shape.len()];
        self.read_box(members, tensor, &zeros, &tensor.shape)
    }

    /// Row-major bytes of the box `[offsets, offsets+sizes)` of a global
    /// tensor (e.g. one layer of a stacked tensor, or one TP slice), as
    /// pieces borrowed from the chunk storages. Only chunks that intersect
    /// the box are read. A region that is contiguous in one chunk becomes one
    /// piece.
    ///
    /// # Errors
    /// A box outside the tensor, unreadable chunks, or a gap in coverage.
    pub fn read_box(
        &self,
        members: &dyn Members,
        tensor: &DistTensor,
        offsets: &[u64],
        sizes: &[u64],
    ) -> Result<Vec<Piece>, Error> {
        let nd = tensor.shape.len();
        let fits = offsets.len() == nd
            && sizes.len() == nd
            && (0..nd).all(|d| {
                offsets[d]
                    .checked_add(sizes[d])
                    .is_some_and(|e| e <= tensor.shape[d])
            });
        if !fits {
            return Err(Error::BadBox {
                key: tensor.key.clone(),
                offsets: offsets.to_vec(),
                sizes: sizes.to_vec(),
                shape: tensor.shape.clone(),
            });
        }
        let mut out = Vec::new();
        if sizes.contains(&0) {
            return Ok(out);
        }
        let mut cands = Vec::new();
        let mut refs: Vec<Option<TensorRef>> = vec![None; tensor.chunks.len()];
        for (i, c) in tensor.chunks.iter().enumerate() {
            if intersects(&c.offsets, &c.sizes, offsets, sizes) {
                refs[i] = Some(self.read_chunk(members, tensor, i)?);
                cands.push(i);
            }
        }
        let mut walk = Walk {
            tensor,
            lo: offsets,
            sz: sizes,
            refs: &refs,
            out: &mut out,
        };
        let mut prefix = Vec::with_capacity(nd);
        walk.dim(0, &mut prefix, &cands)?;
        Ok(out)
    }
}

/// A zarr chunk file as a tensor: the logical box `sizes` (clipped at the
/// array edge) inside the stored full `chunk_shape`, C order.
fn zarr_chunk_view(
    file: ByteView,
    member: &str,
    dtype: Dtype,
    chunk_shape: &[u64],
    sizes: &[u64],
) -> Result<TensorRef, String> {
    let numel = chunk_shape
        .iter()
        .try_fold(1u64, |a, &b| a.checked_mul(b))
        .and_then(|n| n.checked_mul(dtype.size() as u64))
        .ok_or("chunk size overflows")?;
    if file.len() as u64 != numel {
        return Err(format!(
            "chunk file holds {} bytes, uncompressed chunk {:?} of {} needs {numel}",
            file.len(),
            chunk_shape,
            dtype
        ));
    }
    Ok(TensorRef {
        dtype,
        shape: sizes.to_vec(),
        stride: c_strides(chunk_shape),
        storage_offset: 0,
        storage: StorageRef::from_view(member, file),
        requires_grad: false,
        kind: TensorKind::Plain,
    })
}

/// Row-major strides (in elements) of a shape.
pub fn c_strides(shape: &[u64]) -> Vec<u64> {
    let mut s = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1].saturating_mul(shape[d + 1]);
    }
    s
}

fn intersects(a_lo: &[u64], a_sz: &[u64], b_lo: &[u64], b_sz: &[u64]) -> bool {
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
    for i in 0..t.chunks.len() {
        for j in i + 1..t.chunks.len() {
            let (a, b) = (&t.chunks[i], &t.chunks[j]);
            if !a.sizes.contains(&0)
                && !b.sizes.contains(&0)
                && intersects(&a.offsets, &a.sizes, &b.offsets, &b.sizes)
            {
                return Err(Error::Overlap {
                    key: t.key.clone(),
                    a: i,
                    b: j,
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

/// The recursive box walk behind [`DistCheckpoint::read_box`].
struct Walk<'a> {
    tensor: &'a DistTensor,
    lo: &'a [u64],
    sz: &'a [u64],
    refs: &'a [Option<TensorRef>],
    out: &'a mut Vec<Piece>,
}

impl Walk<'_> {
    /// Emits the part of the box whose indices in dims `< dim` are `prefix`,
    /// using only chunks `cands` (those containing `prefix`).
    fn dim(&mut self, dim: usize, prefix: &mut Vec<u64>, cands: &[usize]) -> Result<(), Error> {
        let nd = self.tensor.shape.len();
        let chunks = &self.tensor.chunks;
        if dim == nd {
            // All indices fixed (0-dim tensors, or fallbacks): one element.
            let &c = cands.first().ok_or_else(|| self.gap(prefix))?;
            return self.emit(c, prefix, dim, prefix.last().copied().unwrap_or(0), 1);
        }
        let (a0, b0) = (self.lo[dim], self.lo[dim] + self.sz[dim]);
        let mut cuts = vec![a0, b0];
        for &c in cands {
            let (s, e) = (
                chunks[c].offsets[dim],
                chunks[c].offsets[dim] + chunks[c].sizes[dim],
            );
            for x in [s, e] {
                if x > a0 && x < b0 {
                    cuts.push(x);
                }
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        for w in cuts.windows(2) {
            let (a, b) = (w[0], w[1]);
            let cover: Vec<usize> = cands
                .iter()
                .copied()
                .filter(|&c| {
                    chunks[c].offsets[dim] <= a && a < chunks[c].offsets[dim] + chunks[c].sizes[dim]
                })
                .collect();
            if cover.is_empty() {
                let mut p = prefix.clone();
                p.push(a);
                return Err(self.gap(&p));
            }
            if cover.len() == 1 && self.contiguous(cover[0], dim, a, b) {
                self.emit(cover[0], prefix, dim, a, b - a)?;
                continue;
            }
            if dim + 1 == nd {
                // Non-contiguous last dim (a transposed DCP chunk): per element.
                if cover.len() > 1 {
                    return Err(Error::Overlap {
                        key: self.tensor.key.clone(),
                        a: cover[0],
                        b: cover[1],
                    });
                }
                for i in a..b {
                    self.emit(cover[0], prefix, dim, i, 1)?;
                }
                continue;
            }
            for i in a..b {
                prefix.push(i);
                self.dim(dim + 1, prefix, &cover)?;
                prefix.pop();
            }
        }
        Ok(())
    }

    fn gap(&self, at: &[u64]) -> Error {
        Error::BadChunk {
            key: self.tensor.key.clone(),
            index: usize::MAX,
            member: String::new(),
            why: format!("no chunk holds index {at:?}"),
        }
    }

    /// True when chunk `c` holds the region (prefix, `[a,b)` in `dim`, the
    /// whole requested range in later dims) and it is one contiguous run.
    fn contiguous(&self, c: usize, dim: usize, a: u64, b: u64) -> bool {
        let ch = &self.tensor.chunks[c];
        let Some(t) = self.refs[c].as_ref() else {
            return false;
        };
        let nd = self.tensor.shape.len();
        for j in dim + 1..nd {
            let (cl, ch_end) = (ch.offsets[j], ch.offsets[j] + ch.sizes[j]);
            if self.lo[j] < cl || self.lo[j] + self.sz[j] > ch_end {
                return false;
            }
        }
        let mut expect = 1u64;
        for j in (dim..nd).rev() {
            let n = if j == dim { b - a } else { self.sz[j] };
            if n == 1 {
                continue;
            }
            if t.stride[j] != expect {
                return false;
            }
            expect = expect.saturating_mul(n);
        }
        true
    }

    /// Emits the run starting at (prefix, `start` in `dim`, requested lows in
    /// later dims) of `count` rows of `dim` from chunk `c`.
    fn emit(
        &mut self,
        c: usize,
        prefix: &[u64],
        dim: usize,
        start: u64,
        count: u64,
    ) -> Result<(), Error> {
        let ch = &self.tensor.chunks[c];
        let t = self.refs[c].as_ref().ok_or_else(|| self.gap(prefix))?;
        let nd = self.tensor.shape.len();
        let mut elem = t.storage_offset;
        let mut n = 1u64;
        for j in 0..nd {
            let g = if j < dim {
                prefix[j]
            } else if j == dim {
                start
            } else {
                self.lo[j]
            };
            elem += (g - ch.offsets[j]) * t.stride[j];
            n *= if j < dim {
                1
            } else if j == dim {
                count
            } else {
                self.sz[j]
            };
        }
        let size = t.dtype.size() as u64;
        let bytes = t
            .storage
            .bytes
            .slice_len(elem * size, n * size)
            .map_err(|e| Error::BadChunk {
                key: self.tensor.key.clone(),
                index: c,
                member: t.storage.key.clone(),
                why: e.to_string(),
            })?;
        self.out.push(Piece::Bytes(bytes));
        Ok(())
    }
}

/// Concatenates pieces into owned bytes (tests, small tensors).
pub fn pieces_to_vec(pieces: &[Piece]) -> Vec<u8> {
    crate::torch::tensor::concat(pieces)
}

/// Where writers put files: a folder, or (later) tar members. Names are
/// relative (`__0_0.distcp`, `w/.zarray`); sizes are declared up front so
/// a tar writer can emit its header before the data.
pub trait OutDir {
    /// Writes one file of exactly `size` bytes, produced by `fill`.
    ///
    /// # Errors
    /// I/O errors, or `fill` writing a different number of bytes.
    fn write_file(
        &mut self,
        name: &str,
        size: u64,
        fill: &mut dyn FnMut(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> std::io::Result<()>;
}

/// Writes a whole buffer as one file.
///
/// # Errors
/// As [`OutDir::write_file`].
pub fn write_bytes(out: &mut dyn OutDir, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    out.write_file(name, bytes.len() as u64, &mut |w| w.write_all(bytes))
}

/// An [`OutDir`] over a plain directory (created as needed).
#[derive(Debug, Clone)]
pub struct FsDir {
    root: std::path::PathBuf,
}

impl FsDir {
    /// Files go under `root`.
    pub fn new(root: impl Into<std::path::PathBuf>) -> FsDir {
        FsDir { root: root.into() }
    }
}

struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: std::io::Write> std::io::Write for Counting<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(b)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl OutDir for FsDir {
    fn write_file(
        &mut self,
        name: &str,
        size: u64,
        fill: &mut dyn FnMut(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        use std::io::Write;
        let bad = name.is_empty()
            || name.starts_with('/')
            || name
                .split('/')
                .any(|p| p.is_empty() || p == ".." || p == ".");
        // `.metadata`/`.zarray` are fine; only whole `.`/`..` components are refused.
        if bad {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("unsafe output name {name:?}"),
            ));
        }
        let path = self.root.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let f = std::fs::File::create(&path)?;
        let mut w = Counting {
            inner: std::io::BufWriter::new(f),
            n: 0,
        };
        fill(&mut w)?;
        w.flush()?;
        if w.n != size {
            return Err(std::io::Error::other(format!(
                "{name}: declared {size} bytes, wrote {}",
                w.n
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Fixture folders as members, and a temporary output folder.
    use super::*;
    use crate::members::MemoryMembers;
    use std::path::Path;

    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(
                    p.strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .replace('\\', "/"),
                );
            }
        }
    }

    /// Every file under `root` (absolute, or relative to the crate), named relative to it.
    pub fn dir_members_abs(root: &Path) -> MemoryMembers {
        let mut names = Vec::new();
        walk(root, root, &mut names);
        let mut m = MemoryMembers::default();
        for n in names {
            m.insert(&n, std::fs::read(root.join(&n)).unwrap());
        }
        m
    }

    /// Every file under the crate-relative folder `rel`.
    pub fn dir_members(rel: &str) -> MemoryMembers {
        dir_members_abs(&Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
    }

    /// Little-endian f32s.
    pub fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// An output folder in a temp dir whose `model_weights/` an [`FsDir`] fills.
    pub struct TempOut {
        pub tmp: tempfile::TempDir,
        pub dir: FsDir,
    }

    impl TempOut {
        pub fn new() -> TempOut {
            let tmp = tempfile::tempdir().unwrap();
            let dir = FsDir::new(tmp.path().join("model_weights"));
            TempOut { tmp, dir }
        }
        /// The written files as members (all under `prefix/`).
        pub fn members(&self, _prefix: &str) -> MemoryMembers {
            dir_members_abs(self.tmp.path())
        }
    }
}
