//! Writing a [`DistCheckpoint`] as a torch DCP / Megatron `torch_dist`
//! folder: `metadata.json`, `.metadata`, `common.pt` and one `__0_0.distcp`.
//!
//! `.metadata` is emitted by hand as a protocol-2 pickle of the `Metadata`
//! dataclass tree (GLOBAL + NEWOBJ + BUILD; `torch.Size`, the layout and the
//! memory-format enum by REDUCE), which Python's `pickle.load` and torch's
//! `FileSystemReader` accept. No Megatron classes are written
//! (`planner_data` is None, no `all_local_plans`), so megatron need not be
//! importable; `mcore_data` (plain dicts) is kept for Megatron readers.
//!
//! Items of a DCP source are copied verbatim; chunks of another source are
//! saved as `torch.save` streams of the contiguous chunk tensor.
//!
//! # Errors
//! [`crate::formats::dist::Error`].

use std::io;

use crate::formats::dist::{self, DistCheckpoint, DistTensor, Location, OutDir, PathPart};
use crate::formats::members::Members;
use crate::formats::torch::dtype::Dtype;

/// The one data file this writer produces.
pub const DATA_FILE: &str = "__0_0.distcp";

/// The `metadata.json` megatron-core 0.16 writes for a torch_dist folder.
pub const METADATA_JSON: &str = r#"{"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}"#;

/// A minimal protocol-2 pickle emitter for the `Metadata` tree (no memo).
struct Emit {
    b: Vec<u8>,
}

impl Emit {
    fn global(&mut self, module: &str, name: &str) {
        self.b.push(b'c');
        self.b.extend_from_slice(module.as_bytes());
        self.b.push(b'\n');
        self.b.extend_from_slice(name.as_bytes());
        self.b.push(b'\n');
    }
    fn str(&mut self, s: &str) {
        self.b.push(b'X');
        self.b.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.b.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.b.extend_from_slice(&[b'K', v as u8]);
        } else if (0..65536).contains(&v) {
            self.b.push(b'M');
            self.b.extend_from_slice(&(v as u16).to_le_bytes());
        } else if let Ok(i) = i32::try_from(v) {
            self.b.push(b'J');
            self.b.extend_from_slice(&i.to_le_bytes());
        } else {
            // LONG1: minimal little-endian two's complement.
            let mut bytes = v.to_le_bytes().to_vec();
            while bytes.len() > 1 {
                let (last, prev) = (bytes[bytes.len() - 1], bytes[bytes.len() - 2]);
                if (last == 0 && prev < 0x80) || (last == 0xff && prev >= 0x80) {
                    bytes.pop();
                } else {
                    break;
                }
            }
            self.b.extend_from_slice(&[0x8a, bytes.len() as u8]);
            self.b.extend_from_slice(&bytes);
        }
    }
    fn none(&mut self) {
        self.b.push(b'N');
    }
    fn bool(&mut self, v: bool) {
        self.b.push(if v { 0x88 } else { 0x89 });
    }
    fn mark(&mut self) {
        self.b.push(b'(');
    }
    /// `cls.__new__(cls)`; follow with a state and [`Emit::build`], or not.
    fn new_obj(&mut self, module: &str, name: &str) {
        self.global(module, name);
        self.b.extend_from_slice(&[b')', 0x81]);
    }
    fn build(&mut self) {
        self.b.push(b'b');
    }
    fn empty_dict_mark(&mut self) {
        self.b.extend_from_slice(b"}(");
    }
    fn setitems(&mut self) {
        self.b.push(b'u');
    }
    /// `torch.Size((dims...))`.
    fn size(&mut self, dims: &[u64]) {
        self.global("torch", "Size");
        self.mark();
        for &d in dims {
            self.int(d as i64);
        }
        self.b.extend_from_slice(&[b't', 0x85, b'R']);
    }
}

const MD: &str = "torch.distributed.checkpoint.metadata";
const FS: &str = "torch.distributed.checkpoint.filesystem";

/// One item of the data file.
struct Item<'a> {
    fqn: &'a str,
    /// Chunk offsets (None for byte items).
    offsets: Option<&'a [u64]>,
    offset: u64,
    length: u64,
}

fn emit_properties(e: &mut Emit, dtype: Dtype) {
    e.new_obj(MD, "TensorProperties");
    e.mark();
    e.global("torch", dtype.torch_name());
    e.global("torch.serialization", "_get_layout");
    e.str("torch.strided");
    e.b.extend_from_slice(&[0x85, b'R']);
    e.bool(false);
    e.global(MD, "_MEM_FORMAT_ENCODING");
    e.int(0);
    e.b.extend_from_slice(&[0x85, b'R']);
    e.bool(false);
    e.b.push(b't');
    e.build();
}

/// The `.metadata` pickle for `ck` with items laid out as `items`.
fn metadata_pickle(ck: &DistCheckpoint, items: &[Item<'_>]) -> Vec<u8> {
    let mut e = Emit { b: vec![0x80, 2] };
    e.new_obj(MD, "Metadata");
    e.empty_dict_mark();
    e.str("state_dict_metadata");
    e.empty_dict_mark();
    for t in &ck.tensors {
        e.str(&t.key);
        e.new_obj(MD, "TensorStorageMetadata");
        e.empty_dict_mark();
        e.str("properties");
        emit_properties(&mut e, t.dtype);
        e.str("size");
        e.size(&t.shape);
        e.str("chunks");
        e.b.extend_from_slice(b"](");
        for c in &t.chunks {
            e.new_obj(MD, "ChunkStorageMetadata");
            e.empty_dict_mark();
            e.str("offsets");
            e.size(&c.offsets);
            e.str("sizes");
            e.size(&c.sizes);
            e.setitems();
            e.build();
        }
        e.b.push(b'e');
        e.setitems();
        e.build();
    }
    for o in &ck.objects {
        e.str(&o.key);
        e.new_obj(MD, "BytesStorageMetadata");
    }
    e.setitems();
    e.str("planner_data");
    if ck.planner_paths.is_empty() {
        e.none();
    } else {
        e.empty_dict_mark();
        for (k, path) in &ck.planner_paths {
            e.str(k);
            e.mark();
            for p in path {
                match p {
                    PathPart::Key(s) => e.str(s),
                    PathPart::Index(i) => e.int(*i),
                }
            }
            e.b.push(b't');
        }
        e.setitems();
    }
    e.str("storage_data");
    e.empty_dict_mark();
    for it in items {
        e.new_obj(MD, "MetadataIndex");
        e.empty_dict_mark();
        e.str("fqn");
        e.str(it.fqn);
        if let Some(off) = it.offsets {
            e.str("offset");
            e.size(off);
        }
        e.str("index");
        e.none();
        e.setitems();
        e.build();
        e.new_obj(FS, "_StorageInfo");
        e.empty_dict_mark();
        e.str("relative_path");
        e.str(DATA_FILE);
        e.str("offset");
        e.int(it.offset as i64);
        e.str("length");
        e.int(it.length as i64);
        e.setitems();
        e.build();
    }
    e.setitems();
    e.str("storage_meta");
    e.none();
    if ck.mcore {
        e.str("mcore_data");
        e.empty_dict_mark();
        for t in &ck.tensors {
            e.str(&t.key);
            e.b.push(b'}');
        }
        e.setitems();
    }
    e.setitems();
    e.build();
    e.b.push(b'.');
    e.b
}

/// What goes into the data file for one item.
enum Source<'a> {
    /// Copy `[offset, offset+length)` of a source member.
    Verbatim {
        member: &'a str,
        offset: u64,
        length: u64,
    },
    /// Bytes prepared while planning (an object re-encoded from zarr).
    Owned(crate::io::bytes::ByteView),
    /// Save chunk `chunk` of `tensor` as a torch.save stream.
    Save {
        tensor: &'a DistTensor,
        chunk: usize,
    },
}

/// An item already stored in a torch_dist data file is copied as it is:
/// its length and source; `None` for other locations.
fn verbatim(loc: &Location) -> Option<(u64, Source<'_>)> {
    match loc {
        Location::Item {
            member,
            offset,
            length,
        } => Some((
            *length,
            Source::Verbatim {
                member,
                offset: *offset,
                length: *length,
            },
        )),
        _ => None,
    }
}

/// Serializes chunk `chunk` of `t` as a `torch.save` stream of one contiguous tensor.
fn save_chunk(
    ck: &DistCheckpoint,
    src: &dyn Members,
    t: &DistTensor,
    chunk: usize,
) -> Result<Vec<u8>, dist::Error> {
    let c = &t.chunks[chunk];
    let pieces = ck.read_box(src, t, &c.offsets, &c.sizes)?;
    crate::formats::dist::dcp::save_tensor_stream(t.dtype, &c.sizes, pieces).map_err(|e| {
        dist::Error::BadChunk {
            key: t.key.clone(),
            index: chunk,
            member: c.location.member().to_string(),
            why: format!("cannot save as torch.save: {e}"),
        }
    })
}

/// Writes `ck` (read from `src`) as a DCP folder into `out`: `metadata.json`
/// (verbatim, or the torch_dist default when converting from zarr),
/// `common.pt` verbatim, `.metadata`, and `__0_0.distcp` holding the byte
/// items then every tensor chunk.
///
/// Zarr shard objects (`torch.save(obj)`) are re-encoded as Megatron's
/// `torch.save([obj])`; zarr chunks are saved as `torch.save` streams.
///
/// # Errors
/// Unreadable source items or objects, I/O.
pub fn write_torch_dist(
    ck: &DistCheckpoint,
    src: &dyn Members,
    out: &mut dyn OutDir,
) -> Result<(), dist::Error> {
    let io_err = |member: &str, e: io::Error| dist::Error::Write {
        member: member.to_string(),
        source: e,
    };
    let mut plan: Vec<(Item<'_>, Source<'_>)> = Vec::new();
    let mut pos = 0u64;
    for o in &ck.objects {
        let (length, source) = match verbatim(&o.location) {
            Some(v) => v,
            None => {
                let b = ck.object_bytes_for(src, o, dist::Backend::TorchDist)?;
                (b.len() as u64, Source::Owned(b))
            }
        };
        plan.push((
            Item {
                fqn: &o.key,
                offsets: None,
                offset: pos,
                length,
            },
            source,
        ));
        pos += length;
    }
    for t in &ck.tensors {
        for (i, c) in t.chunks.iter().enumerate() {
            let (length, source) = match verbatim(&c.location) {
                Some(v) => v,
                None => (
                    save_chunk(ck, src, t, i)?.len() as u64,
                    Source::Save {
                        tensor: t,
                        chunk: i,
                    },
                ),
            };
            plan.push((
                Item {
                    fqn: &t.key,
                    offsets: Some(&c.offsets),
                    offset: pos,
                    length,
                },
                source,
            ));
            pos += length;
        }
    }

    let items: Vec<Item<'_>> = plan
        .iter()
        .map(|(it, _)| Item {
            fqn: it.fqn,
            offsets: it.offsets,
            offset: it.offset,
            length: it.length,
        })
        .collect();
    let md = metadata_pickle(ck, &items);
    dist::write_bytes(out, ".metadata", &md).map_err(|e| io_err(".metadata", e))?;

    // Read every source first so the fill closure only does I/O.
    let mut failure: Option<dist::Error> = None;
    let r = out.write_file(DATA_FILE, pos, &mut |w| {
        for (it, s) in &plan {
            let bytes = match s {
                Source::Verbatim {
                    member,
                    offset,
                    length,
                } => dist::read(src, member).and_then(|f| {
                    f.slice_len(*offset, *length)
                        .map_err(|e| dist::Error::BadChunk {
                            key: it.fqn.to_string(),
                            index: 0,
                            member: member.to_string(),
                            why: format!("item: {e}"),
                        })
                }),
                Source::Owned(b) => Ok(b.clone()),
                Source::Save { tensor, chunk } => {
                    save_chunk(ck, src, tensor, *chunk).map(crate::io::bytes::ByteView::from_vec)
                }
            };
            match bytes {
                Ok(b) if b.len() as u64 == it.length => w.write_all(b.as_slice())?,
                Ok(b) => {
                    failure = Some(dist::Error::BadChunk {
                        key: it.fqn.to_string(),
                        index: 0,
                        member: DATA_FILE.into(),
                        why: format!("item changed size: {} then {}", it.length, b.len()),
                    });
                    return Err(io::Error::other("item changed size"));
                }
                Err(e) => {
                    failure = Some(e);
                    return Err(io::Error::other("source item unreadable"));
                }
            }
        }
        Ok(())
    });
    if let Some(f) = failure {
        return Err(f);
    }
    r.map_err(|e| io_err(DATA_FILE, e))?;
    // Files go out in the order Python's `tar.add` lists a folder (`.metadata`,
    // `__0_0.distcp`, `common.pt`, `metadata.json`), so a packed archive keeps
    // NeMo's member order.
    if let Some(c) = &ck.common_bytes {
        dist::write_bytes(out, "common.pt", c.as_slice()).map_err(|e| io_err("common.pt", e))?;
    }
    if let (Some(json), dist::Backend::TorchDist) = (&ck.metadata_json, ck.backend) {
        dist::write_bytes(out, "metadata.json", json.as_bytes())
            .map_err(|e| io_err("metadata.json", e))?;
    } else if ck.backend == dist::Backend::Zarr {
        let json = METADATA_JSON.as_bytes();
        dist::write_bytes(out, "metadata.json", json).map_err(|e| io_err("metadata.json", e))?;
    }
    Ok(())
}

/// Produces a chunk's row-major bytes on demand: `(tensor index, chunk
/// index, sink)`; must write exactly the chunk's bytes.
pub type ChunkFill<'a> =
    dyn FnMut(usize, usize, &mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> + 'a;

/// Writes one chunk's bytes into the sink it is given.
type ByteFill<'a> = dyn FnMut(&mut dyn FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> + 'a;

/// The `torch.save` stream of one contiguous tensor whose bytes come from
/// `fill` (written into `w`); returns the stream length. With a `fill` that
/// writes zeros this measures the length without touching any payload: an
/// uncompressed zip's size does not depend on the bytes.
fn save_chunk_with(
    w: &mut dyn io::Write,
    dtype: Dtype,
    sizes: &[u64],
    fill: &mut ByteFill<'_>,
) -> io::Result<u64> {
    use crate::formats::torch::tensor::{StorageRef, TensorRef};
    use crate::io::piece::Piece;
    let n = sizes
        .iter()
        .try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| io::Error::other("chunk size overflows"))?;
    let t = TensorRef::contiguous(
        dtype,
        sizes.to_vec(),
        StorageRef::from_pieces("0", vec![Piece::Zeros(n)]),
    )
    .map_err(io::Error::other)?;
    let root = crate::formats::torch::Value::Tensor(Box::new(t));
    let mut counting = crate::io::outdir::Counting { inner: w, n: 0 };
    let mut f = |_: &crate::formats::torch::tensor::StorageRef,
                 sink: &mut dyn crate::io::sink::RecordSink| {
        fill(&mut |b: &[u8]| sink.bytes(b))
    };
    crate::formats::torch::file::save_with(&mut counting, "archive", &root, &mut f)
        .map_err(io::Error::other)?;
    Ok(counting.n)
}

/// Writes a torch_dist folder whose tensor chunks stream from `fill` (no
/// chunk is materialised; lengths are measured with zero payloads first)
/// and whose objects are the given byte items (`torch.save([obj])`, keyed
/// by their unique key). `ck` supplies the tensors with their chunks
/// (locations are ignored), `metadata_json` and `common_bytes`; its
/// `objects` are ignored in favour of `objects`.
///
/// # Errors
/// I/O errors from the output or from `fill`.
pub fn write_torch_dist_streamed(
    ck: &DistCheckpoint,
    objects: &[(String, crate::io::bytes::ByteView)],
    fill: &mut ChunkFill<'_>,
    out: &mut dyn OutDir,
) -> Result<(), dist::Error> {
    let io_err = |member: &str, e: io::Error| dist::Error::Write {
        member: member.to_string(),
        source: e,
    };
    let mut items: Vec<Item<'_>> = Vec::new();
    let mut pos = 0u64;
    for (key, b) in objects {
        items.push(Item {
            fqn: key,
            offsets: None,
            offset: pos,
            length: b.len() as u64,
        });
        pos += b.len() as u64;
    }
    for t in &ck.tensors {
        for c in &t.chunks {
            let length = save_chunk_with(&mut io::sink(), t.dtype, &c.sizes, &mut |sink| {
                crate::io::sink::write_zeros(sink, chunk_nbytes(t.dtype, &c.sizes))
            })
            .map_err(|e| io_err(DATA_FILE, e))?;
            items.push(Item {
                fqn: &t.key,
                offsets: Some(&c.offsets),
                offset: pos,
                length,
            });
            pos += length;
        }
    }
    let mut md_ck = ck.clone();
    md_ck.objects = objects
        .iter()
        .map(|(k, _)| dist::DistObject {
            key: k.clone(),
            location: Location::File {
                member: String::new(),
            },
        })
        .collect();
    let md = metadata_pickle(&md_ck, &items);
    dist::write_bytes(out, ".metadata", &md).map_err(|e| io_err(".metadata", e))?;
    out.write_file(DATA_FILE, pos, &mut |w| {
        for (_, b) in objects {
            w.write_all(b.as_slice())?;
        }
        for (ti, t) in ck.tensors.iter().enumerate() {
            for (ci, c) in t.chunks.iter().enumerate() {
                save_chunk_with(w, t.dtype, &c.sizes, &mut |sink| fill(ti, ci, sink))?;
            }
        }
        Ok(())
    })
    .map_err(|e| io_err(DATA_FILE, e))?;
    if let Some(c) = &ck.common_bytes {
        dist::write_bytes(out, "common.pt", c.as_slice()).map_err(|e| io_err("common.pt", e))?;
    }
    if let Some(json) = &ck.metadata_json {
        dist::write_bytes(out, "metadata.json", json.as_bytes())
            .map_err(|e| io_err("metadata.json", e))?;
    }
    Ok(())
}

fn chunk_nbytes(dtype: Dtype, sizes: &[u64]) -> u64 {
    sizes
        .iter()
        .fold(dtype.size() as u64, |a, &d| a.saturating_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::dist::testutil::{dir_members, TempOut};
    use crate::formats::dist::{Chunk, DistObject};
    use crate::formats::members::MemoryMembers;

    const FIXTURES: &[(&str, &str)] = &[
        ("plain", "fixtures/torch-samples/dcp/plain_single_rank"),
        (
            "v013",
            "fixtures/torch-samples/dcp/megatron_core_v0.13.0_tp2",
        ),
        (
            "v019",
            "fixtures/torch-samples/dcp/megatron_core_v0.19.0_tp2",
        ),
        ("llama", "fixtures/mcore/llama/dcp_tp1"),
    ];

    fn item_bytes(m: &dyn Members, l: &Location) -> Vec<u8> {
        match l {
            Location::Item {
                member,
                offset,
                length,
            } => m
                .read_member(member)
                .unwrap()
                .slice_len(*offset, *length)
                .unwrap()
                .as_slice()
                .to_vec(),
            other => panic!("{other:?}"),
        }
    }

    /// Same keys, dtypes, shapes, chunk boxes and item bytes.
    fn assert_same(a: &DistCheckpoint, am: &dyn Members, b: &DistCheckpoint, bm: &dyn Members) {
        assert_eq!(a.tensors.len(), b.tensors.len());
        for (x, y) in a.tensors.iter().zip(&b.tensors) {
            assert_eq!((&x.key, x.dtype, &x.shape), (&y.key, y.dtype, &y.shape));
            assert_eq!(x.chunks.len(), y.chunks.len());
            for (cx, cy) in x.chunks.iter().zip(&y.chunks) {
                assert_eq!((&cx.offsets, &cx.sizes), (&cy.offsets, &cy.sizes));
                assert_eq!(item_bytes(am, &cx.location), item_bytes(bm, &cy.location));
            }
        }
        assert_eq!(a.objects.len(), b.objects.len());
        for (x, y) in a.objects.iter().zip(&b.objects) {
            assert_eq!(x.key, y.key);
            assert_eq!(item_bytes(am, &x.location), item_bytes(bm, &y.location));
        }
        assert_eq!(a.metadata_json, b.metadata_json);
        assert_eq!(
            a.common_bytes.as_ref().map(|c| c.as_slice().to_vec()),
            b.common_bytes.as_ref().map(|c| c.as_slice().to_vec())
        );
        assert_eq!(a.mcore, b.mcore);
        assert_eq!(a.planner_paths, b.planner_paths);
    }

    #[test]
    fn torch_dist_round_trip_is_identical() {
        for (_, dir) in FIXTURES {
            let m = dir_members(dir);
            let ck = DistCheckpoint::open(&m, "").unwrap();
            let mut out = TempOut::new();
            write_torch_dist(&ck, &m, &mut out.dir).unwrap();
            let m2 = out.members("model_weights");
            let ck2 = DistCheckpoint::open(&m2, "model_weights").unwrap();
            assert_same(&ck, &m, &ck2, &m2);
            let data: Vec<_> = m2
                .member_names()
                .into_iter()
                .filter(|n| n.ends_with(".distcp"))
                .collect();
            assert_eq!(data, ["model_weights/__0_0.distcp"], "{dir}");
        }
    }

    /// Writes each fixture's round trip to `target/interop/dcp_roundtrip/<name>/`
    /// for `tests/interop/test_dcp.py` (real torch reads them).
    #[test]
    fn writes_interop_folders() {
        let root = std::env::var_os("NEMO_TOOL_DCP_ROUNDTRIP")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("target/interop/dcp_roundtrip")
            });
        for (name, dir) in FIXTURES {
            let m = dir_members(dir);
            let ck = DistCheckpoint::open(&m, "").unwrap();
            let target = root.join(name);
            let _ = std::fs::remove_dir_all(&target);
            write_torch_dist(&ck, &m, &mut dist::FsDir::new(&target)).unwrap();
        }
        // torch_dist -> zarr, for the real zarr package
        let m = dir_members("fixtures/mcore/llama/dcp_tp1");
        let ck = DistCheckpoint::open(&m, "").unwrap();
        let target = root.join("llama_as_zarr");
        let _ = std::fs::remove_dir_all(&target);
        crate::formats::dist::zarr_write::write_zarr(&ck, &m, &mut dist::FsDir::new(&target))
            .unwrap();
        for (name, dir) in [
            ("zarr_llama", "fixtures/zarr/llama_tp2"),
            ("zarr_extra", "fixtures/zarr/extra"),
        ] {
            let m = dir_members(dir);
            let ck = DistCheckpoint::open(&m, "model_weights").unwrap();
            let target = root.join(name);
            let _ = std::fs::remove_dir_all(&target);
            write_torch_dist(&ck, &m, &mut dist::FsDir::new(&target)).unwrap();
        }
    }

    fn assert_same_values(
        a: &DistCheckpoint,
        am: &dyn Members,
        b: &DistCheckpoint,
        bm: &dyn Members,
    ) {
        let mut ka: Vec<_> = a.tensors.iter().map(|t| t.key.clone()).collect();
        let mut kb: Vec<_> = b.tensors.iter().map(|t| t.key.clone()).collect();
        ka.sort();
        kb.sort();
        assert_eq!(ka, kb);
        for x in &a.tensors {
            let y = b.tensor(&x.key).unwrap();
            assert_eq!((x.dtype, &x.shape), (y.dtype, &y.shape), "{}", x.key);
            assert_eq!(
                dist::pieces_to_vec(&a.read_global(am, x).unwrap()),
                dist::pieces_to_vec(&b.read_global(bm, y).unwrap()),
                "{}",
                x.key
            );
        }
        let mut oa: Vec<_> = a.objects.iter().map(|o| o.key.clone()).collect();
        let mut ob: Vec<_> = b.objects.iter().map(|o| o.key.clone()).collect();
        oa.sort();
        ob.sort();
        assert_eq!(oa, ob);
    }

    #[test]
    fn zarr_to_torch_dist_and_back() {
        for fx in ["fixtures/zarr/llama_tp2", "fixtures/zarr/extra"] {
            let z = dir_members(fx);
            let zck = DistCheckpoint::open(&z, "model_weights").unwrap();
            let mut out = TempOut::new();
            write_torch_dist(&zck, &z, &mut out.dir).unwrap();
            let d = out.members("model_weights");
            let dck = DistCheckpoint::open(&d, "model_weights").unwrap();
            assert_eq!(dck.backend, dist::Backend::TorchDist);
            assert_same_values(&zck, &z, &dck, &d);
            for o in &dck.objects {
                let v = dck.read_object(&d, o).unwrap();
                let zo = zck.read_object(&z, zck.object(&o.key).unwrap()).unwrap();
                assert_eq!(
                    v,
                    crate::formats::torch::pickle::Value::List(vec![zo]),
                    "{}",
                    o.key
                );
            }
            // and back to zarr: byte-identical chunk files
            let mut out2 = TempOut::new();
            crate::formats::dist::zarr_write::write_zarr(&dck, &d, &mut out2.dir).unwrap();
            let z2 = out2.members("model_weights");
            for n in z.member_names() {
                if n.ends_with(".pt") || n.ends_with("metadata.json") {
                    continue; // re-saved objects differ in archive naming only
                }
                assert_eq!(
                    z.read_member(&n).unwrap().as_slice(),
                    z2.read_member(&n).unwrap().as_slice(),
                    "{n}"
                );
            }
        }
    }

    #[test]
    fn torch_dist_to_zarr() {
        let m = dir_members("fixtures/mcore/llama/dcp_tp1");
        let ck = DistCheckpoint::open(&m, "").unwrap();
        let mut out = TempOut::new();
        crate::formats::dist::zarr_write::write_zarr(&ck, &m, &mut out.dir).unwrap();
        let z = out.members("model_weights");
        let zck = DistCheckpoint::open(&z, "model_weights").unwrap();
        assert_eq!(zck.backend, dist::Backend::Zarr);
        assert_same_values(&ck, &m, &zck, &z);
        for o in &zck.objects {
            assert_eq!(
                zck.read_object(&z, o).unwrap(),
                crate::formats::torch::pickle::Value::None
            );
        }
    }

    fn one_tensor(chunks: Vec<Chunk>) -> DistCheckpoint {
        DistCheckpoint {
            dir: String::new(),
            backend: dist::Backend::TorchDist,
            metadata_json: None,
            tensors: vec![DistTensor {
                key: "w".into(),
                dtype: Dtype::F32,
                shape: vec![4],
                chunks,
            }],
            objects: vec![DistObject {
                key: "o".into(),
                location: Location::Item {
                    member: "d".into(),
                    offset: 0,
                    length: 1,
                },
            }],
            common_bytes: None,
            common: None,
            warnings: vec![],
            mcore: true,
            planner_paths: vec![],
        }
    }

    fn chunk(off: u64, size: u64) -> Chunk {
        Chunk {
            offsets: vec![off],
            sizes: vec![size],
            location: Location::Item {
                member: DATA_FILE.into(),
                offset: 0,
                length: 1,
            },
        }
    }

    fn members_with(md: Vec<u8>) -> MemoryMembers {
        let mut m = MemoryMembers::default();
        m.insert(".metadata", md);
        m.insert(DATA_FILE, vec![0; 8]);
        m
    }

    #[test]
    fn emitted_metadata_parses_back() {
        let ck = one_tensor(vec![chunk(0, 2), chunk(2, 2)]);
        let items = [
            Item {
                fqn: "o",
                offsets: None,
                offset: 0,
                length: 1,
            },
            Item {
                fqn: "w",
                offsets: Some(&[0]),
                offset: 1,
                length: 3,
            },
            Item {
                fqn: "w",
                offsets: Some(&[2]),
                offset: 4,
                length: 1 << 40,
            },
        ];
        let m = members_with(metadata_pickle(&ck, &items));
        let back = DistCheckpoint::open(&m, "").unwrap();
        assert_eq!(back.tensors[0].shape, vec![4]);
        assert_eq!(
            back.tensors[0].chunks[1].location,
            Location::Item {
                member: DATA_FILE.into(),
                offset: 4,
                length: 1 << 40,
            }
        );
        assert_eq!(back.objects[0].key, "o");
        assert!(back.mcore);
    }

    #[test]
    fn overlapping_and_missing_chunks_are_refused() {
        let items = |offs: &'static [[u64; 1]]| -> Vec<Item<'static>> {
            offs.iter()
                .map(|o| Item {
                    fqn: "w",
                    offsets: Some(&o[..]),
                    offset: 0,
                    length: 1,
                })
                .chain([Item {
                    fqn: "o",
                    offsets: None,
                    offset: 0,
                    length: 1,
                }])
                .collect()
        };
        let ck = one_tensor(vec![chunk(0, 2), chunk(1, 3)]);
        let e = DistCheckpoint::open(&members_with(metadata_pickle(&ck, &items(&[[0], [1]]))), "")
            .unwrap_err();
        assert!(matches!(e, dist::Error::Overlap { .. }), "{e}");
        assert_eq!(e.to_string(), "w: chunks 0 and 1 overlap");

        let ck = one_tensor(vec![chunk(0, 2)]);
        let e = DistCheckpoint::open(&members_with(metadata_pickle(&ck, &items(&[[0]]))), "")
            .unwrap_err();
        assert!(matches!(e, dist::Error::Coverage { .. }), "{e}");
        assert_eq!(e.to_string(), "w: chunks cover 2 of 4 elements");

        let ck = one_tensor(vec![chunk(0, 2), chunk(2, 3)]);
        let e = DistCheckpoint::open(&members_with(metadata_pickle(&ck, &items(&[[0], [2]]))), "")
            .unwrap_err();
        assert!(matches!(e, dist::Error::ChunkOutside { .. }), "{e}");

        // a chunk with no storage_data entry
        let ck = one_tensor(vec![chunk(0, 2), chunk(2, 2)]);
        let e = DistCheckpoint::open(&members_with(metadata_pickle(&ck, &items(&[[0]]))), "")
            .unwrap_err();
        assert!(e.to_string().contains("has no storage_data entry"), "{e}");
    }

    /// A DCP folder with one tensor `t` [3,2] whose single chunk item is `item`.
    fn strided_folder(item: Vec<u8>, dtype: Dtype) -> MemoryMembers {
        let ck = DistCheckpoint {
            tensors: vec![DistTensor {
                key: "t".into(),
                dtype,
                shape: vec![3, 2],
                chunks: vec![Chunk {
                    offsets: vec![0, 0],
                    sizes: vec![3, 2],
                    location: Location::Item {
                        member: DATA_FILE.into(),
                        offset: 0,
                        length: item.len() as u64,
                    },
                }],
            }],
            objects: vec![],
            ..one_tensor(vec![])
        };
        let items = [Item {
            fqn: "t",
            offsets: Some(&[0, 0]),
            offset: 0,
            length: item.len() as u64,
        }];
        let mut m = MemoryMembers::default();
        m.insert(".metadata", metadata_pickle(&ck, &items));
        m.insert(DATA_FILE, item);
        m
    }

    fn transposed_item() -> Vec<u8> {
        use crate::formats::torch::tensor::{StorageRef, TensorKind, TensorRef};
        let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let t = TensorRef {
            dtype: Dtype::F32,
            shape: vec![3, 2],
            stride: vec![1, 3],
            storage_offset: 0,
            storage: StorageRef::from_view("0", crate::io::bytes::ByteView::from_vec(data)),
            requires_grad: false,
            kind: TensorKind::Plain,
        };
        crate::formats::torch::file::save(
            Vec::new(),
            "archive",
            &crate::formats::torch::pickle::Value::Tensor(Box::new(t)),
        )
        .unwrap()
    }

    #[test]
    fn non_contiguous_chunks_are_read_element_by_element() {
        let m = strided_folder(transposed_item(), Dtype::F32);
        let ck = DistCheckpoint::open(&m, "").unwrap();
        let t = ck.tensor("t").unwrap();
        let p = ck.read_global(&m, t).unwrap();
        let v = crate::formats::dist::testutil::f32s(&dist::pieces_to_vec(&p));
        assert_eq!(v, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let col = ck.read_box(&m, t, &[0, 1], &[3, 1]).unwrap();
        assert_eq!(
            crate::formats::dist::testutil::f32s(&dist::pieces_to_vec(&col)),
            [3.0, 4.0, 5.0]
        );
        // saving it again makes the chunk contiguous, with the same values
        let mut out = TempOut::new();
        let mut ck2 = ck.clone();
        ck2.backend = dist::Backend::Zarr; // force a re-save instead of a verbatim copy
        ck2.tensors[0].chunks[0].location = Location::ZarrChunk {
            member: DATA_FILE.into(),
            chunk_shape: vec![3, 2],
        };
        let e = write_torch_dist(&ck2, &m, &mut out.dir).unwrap_err();
        assert!(e.to_string().contains("chunk file holds"), "{e}");
    }

    #[test]
    fn chunk_dtype_or_shape_mismatch_is_an_error() {
        let m = strided_folder(transposed_item(), Dtype::BF16);
        let ck = DistCheckpoint::open(&m, "").unwrap();
        let e = ck.read_chunk(&m, ck.tensor("t").unwrap(), 0).unwrap_err();
        assert!(
            e.to_string()
                .contains("stored dtype float32 but metadata says bfloat16"),
            "{e}"
        );
        let m = strided_folder(b"PK not a zip".to_vec(), Dtype::F32);
        let ck = DistCheckpoint::open(&m, "").unwrap();
        let e = ck.read_chunk(&m, ck.tensor("t").unwrap(), 0).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("t: chunk 0 (__0_0.distcp): torch.save stream"),
            "{e}"
        );
    }
}
