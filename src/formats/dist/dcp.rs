//! Reading torch Distributed Checkpoint folders (plain DCP and Megatron-Core
//! `torch_dist`): the `.metadata` pickle (torch-formats.md §4.2) becomes the
//! [`crate::formats::dist`] model, and `.distcp` items are parsed lazily as
//! `torch.save` streams (§4.3).
//!
//! `.metadata` is parsed with a policy that allows torch's `weights_only`
//! globals plus the DCP/Megatron dataclass names (kept as data, never
//! imported); classes are matched by name suffix because older torch
//! pickled some from `torch.distributed._shard...` (§4.2).
//!
//! # Errors
//! [`Error`] names the member and, where known, the tensor key.

use std::collections::HashMap;

pub use super::error::DcpError as Error;
use super::error::Error as DistError;
use super::model::{
    self as dist, Chunk, DistCheckpoint, DistObject, DistTensor, Location, PathPart,
};
use crate::formats::members::Members;
use crate::formats::torch::dtype::Dtype;
use crate::formats::torch::pickle::{self, Object, Policy, Value};
use crate::formats::torch::tensor::TensorRef;
use crate::io::bytes::ByteView;
use crate::io::piece::Piece;

/// Largest `.metadata` accepted (real ones are a few MB even for 70B models).
pub const MAX_METADATA_BYTES: usize = 1 << 30;

/// The globals a DCP/Megatron `.metadata` may name (torch-formats.md §4.2).
pub fn metadata_policy() -> Policy {
    Policy::torch()
        .allow_module_prefix("torch.distributed.checkpoint.")
        .allow_module_prefix("torch.distributed._shard.")
        .allow_module_prefix("megatron.core.")
        .allow_module_prefix("pathlib")
}

/// The globals tolerated inside byte items and `common.pt`: torch's
/// allowlist (which keeps TE < 2 `io.BytesIO` as data) plus the
/// `argparse.Namespace` real `common.pt` files hold.
pub fn object_policy() -> Policy {
    Policy::torch().allow_global("argparse", "Namespace")
}

fn suffix(o: &Object) -> &str {
    &o.class.name
}

/// Reads `.metadata` into `ck` (tensors, objects and their locations).
pub(crate) fn read_metadata(
    members: &dyn Members,
    ck: &mut DistCheckpoint,
) -> Result<(), DistError> {
    let member = dist::join(&ck.dir, ".metadata");
    let bytes = dist::read(members, &member)?;
    let md = parse_metadata(&member, bytes.as_slice())?;
    let (tensors, objects, mcore) = model_from_metadata(&member, &ck.dir, &md)?;
    ck.tensors = tensors;
    ck.objects = objects;
    ck.mcore = mcore;
    ck.planner_paths = planner_paths(&md);
    Ok(())
}

/// Parses `.metadata` bytes with [`metadata_policy`].
///
/// # Errors
/// [`Error::Pickle`] (e.g. a refused `os.system`), [`Error::Shape`].
pub fn parse_metadata(member: &str, bytes: &[u8]) -> Result<Value, Error> {
    if bytes.len() > MAX_METADATA_BYTES {
        return Err(Error::Shape {
            member: member.into(),
            key: String::new(),
            why: format!("{} bytes is over the {MAX_METADATA_BYTES} cap", bytes.len()),
        });
    }
    pickle::parse(bytes, &metadata_policy()).map_err(|source| Error::Pickle {
        member: member.into(),
        source,
    })
}

/// A `torch.Size(...)` (or a plain tuple/list) as dims.
fn size_of(v: &Value) -> Option<Vec<u64>> {
    let seq = match v {
        Value::Object(o) if o.class.name == "Size" => o.args.first()?.as_seq()?,
        other => other.as_seq()?,
    };
    seq.iter()
        .map(|x| x.as_int().and_then(|i| u64::try_from(i).ok()))
        .collect()
}

fn dtype_of(props: &Value) -> Option<Dtype> {
    let o = props.as_object()?;
    let d = match o.state.as_ref()? {
        // torch >= 2.3: __getstate__ tuple (dtype, layout, requires_grad, mem_format, pin_memory)
        Value::Tuple(t) => t.first()?,
        // older torch: a dataclass dict
        st => st.get("dtype")?,
    };
    let g = d.as_global()?;
    Dtype::from_torch_name(&g.name)
}

/// `planner_data` when it is the plain-DCP `{fqn: (key|index, ...)}` map
/// (anything else, e.g. Megatron's None, gives an empty list).
pub fn planner_paths(md: &Value) -> Vec<(String, Vec<PathPart>)> {
    let Some(items) = md
        .as_object()
        .and_then(|o| o.field("planner_data"))
        .and_then(Value::dict_items)
    else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        let (Some(k), Some(seq)) = (k.as_str(), v.as_seq()) else {
            return Vec::new();
        };
        let mut path = Vec::with_capacity(seq.len());
        for p in seq {
            match p {
                Value::Str(s) => path.push(PathPart::Key(s.clone())),
                Value::Int(i) => path.push(PathPart::Index(*i)),
                _ => return Vec::new(),
            }
        }
        out.push((k.to_string(), path));
    }
    out
}

type Model = (Vec<DistTensor>, Vec<DistObject>, bool);

/// Turns a parsed `Metadata` tree into tensors and objects.
///
/// # Errors
/// [`Error::Shape`] when a field is missing or mistyped, [`Error::Unsupported`] for transforms.
pub fn model_from_metadata(member: &str, dir: &str, md: &Value) -> Result<Model, Error> {
    let shape_err = |key: &str, why: &str| Error::Shape {
        member: member.into(),
        key: key.into(),
        why: why.into(),
    };
    // megatron-core 0.15 pickled its own subclass (`MCoreMetadata`: torch's fields plus
    // `mcore_data`); before and after, torch's `Metadata`
    let o = md
        .as_object()
        .filter(|o| matches!(suffix(o), "Metadata" | "MCoreMetadata"))
        .ok_or_else(|| shape_err("", "top object is not a Metadata"))?;
    let sdm = o
        .field("state_dict_metadata")
        .and_then(Value::dict_items)
        .ok_or_else(|| shape_err("state_dict_metadata", "missing or not a dict"))?;
    let storage = o
        .field("storage_data")
        .and_then(Value::dict_items)
        .ok_or_else(|| shape_err("storage_data", "missing or not a dict"))?;
    let mcore = o.field("mcore_data").is_some_and(|v| *v != Value::None);

    // (fqn, offsets or None for byte items) -> location
    let mut where_: HashMap<(String, Option<Vec<u64>>), Location> = HashMap::new();
    for (k, v) in storage {
        let idx = k
            .as_object()
            .filter(|o| suffix(o) == "MetadataIndex")
            .ok_or_else(|| shape_err("storage_data", "key is not a MetadataIndex"))?;
        let fqn = idx
            .field("fqn")
            .and_then(Value::as_str)
            .ok_or_else(|| shape_err("storage_data", "MetadataIndex without fqn"))?;
        let offset = match idx.field("offset") {
            None | Some(Value::None) => None,
            Some(s) => Some(size_of(s).ok_or_else(|| shape_err(fqn, "bad MetadataIndex.offset"))?),
        };
        let info = v
            .as_object()
            .filter(|o| suffix(o) == "_StorageInfo")
            .ok_or_else(|| shape_err(fqn, "storage value is not a _StorageInfo"))?;
        let rel = info
            .field("relative_path")
            .and_then(Value::as_str)
            .ok_or_else(|| shape_err(fqn, "_StorageInfo without relative_path"))?;
        if rel.is_empty() || rel.contains('/') || rel.contains('\\') || rel.starts_with('.') {
            return Err(shape_err(fqn, &format!("unsafe relative_path {rel:?}")));
        }
        let num = |name: &str| {
            info.field(name)
                .and_then(Value::as_int)
                .and_then(|i| u64::try_from(i).ok())
                .ok_or_else(|| shape_err(fqn, &format!("_StorageInfo.{name} missing or negative")))
        };
        let (offset_b, length) = (num("offset")?, num("length")?);
        if let Some(td) = info.field("transform_descriptors") {
            if td.as_seq().is_some_and(|s| !s.is_empty()) {
                return Err(Error::Unsupported {
                    member: member.into(),
                    key: fqn.into(),
                    why: format!("transform_descriptors {td:?}"),
                });
            }
        }
        where_.insert(
            (fqn.to_string(), offset),
            Location::Item {
                member: dist::join(dir, rel),
                offset: offset_b,
                length,
            },
        );
    }

    let mut tensors = Vec::new();
    let mut objects = Vec::new();
    for (k, v) in sdm {
        let key = k
            .as_str()
            .ok_or_else(|| shape_err("state_dict_metadata", "key is not a str"))?;
        let meta = v
            .as_object()
            .ok_or_else(|| shape_err(key, "value is not an object"))?;
        match suffix(meta) {
            "BytesStorageMetadata" => {
                let location = where_
                    .remove(&(key.to_string(), None))
                    .ok_or_else(|| shape_err(key, "byte item has no storage_data entry"))?;
                objects.push(DistObject {
                    key: key.to_string(),
                    location,
                });
            }
            "TensorStorageMetadata" => {
                let dtype = meta
                    .field("properties")
                    .and_then(dtype_of)
                    .ok_or_else(|| shape_err(key, "missing or unknown dtype"))?;
                let shape = meta
                    .field("size")
                    .and_then(size_of)
                    .ok_or_else(|| shape_err(key, "missing size"))?;
                let list = meta
                    .field("chunks")
                    .and_then(Value::as_seq)
                    .ok_or_else(|| shape_err(key, "missing chunks"))?;
                let mut chunks = Vec::with_capacity(list.len());
                for c in list {
                    let co = c
                        .as_object()
                        .ok_or_else(|| shape_err(key, "chunk is not an object"))?;
                    let offsets = co
                        .field("offsets")
                        .and_then(size_of)
                        .ok_or_else(|| shape_err(key, "chunk without offsets"))?;
                    let sizes = co
                        .field("sizes")
                        .and_then(size_of)
                        .ok_or_else(|| shape_err(key, "chunk without sizes"))?;
                    let location = where_
                        .remove(&(key.to_string(), Some(offsets.clone())))
                        .ok_or_else(|| {
                            shape_err(
                                key,
                                &format!("chunk at {offsets:?} has no storage_data entry"),
                            )
                        })?;
                    chunks.push(Chunk {
                        offsets,
                        sizes,
                        location,
                    });
                }
                tensors.push(DistTensor {
                    key: key.to_string(),
                    dtype,
                    shape,
                    chunks,
                });
            }
            other => return Err(shape_err(key, &format!("unknown storage metadata {other}"))),
        }
    }
    Ok((tensors, objects, mcore))
}

/// Parses a `torch.save` stream (a byte item, `common.pt`, a zarr shard
/// `.pt`) with [`object_policy`]; tensors stay views into `bytes`.
///
/// # Errors
/// [`Error::TorchSave`].
pub fn load_torch_save(bytes: &ByteView) -> Result<Value, Error> {
    torch_file::load(bytes, &object_policy()).map_err(|why| Error::TorchSave { why })
}

/// Parses a tensor chunk item: a `torch.save` stream of one tensor.
///
/// # Errors
/// [`Error::TorchSave`], [`Error::NotATensor`].
pub fn load_chunk_item(bytes: &ByteView) -> Result<TensorRef, Error> {
    match load_torch_save(bytes)? {
        Value::Tensor(t) => Ok(*t),
        other => Err(Error::NotATensor {
            found: format!("{other:?}").chars().take(80).collect(),
        }),
    }
}

/// Saves a contiguous tensor given as row-major pieces as a `torch.save` stream.
///
/// # Errors
/// [`Error::TorchSave`].
pub fn save_tensor_stream(
    dtype: Dtype,
    shape: &[u64],
    pieces: Vec<Piece>,
) -> Result<Vec<u8>, Error> {
    torch_file::save_tensor(dtype, shape, pieces).map_err(|why| Error::TorchSave { why })
}

/// The one place that calls `crate::formats::torch::file` (being written on the
/// `torch` branch), so its API can change in one spot.
mod torch_file {
    use crate::formats::torch::dtype::Dtype;
    use crate::formats::torch::pickle::{Policy, Value};
    use crate::formats::torch::tensor::{StorageRef, TensorRef};
    use crate::io::bytes::ByteView;
    use crate::io::piece::Piece;

    pub(super) fn load(bytes: &ByteView, policy: &Policy) -> Result<Value, String> {
        crate::formats::torch::file::load(bytes.clone(), policy)
            .map(|f| f.root)
            .map_err(|e| e.to_string())
    }

    /// DCP items name their archive folder `archive` (torch-formats.md §4.3).
    pub(super) fn save_tensor(
        dtype: Dtype,
        shape: &[u64],
        pieces: Vec<Piece>,
    ) -> Result<Vec<u8>, String> {
        let storage = StorageRef::from_pieces("0", pieces);
        let t = TensorRef::contiguous(dtype, shape.to_vec(), storage).map_err(|e| e.to_string())?;
        crate::formats::torch::file::save(Vec::new(), "archive", &Value::Tensor(Box::new(t)))
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::dist::testutil::dir_members;
    use crate::formats::members::MemoryMembers;

    const PLAIN: &str = "fixtures/torch-samples/dcp/plain_single_rank";
    const V13: &str = "fixtures/torch-samples/dcp/megatron_core_v0.13.0_tp2";
    const V19: &str = "fixtures/torch-samples/dcp/megatron_core_v0.19.0_tp2";

    fn item(c: &Chunk) -> (&str, u64, u64) {
        match &c.location {
            Location::Item {
                member,
                offset,
                length,
            } => (member, *offset, *length),
            other => panic!("not an item: {other:?}"),
        }
    }

    #[test]
    fn reads_plain_dcp_metadata() {
        let m = dir_members(PLAIN);
        let ck = DistCheckpoint::open(&m, "").unwrap();
        assert_eq!(ck.backend, dist::Backend::TorchDist);
        assert!(ck.metadata_json.is_none());
        let keys: Vec<_> = ck.tensors.iter().map(|t| t.key.as_str()).collect();
        assert_eq!(keys, ["w", "b", "nested.x"]);
        let w = ck.tensor("w").unwrap();
        assert_eq!((w.dtype, w.shape.clone()), (Dtype::F32, vec![2, 3]));
        assert_eq!(ck.tensor("b").unwrap().dtype, Dtype::BF16);
        assert_eq!(ck.tensor("nested.x").unwrap().dtype, Dtype::I64);
        let (member, _, len) = item(&w.chunks[0]);
        assert_eq!(member, "__0_0.distcp");
        assert!(len > 0);
        let objs: Vec<_> = ck.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(objs, ["step", "nested.name"]);
        assert!(!ck.mcore);
        let x = ck.planner_paths.iter().find(|p| p.0 == "nested.x").unwrap();
        assert_eq!(
            x.clone(),
            (
                "nested.x".to_string(),
                vec![PathPart::Key("nested".into()), PathPart::Key("x".into())]
            )
        );
    }

    #[test]
    fn reads_megatron_v013_and_v019_metadata() {
        for (dir, common_pt) in [(V13, true), (V19, false)] {
            let m = dir_members(dir);
            let ck = DistCheckpoint::open(&m, "").unwrap();
            assert_eq!(ck.tensors.len(), 8, "{dir}");
            let qkv = ck
                .tensor("decoder.layers.self_attention.linear_qkv.weight")
                .unwrap();
            assert_eq!(qkv.dtype, Dtype::BF16);
            assert_eq!(qkv.shape, vec![2, 12, 4]);
            let mut boxes: Vec<_> = qkv.chunks.iter().map(|c| c.offsets.clone()).collect();
            boxes.sort();
            assert_eq!(boxes, [[0, 0, 0], [0, 6, 0], [1, 0, 0], [1, 6, 0]]);
            assert!(qkv.chunks.iter().all(|c| c.sizes == [1, 6, 4]));
            let fc1 = ck.tensor("decoder.layers.mlp.linear_fc1.weight").unwrap();
            assert_eq!(fc1.chunks.len(), 8);
            assert_eq!(
                ck.tensor("decoder.layers.self_attention.linear_qkv.layer_norm_weight")
                    .unwrap()
                    .chunks
                    .len(),
                2 // one per layer, written once (replicated over TP)
            );
            let objs: Vec<_> = ck.objects.iter().map(|o| o.key.as_str()).collect();
            assert!(
                objs.contains(&"decoder.layers.self_attention.linear_qkv._extra_state/shard_1_2")
            );
            assert_eq!(
                objs.contains(&"common_state/shard_0_1"),
                !common_pt,
                "{dir}"
            );
            assert_eq!(ck.common_bytes.is_some(), common_pt, "{dir}");
            let json = ck.metadata_json.as_deref().unwrap();
            assert_eq!(json.contains("common_backend"), common_pt);
        }
    }

    #[test]
    fn reads_mcore_llama_dcp_metadata() {
        let m = dir_members("fixtures/mcore/llama/dcp_tp1");
        let ck = DistCheckpoint::open(&m, "").unwrap();
        let qkv = ck
            .tensor("model.decoder.layers.self_attention.linear_qkv.weight")
            .unwrap();
        assert_eq!(qkv.shape, vec![2, 96, 64]);
        let fc1 = ck
            .tensor("model.decoder.layers.mlp.linear_fc1.weight")
            .unwrap();
        assert_eq!(fc1.shape, vec![2, 192, 64]);
        assert_eq!(ck.tensors.len(), 9);
        assert_eq!(ck.objects.len(), 8);
        // two data files, both referenced
        let files: std::collections::BTreeSet<_> = ck
            .tensors
            .iter()
            .flat_map(|t| t.chunks.iter().map(|c| c.location.member().to_string()))
            .collect();
        assert_eq!(files.len(), 2);
    }

    #[test]
    fn refuses_os_system_in_metadata() {
        let mut m = MemoryMembers::default();
        m.insert(
            ".metadata",
            b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.".to_vec(),
        );
        let e = DistCheckpoint::open(&m, "").unwrap_err();
        assert!(
            matches!(
                &e,
                DistError::Dcp(Error::Pickle {
                    source: pickle::Error::UnsupportedGlobal { .. },
                    ..
                })
            ),
            "{e}"
        );
        assert!(e.to_string().contains("os.system"), "{e}");
    }

    /// The plain sample's `.metadata` with one byte string replaced (same length).
    fn patched(from: &[u8], to: &[u8]) -> MemoryMembers {
        let mut m = dir_members(PLAIN);
        let md = m.read_member(".metadata").unwrap().as_slice().to_vec();
        let at = md.windows(from.len()).position(|w| w == from).unwrap();
        let mut md2 = md.clone();
        md2[at..at + to.len()].copy_from_slice(to);
        m.insert(".metadata", md2);
        m
    }

    #[test]
    fn rejects_unsafe_relative_path() {
        let m = patched(b"__0_0.distcp", b"../0_0.distc");
        let e = DistCheckpoint::open(&m, "").unwrap_err();
        assert!(e.to_string().contains("unsafe relative_path"), "{e}");
    }

    #[test]
    fn rejects_wrong_top_object() {
        let mut m = MemoryMembers::default();
        m.insert(".metadata", b"\x80\x02}q\x00.".to_vec());
        let e = DistCheckpoint::open(&m, "").unwrap_err();
        assert!(e.to_string().contains("not a Metadata"), "{e}");
    }

    #[test]
    fn item_past_end_of_file_is_an_error() {
        let mut m = dir_members(PLAIN);
        let data = m.read_member("__0_0.distcp").unwrap().as_slice().to_vec();
        m.insert("__0_0.distcp", data[..data.len() / 2].to_vec());
        let ck = DistCheckpoint::open(&m, "").unwrap();
        let t = ck.tensor("nested.x").unwrap();
        let e = ck.read_chunk(&m, t, 0).unwrap_err();
        assert!(e.to_string().contains("outside a view"), "{e}");
    }

    #[test]
    fn error_messages_name_the_place() {
        let e = Error::Unsupported {
            member: "mw/.metadata".into(),
            key: "w".into(),
            why: "transform_descriptors [\"stream.zstd/1\"]".into(),
        };
        assert!(e.to_string().starts_with("mw/.metadata: w: unsupported"));
        let e = Error::NotATensor {
            found: "Int(7)".into(),
        };
        assert_eq!(e.to_string(), "chunk item holds Int(7), not a tensor");
        let e = Error::TorchSave { why: "zip".into() };
        assert_eq!(e.to_string(), "torch.save stream: zip");
    }
}
