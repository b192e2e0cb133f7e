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
//! [`crate::dist::Error`].

use std::io;

use crate::dist::{self, DistCheckpoint, DistTensor, Location, OutDir};
use crate::members::Members;
use crate::torch::dtype::Dtype;

/// The one data file this writer produces.
pub const DATA_FILE: &str = "__0_0.distcp";

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
    e.none();
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
    /// Save chunk `chunk` of `tensor` as a torch.save stream.
    Save {
        tensor: &'a DistTensor,
        chunk: usize,
    },
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
    crate::dcp::save_tensor_stream(t.dtype, &c.sizes, pieces).map_err(|e| dist::Error::BadChunk {
        key: t.key.clone(),
        index: chunk,
        member: c.location.member().to_string(),
        why: format!("cannot save as torch.save: {e}"),
    })
}

/// Writes `ck` (read from `src`) as a DCP folder into `out`: `metadata.json`
/// (verbatim, or the torch_dist default when converting from zarr),
/// `common.pt` verbatim, `.metadata`, and `__0_0.distcp` holding the byte
/// items then every tensor chunk.
///
/// # Errors
/// Unreadable source items, a zarr shard object (its file holds the bare
/// object, a DCP item the list Megatron saves), I/O.
pub fn write_torch_dist(
    ck: &DistCheckpoint,
    src: &dyn Members,
    out: &mut dyn OutDir,
) -> Result<(), dist::Error> {
    let io_err = |member: &str, e: io::Error| {
        dist::Error::from(crate::zarr::Error::Io {
            member: member.to_string(),
            source: e,
        })
    };
    let mut plan: Vec<(Item<'_>, Source<'_>)> = Vec::new();
    let mut pos = 0u64;
    for o in &ck.objects {
        let Location::Item {
            member,
            offset,
            length,
        } = &o.location
        else {
            return Err(dist::Error::BadChunk {
                key: o.key.clone(),
                index: 0,
                member: o.location.member().to_string(),
                why: "a zarr shard object cannot be copied into a torch_dist item".into(),
            });
        };
        plan.push((
            Item {
                fqn: &o.key,
                offsets: None,
                offset: pos,
                length: *length,
            },
            Source::Verbatim {
                member,
                offset: *offset,
                length: *length,
            },
        ));
        pos += length;
    }
    for t in &ck.tensors {
        for (i, c) in t.chunks.iter().enumerate() {
            let (length, source) = match &c.location {
                Location::Item {
                    member,
                    offset,
                    length,
                } => (
                    *length,
                    Source::Verbatim {
                        member,
                        offset: *offset,
                        length: *length,
                    },
                ),
                _ => (
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

    if let Some(json) = &ck.metadata_json {
        dist::write_bytes(out, "metadata.json", json.as_bytes())
            .map_err(|e| io_err("metadata.json", e))?;
    } else if ck.backend == dist::Backend::Zarr {
        let json = br#"{"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}"#;
        dist::write_bytes(out, "metadata.json", json).map_err(|e| io_err("metadata.json", e))?;
    }
    if let Some(c) = &ck.common_bytes {
        dist::write_bytes(out, "common.pt", c.as_slice()).map_err(|e| io_err("common.pt", e))?;
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
                        .map(|v| v.as_slice().to_vec())
                        .map_err(|e| dist::Error::BadChunk {
                            key: it.fqn.to_string(),
                            index: 0,
                            member: member.to_string(),
                            why: format!("item: {e}"),
                        })
                }),
                Source::Save { tensor, chunk } => save_chunk(ck, src, tensor, *chunk),
            };
            match bytes {
                Ok(b) if b.len() as u64 == it.length => w.write_all(&b)?,
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
    r.map_err(|e| io_err(DATA_FILE, e))
}
