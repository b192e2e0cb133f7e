//! Reading torch Distributed Checkpoint folders (plain DCP and Megatron-Core
//! `torch_dist`): the `.metadata` pickle (torch-formats.md §4.2) becomes the
//! [`crate::dist`] model, and `.distcp` items are parsed lazily as
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

use crate::bytes::ByteView;
use crate::dist::{self, Chunk, DistCheckpoint, DistObject, DistTensor, Location};
use crate::members::Members;
use crate::torch::dtype::Dtype;
use crate::torch::pickle::{self, Object, Policy, Value};
use crate::torch::tensor::{Piece, TensorRef};

/// Largest `.metadata` accepted (real ones are a few MB even for 70B models).
pub const MAX_METADATA_BYTES: usize = 1 << 30;

/// Why a DCP folder or item could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
) -> Result<(), dist::Error> {
    let member = dist::join(&ck.dir, ".metadata");
    let bytes = dist::read(members, &member)?;
    let md = parse_metadata(&member, bytes.as_slice())?;
    let (tensors, objects, mcore) = model_from_metadata(&member, &ck.dir, &md)?;
    ck.tensors = tensors;
    ck.objects = objects;
    ck.mcore = mcore;
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
    let o = md
        .as_object()
        .filter(|o| suffix(o) == "Metadata")
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

/// The one place that calls `crate::torch::file` (being written on the
/// `torch` branch), so its API can change in one spot.
mod torch_file {
    use crate::bytes::ByteView;
    use crate::torch::dtype::Dtype;
    use crate::torch::pickle::{Policy, Value};
    use crate::torch::tensor::Piece;

    pub(super) fn load(_bytes: &ByteView, _policy: &Policy) -> Result<Value, String> {
        Err("torch::file not merged yet".into())
    }

    pub(super) fn save_tensor(
        _dtype: Dtype,
        _shape: &[u64],
        _pieces: Vec<Piece>,
    ) -> Result<Vec<u8>, String> {
        Err("torch::file not merged yet".into())
    }
}
