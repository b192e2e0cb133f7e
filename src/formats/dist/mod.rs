//! Distributed-checkpoint folders (mcore `model_weights/`, written as
//! `torch_dist` or `zarr`): global tensors made of boxes ("chunks") stored
//! somewhere, byte objects, and the non-sharded common state.
//!
//! The folder is a small DAG, read top to bottom:
//! - [`error`] and [`model`]: the errors and the backend-neutral data model
//!   with the chunk geometry (chunks must tile a tensor exactly);
//! - [`dcp`] and [`zarr`]: each backend's metadata parsed into that model;
//! - this module, the reader: [`DistCheckpoint::open`] detects the backend
//!   from `metadata.json` and hands off to a backend (metadata only), and
//!   [`DistCheckpoint::read_box`] turns any box of a global tensor into
//!   row-major [`Piece`]s that borrow from the chunk storages (zero copy);
//! - [`dcp_write`] and [`zarr_write`]: the writers, which read any source
//!   through the reader.
//!
//! # Errors
//! [`Error`] names the member, tensor key or chunk index involved.

pub mod dcp;
pub mod dcp_write;
pub mod error;
pub mod model;
pub mod zarr;
pub mod zarr_write;

pub use error::Error;
pub use model::*;

use crate::formats::members::Members;
use crate::formats::torch::dtype::Dtype;
use crate::formats::torch::pickle::Value;
use crate::formats::torch::tensor::{StorageRef, TensorKind, TensorRef};
use crate::io::bytes::ByteView;
pub use crate::io::outdir::{write_bytes, FsDir, OutDir};
use crate::io::piece::Piece;

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
            // megatron-core has written version 1 of both through 0.19; a later format
            // is refused by name rather than misread
            if let Some(ver) = v.get("sharded_backend_version") {
                if ver.as_u64() != Some(1) {
                    return Err(Error::MetadataJson {
                        member: json_name,
                        why: format!(
                            "sharded_backend_version {ver}: this reader knows version 1 (what megatron-core 0.12-0.19 write)"
                        ),
                    });
                }
            }
            match v.get("common_backend").and_then(|b| b.as_str()) {
                None | Some("torch") => {}
                Some(other) => {
                    return Err(Error::MetadataJson {
                        member: json_name,
                        why: format!(
                            "common_backend {other:?}: this reader knows `torch` (common.pt) and none (megatron-core 0.19+: common_state/ inside the DCP)"
                        ),
                    })
                }
            }
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
            planner_paths: Vec::new(),
        };
        match backend {
            Backend::TorchDist => crate::formats::dist::dcp::read_metadata(members, &mut ck)?,
            Backend::Zarr => crate::formats::dist::zarr::read_metadata(members, &mut ck)?,
        }
        let common = join(dir, "common.pt");
        if has(&common) {
            let bytes = read(members, &common)?;
            match crate::formats::dist::dcp::load_torch_save(&bytes) {
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
                crate::formats::dist::dcp::load_chunk_item(&item).map_err(|e| bad(e.to_string()))?
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

    /// The raw bytes of an object: a DCP byte item or a zarr shard file.
    ///
    /// # Errors
    /// Unreadable member or an item past the end of its file.
    pub fn read_object_bytes(
        &self,
        members: &dyn Members,
        object: &DistObject,
    ) -> Result<ByteView, Error> {
        let member = object.location.member();
        let file = read(members, member)?;
        match &object.location {
            Location::Item { offset, length, .. } => {
                file.slice_len(*offset, *length)
                    .map_err(|e| Error::BadChunk {
                        key: object.key.clone(),
                        index: 0,
                        member: member.to_string(),
                        why: format!("item: {e}"),
                    })
            }
            _ => Ok(file),
        }
    }

    /// An object parsed as a `torch.save` stream (Megatron torch_dist: the
    /// list `[obj, ...]`; zarr: the bare object) with
    /// [`crate::formats::dist::dcp::object_policy`].
    ///
    /// # Errors
    /// As [`DistCheckpoint::read_object_bytes`], or an unreadable stream.
    pub fn read_object(&self, members: &dyn Members, object: &DistObject) -> Result<Value, Error> {
        let bytes = self.read_object_bytes(members, object)?;
        crate::formats::dist::dcp::load_torch_save(&bytes).map_err(|e| Error::BadChunk {
            key: object.key.clone(),
            index: 0,
            member: object.location.member().to_string(),
            why: e.to_string(),
        })
    }

    /// An object's bytes re-encoded for the backend `to`: torch_dist items
    /// hold Megatron's `torch.save([obj])`, zarr shard files `torch.save(obj)`.
    /// Bytes already in the right form are returned as they are.
    ///
    /// # Errors
    /// As [`DistCheckpoint::read_object`], or a list that is not of one element.
    pub fn object_bytes_for(
        &self,
        members: &dyn Members,
        object: &DistObject,
        to: Backend,
    ) -> Result<ByteView, Error> {
        let is_item = matches!(object.location, Location::Item { .. });
        if is_item == (to == Backend::TorchDist) {
            return self.read_object_bytes(members, object);
        }
        let v = self.read_object(members, object)?;
        let bad = |why: String| Error::BadChunk {
            key: object.key.clone(),
            index: 0,
            member: object.location.member().to_string(),
            why,
        };
        let (value, archive) = match to {
            Backend::TorchDist => (Value::List(vec![v]), "archive".to_string()),
            Backend::Zarr => {
                let mut list = match v {
                    Value::List(l) if l.len() == 1 => l,
                    other => {
                        return Err(bad(format!("expected a one-element list, found {other:?}")))
                    }
                };
                let stem = object
                    .key
                    .rsplit('/')
                    .next()
                    .unwrap_or("archive")
                    .to_string();
                (list.remove(0), stem)
            }
        };
        crate::formats::torch::file::save(Vec::new(), &archive, &value)
            .map(ByteView::from_vec)
            .map_err(|e| bad(format!("cannot save: {e}")))
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
        // The fields are public: re-check what the walk relies on.
        validate_chunks(tensor)?;
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
        // Global index of the run's first element and its length per dim.
        let first = (0..nd).map(|j| match j.cmp(&dim) {
            std::cmp::Ordering::Less => (prefix[j], 1),
            std::cmp::Ordering::Equal => (start, count),
            std::cmp::Ordering::Greater => (self.lo[j], self.sz[j]),
        });
        let mut elem = t.storage_offset;
        let mut n = 1u64;
        for ((g, len), (off, st)) in first.zip(ch.offsets.iter().zip(&t.stride)) {
            // In range: the chunk holds the run and its view was validated.
            elem += (g - off) * st;
            n *= len;
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

#[cfg(test)]
mod tests {
    use super::testutil::{dir_members, f32s};
    use super::*;
    use crate::formats::torch::pickle::Policy;

    fn expected() -> serde_json::Value {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/torch-samples/expected.json"
        );
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    fn as_f32(dtype: Dtype, b: &[u8]) -> Vec<f32> {
        match dtype {
            Dtype::F32 => f32s(b),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn plain_dcp_values() {
        let m = dir_members("fixtures/torch-samples/dcp/plain_single_rank");
        let ck = DistCheckpoint::open(&m, "").unwrap();
        let w = pieces_to_vec(&ck.read_global(&m, ck.tensor("w").unwrap()).unwrap());
        assert_eq!(f32s(&w), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let b = pieces_to_vec(&ck.read_global(&m, ck.tensor("b").unwrap()).unwrap());
        assert_eq!(b, [0xc0, 0x3f, 0xc0, 0xbf]); // raw_u16 16320, -16448
        let x = pieces_to_vec(&ck.read_global(&m, ck.tensor("nested.x").unwrap()).unwrap());
        let xs: Vec<i64> = x
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(xs, [1, 2, 3]);
        let step = ck.read_object(&m, ck.object("step").unwrap()).unwrap();
        assert_eq!(step, Value::Int(7));
        let name = ck
            .read_object(&m, ck.object("nested.name").unwrap())
            .unwrap();
        assert_eq!(name, Value::Str("abc".into()));
        // one chunk read directly
        let t = ck.read_chunk(&m, ck.tensor("w").unwrap(), 0).unwrap();
        assert_eq!(t.shape, vec![2, 3]);
    }

    #[test]
    fn megatron_dcp_values_and_objects() {
        let exp = expected();
        for (dir, v13) in [
            ("megatron_core_v0.13.0_tp2", true),
            ("megatron_core_v0.19.0_tp2", false),
        ] {
            let m = dir_members(&format!("fixtures/torch-samples/dcp/{dir}"));
            let ck = DistCheckpoint::open(&m, "").unwrap();
            let e = &exp[format!("dcp/{dir}")];
            for (key, t) in e["tensors"].as_object().unwrap() {
                let dt = ck.tensor(key).unwrap();
                let want: Vec<f32> = t["values_as_float"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect();
                let got = as_f32(dt.dtype, &pieces_to_vec(&ck.read_global(&m, dt).unwrap()));
                assert_eq!(got, want, "{dir} {key}");
            }
            // one TP=2 slice of one layer of fc2 (split on the last dim): 4 rows of 2
            let fc2 = ck.tensor("decoder.layers.mlp.linear_fc2.weight").unwrap();
            let p = ck.read_box(&m, fc2, &[1, 0, 2], &[1, 4, 2]).unwrap();
            assert_eq!(p.len(), 1, "a whole chunk is one piece");
            let base = 800.0 + 16.0;
            assert_eq!(
                f32s(&pieces_to_vec(&p)),
                vec![
                    base + 2.0,
                    base + 3.0,
                    base + 6.0,
                    base + 7.0,
                    base + 10.0,
                    base + 11.0,
                    base + 14.0,
                    base + 15.0
                ]
            );
            // the whole layer crosses both chunks: one piece per row and chunk
            let p = ck.read_box(&m, fc2, &[1, 0, 0], &[1, 4, 4]).unwrap();
            assert_eq!(p.len(), 8);
            assert_eq!(
                f32s(&pieces_to_vec(&p)),
                (16..32).map(|i| 800.0 + i as f32).collect::<Vec<_>>()
            );

            for i in 0..2 {
                let proj = ck
                    .object(&format!(
                        "decoder.layers.self_attention.linear_proj._extra_state/shard_{i}_2"
                    ))
                    .unwrap();
                let v = ck.read_object(&m, proj).unwrap();
                let t = v.as_seq().unwrap()[0]
                    .as_tensor()
                    .unwrap()
                    .to_vec()
                    .unwrap();
                let inner = crate::formats::torch::pickle::parse(&t, &Policy::torch()).unwrap();
                assert_eq!(inner.get("layer"), Some(&Value::Int(i)));
                let qkv = ck
                    .object(&format!(
                        "decoder.layers.self_attention.linear_qkv._extra_state/shard_{i}_2"
                    ))
                    .unwrap();
                let v = ck.read_object(&m, qkv).unwrap();
                let bio = v.as_seq().unwrap()[0].as_object().unwrap();
                assert_eq!(bio.class.name, "BytesIO");
            }
            let common = if v13 {
                ck.common.clone().unwrap()
            } else {
                let o = ck.object("common_state/shard_0_1").unwrap();
                ck.read_object(&m, o).unwrap().as_seq().unwrap()[0].clone()
            };
            assert_eq!(common.get("iteration"), Some(&Value::Int(10)));
            assert_eq!(common.get("checkpoint_version"), Some(&Value::Float(3.0)));
        }
    }

    /// The mcore llama torch_dist checkpoint equals the TP=1 rank file, layer
    /// by layer (stacked keys, TE norm names).
    #[test]
    fn mcore_llama_dcp_equals_tp1_weights() {
        let m = dir_members("fixtures/mcore/llama/dcp_tp1");
        let ck = DistCheckpoint::open(&m, "").unwrap();
        let z = dir_members("fixtures/zarr/llama_tp2");
        let zck = DistCheckpoint::open(&z, "model_weights").unwrap();
        assert_eq!(zck.backend, Backend::Zarr);
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/mcore/llama/tp1/mp_rank_00/model_weights.ckpt"
        );
        let tp1 = crate::formats::torch::file::load(
            ByteView::from_vec(std::fs::read(p).unwrap()),
            &Policy::torch(),
        )
        .unwrap();
        let mut n = 0;
        for (key, t) in tp1.tensors() {
            let want = t.to_vec().unwrap();
            let (dkey, layer) = match key.strip_prefix("model.decoder.layers.") {
                Some(rest) => {
                    let (i, name) = rest.split_once('.').unwrap();
                    let name = match name {
                        "input_layernorm.weight" => "self_attention.linear_qkv.layer_norm_weight",
                        "pre_mlp_layernorm.weight" => "mlp.linear_fc1.layer_norm_weight",
                        other => other,
                    };
                    (
                        format!("model.decoder.layers.{name}"),
                        Some(i.parse::<u64>().unwrap()),
                    )
                }
                None => (key.clone(), None),
            };
            for (c, mm) in [(&ck, &m), (&zck, &z)] {
                let dt = c.tensor(&dkey).unwrap_or_else(|| panic!("{dkey}"));
                let got = match layer {
                    Some(l) => {
                        let mut off = vec![0; dt.shape.len()];
                        off[0] = l;
                        let mut sz = dt.shape.clone();
                        sz[0] = 1;
                        c.read_box(mm, dt, &off, &sz).unwrap()
                    }
                    None => c.read_global(mm, dt).unwrap(),
                };
                assert_eq!(pieces_to_vec(&got), want, "{key}");
            }
            n += 1;
        }
        assert_eq!(n, 15);
        // _extra_state objects hold torch.save([None]) in DCP, torch.save(None) in zarr
        let o = ck
            .object("model.decoder.layers.mlp.linear_fc2._extra_state/shard_1_2")
            .unwrap();
        assert_eq!(
            ck.read_object(&m, o).unwrap(),
            Value::List(vec![Value::None])
        );
        let o = zck
            .object("model.decoder.layers.mlp.linear_fc2._extra_state/shard_1_2")
            .unwrap();
        assert_eq!(zck.read_object(&z, o).unwrap(), Value::None);
    }

    #[test]
    fn dist_nemo_model_weights_equal_the_dcp_folder() {
        let nemo =
            super::testutil::tar_members("fixtures/mcore/llama/nemo/tiny_llama_dist_tp1.nemo");
        let ck = DistCheckpoint::open(&nemo, "model_weights").unwrap();
        assert_eq!(ck.backend, Backend::TorchDist);
        assert_eq!(ck.common, Some(Value::Dict(vec![])));
        let m = dir_members("fixtures/mcore/llama/dcp_tp1");
        let want = DistCheckpoint::open(&m, "").unwrap();
        assert_eq!(ck.tensors.len(), want.tensors.len());
        for (a, b) in ck.tensors.iter().zip(&want.tensors) {
            assert_eq!((&a.key, &a.shape), (&b.key, &b.shape));
            assert_eq!(
                pieces_to_vec(&ck.read_global(&nemo, a).unwrap()),
                pieces_to_vec(&want.read_global(&m, b).unwrap())
            );
        }
        assert!(ck.tensors[0].chunks[0]
            .location
            .member()
            .starts_with("model_weights/__0_"));
    }

    /// Members over memory-mapped files, to check pieces stay in the map.
    struct Mapped(Vec<(String, ByteView)>);

    impl Members for Mapped {
        fn read_member(
            &self,
            name: &str,
        ) -> Result<ByteView, crate::formats::members::MemberError> {
            self.0
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| format!("no member {name}").into())
        }
        fn member_names(&self) -> Vec<String> {
            self.0.iter().map(|(n, _)| n.clone()).collect()
        }
    }

    #[test]
    fn global_read_is_zero_copy_and_coalesced() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/torch-samples/dcp/megatron_core_v0.19.0_tp2");
        let mut files = Vec::new();
        for e in std::fs::read_dir(&root).unwrap() {
            let p = e.unwrap().path();
            let f = std::fs::File::open(&p).unwrap();
            let map = crate::io::mmap::map_file(&f).unwrap();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            files.push((name, ByteView::from_mmap(map)));
        }
        let m = Mapped(files);
        let ck = DistCheckpoint::open(&m, "").unwrap();
        let qkv = ck
            .tensor("decoder.layers.self_attention.linear_qkv.weight")
            .unwrap();
        let p = ck.read_global(&m, qkv).unwrap();
        // per layer: rows 0..6 from TP rank 0's chunk, rows 6..12 from rank 1's
        assert_eq!(p.len(), 4);
        assert!(p
            .iter()
            .all(|x| matches!(x, Piece::Bytes(b) if b.is_mapped() && b.len() == 48)));
        // the embedding's two TP chunks cover whole rows: two pieces
        let emb = ck.tensor("embedding.word_embeddings.weight").unwrap();
        assert_eq!(ck.read_global(&m, emb).unwrap().len(), 2);
    }

    /// Row-major slice of a whole tensor's bytes (the naive reference).
    fn naive_box(all: &[u8], shape: &[u64], esize: usize, lo: &[u64], sz: &[u64]) -> Vec<u8> {
        let st = c_strides(shape);
        let n: u64 = sz.iter().product();
        let mut out = Vec::new();
        for flat in 0..n {
            let mut rem = flat;
            let mut at = 0u64;
            for d in (0..shape.len()).rev() {
                let i = rem % sz[d];
                rem /= sz[d];
                at += (lo[d] + i) * st[d];
            }
            let a = at as usize * esize;
            out.extend_from_slice(&all[a..a + esize]);
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        /// Any box of any tensor equals the same slice of the whole tensor.
        #[test]
        fn any_box_matches_the_global_slice(t in 0usize..8, seed in proptest::collection::vec(0u64..1000, 6)) {
            let m = dir_members("fixtures/torch-samples/dcp/megatron_core_v0.13.0_tp2");
            let ck = DistCheckpoint::open(&m, "").unwrap();
            let dt = &ck.tensors[t];
            let all = pieces_to_vec(&ck.read_global(&m, dt).unwrap());
            let nd = dt.shape.len();
            let lo: Vec<u64> = (0..nd).map(|d| seed[d] % dt.shape[d]).collect();
            let sz: Vec<u64> = (0..nd).map(|d| 1 + seed[d + 3] % (dt.shape[d] - lo[d])).collect();
            let got = pieces_to_vec(&ck.read_box(&m, dt, &lo, &sz).unwrap());
            proptest::prop_assert_eq!(got, naive_box(&all, &dt.shape, dt.dtype.size(), &lo, &sz));
        }
    }

    #[test]
    fn bad_boxes_are_refused() {
        let m = dir_members("fixtures/torch-samples/dcp/plain_single_rank");
        let ck = DistCheckpoint::open(&m, "").unwrap();
        let w = ck.tensor("w").unwrap();
        let e = ck.read_box(&m, w, &[1, 0], &[2, 3]).unwrap_err();
        assert!(matches!(e, Error::BadBox { .. }), "{e}");
        let e = ck.read_box(&m, w, &[0], &[2]).unwrap_err();
        assert!(matches!(e, Error::BadBox { .. }), "{e}");
        assert!(ck.read_box(&m, w, &[0, 1], &[2, 0]).unwrap().is_empty());
    }

    #[test]
    fn metadata_json_errors() {
        let mut m = crate::formats::members::MemoryMembers::default();
        m.insert(
            "mw/metadata.json",
            b"{\"sharded_backend\": \"tensorstore\"}".to_vec(),
        );
        let e = DistCheckpoint::open(&m, "mw").unwrap_err();
        assert!(matches!(e, Error::MetadataJson { .. }));
        assert!(e.to_string().contains("tensorstore"), "{e}");
        m.insert("mw/metadata.json", b"nope".to_vec());
        assert!(matches!(
            DistCheckpoint::open(&m, "mw"),
            Err(Error::MetadataJson { .. })
        ));
        let empty = crate::formats::members::MemoryMembers::default();
        let e = DistCheckpoint::open(&empty, "mw").unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn too_many_dims_and_missing_members() {
        let t = DistTensor {
            key: "t".into(),
            dtype: Dtype::F32,
            shape: vec![1; MAX_DIMS + 1],
            chunks: vec![],
        };
        assert!(matches!(validate_chunks(&t), Err(Error::TooMany { .. })));
        let m = crate::formats::members::MemoryMembers::default();
        let e = read(&m, "x/__0_0.distcp").unwrap_err();
        assert!(
            e.to_string().starts_with("x/__0_0.distcp: cannot read"),
            "{e}"
        );
        let e = Error::NoSuchKey { key: "k".into() };
        assert_eq!(e.to_string(), "no tensor or object `k` in the checkpoint");
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Fixture folders as members, and a temporary output folder.
    use super::*;
    use crate::formats::members::MemoryMembers;
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

    /// The regular files of an uncompressed ustar file (test-only; the real
    /// reader is the archive module), names without a leading `./`.
    pub fn tar_members(rel: &str) -> MemoryMembers {
        let b = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap();
        let mut m = MemoryMembers::default();
        let mut pos = 0;
        while pos + 512 <= b.len() && b[pos] != 0 {
            let h = &b[pos..pos + 512];
            let cstr = |r: std::ops::Range<usize>| {
                let f = &h[r];
                let n = f.iter().position(|&c| c == 0).unwrap_or(f.len());
                String::from_utf8(f[..n].to_vec()).unwrap()
            };
            let size = u64::from_str_radix(cstr(124..136).trim(), 8).unwrap() as usize;
            let prefix = cstr(345..500);
            let name = cstr(0..100);
            let full = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            if h[156] == b'0' || h[156] == 0 {
                m.insert(
                    full.trim_start_matches("./"),
                    b[pos + 512..pos + 512 + size].to_vec(),
                );
            }
            pos += 512 + size.div_ceil(512) * 512;
        }
        m
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
