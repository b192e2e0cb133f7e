//! Reading the legacy (pre-1.6, non-zip) `torch.save` format
//! (torch-formats.md §3): five pickles back to back (magic number, protocol
//! version 1001, sys_info, the object, the sorted storage keys), then per key
//! a little-endian u64 element count and the raw bytes. Never written.

use std::collections::HashMap;

use super::{Error, Fetched, Resolver, TorchFile};
use crate::formats::torch::dtype::Dtype;
use crate::formats::torch::pickle::{self, Policy};
use crate::formats::torch::value::Value;
use crate::io::bytes::ByteView;

/// 0x1950a86a20f9469cfc6c, little-endian two's complement as LONG1 holds it.
const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

fn legacy(why: impl Into<String>) -> Error {
    Error::Legacy { why: why.into() }
}

/// Reads a legacy file (anything not starting with a zip local header).
pub(crate) fn load(view: ByteView, policy: &Policy) -> Result<TorchFile, Error> {
    let b = view.as_slice();
    let mut pos = 0usize;
    let mut next = |what: &str| -> Result<Value, Error> {
        let rest = b.get(pos..).unwrap_or(&[]);
        let (v, n) = pickle::parse_prefix(rest, policy).map_err(|source| Error::Pickle {
            record: format!("legacy {what} pickle at byte {pos}"),
            source,
        })?;
        pos += n;
        Ok(v)
    };
    let magic = next("magic number").map_err(|_| {
        legacy("not a torch file: neither a zip stream nor the legacy magic number")
    })?;
    if magic != Value::BigInt(MAGIC.to_vec()) {
        return Err(legacy(
            "not a torch file: neither a zip stream nor the legacy magic number",
        ));
    }
    if next("protocol version")? != Value::Int(1001) {
        return Err(legacy("unsupported protocol version (want 1001)"));
    }
    let sys = next("sys_info")?;
    if sys.get("little_endian").and_then(Value::as_bool) == Some(false) {
        return Err(legacy("big-endian files are not supported"));
    }
    let object = next("object")?;
    let keys = next("storage keys")?;
    let keys: Vec<String> = keys
        .as_seq()
        .and_then(|s| s.iter().map(|k| k.as_str().map(str::to_string)).collect())
        .ok_or_else(|| legacy("storage key list is not a list of str"))?;

    let mut dtypes = HashMap::new();
    storage_dtypes(&object, &mut dtypes, 0);
    let mut storages = HashMap::new();
    for key in &keys {
        let dtype = dtypes
            .get(key)
            .copied()
            .ok_or_else(|| legacy(format!("storage `{key}` is listed but never used")))?;
        let count = b
            .get(pos..pos + 8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .ok_or_else(|| {
                legacy(format!(
                    "storage `{key}`: truncated element count at byte {pos}"
                ))
            })?;
        let nbytes = count
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| legacy(format!("storage `{key}`: size overflows")))?;
        let data = view.slice_len(pos as u64 + 8, nbytes).map_err(|_| {
            legacy(format!(
                "storage `{key}` declares {nbytes} bytes at offset {} but the file has only {}",
                pos + 8,
                b.len()
            ))
        })?;
        pos += 8 + nbytes as usize;
        storages.insert(key.clone(), data);
    }
    let mut fetch = |key: &str| -> Result<Fetched, Error> {
        let name = format!("legacy storage `{key}`");
        storages
            .get(key)
            .cloned()
            .map(|bytes| Fetched {
                record: name.clone(),
                bytes,
                unmapped_len: None,
            })
            .ok_or(Error::Missing { record: name })
    };
    let mut r = Resolver {
        record: "legacy object pickle".to_string(),
        fetch: &mut fetch,
        cache: HashMap::new(),
    };
    Ok(TorchFile {
        archive_name: String::new(),
        root: r.resolve(object)?,
    })
}

/// Storage key -> dtype, from every `('storage', <X>Storage, key, ..)` persistent id.
fn storage_dtypes(v: &Value, out: &mut HashMap<String, Dtype>, depth: usize) {
    if depth > pickle::MAX_DEPTH {
        return;
    }
    let mut walk = |x: &Value| storage_dtypes(x, out, depth + 1);
    match v {
        Value::PersId(id) => {
            if let Some([tag, class, key, ..]) = id.as_seq() {
                let dtype = class
                    .as_global()
                    .and_then(|g| Dtype::from_storage_class(&g.name));
                if let (Some("storage"), Some(d), Some(k)) = (tag.as_str(), dtype, key.as_str()) {
                    out.insert(k.to_string(), d);
                }
            }
        }
        Value::Tuple(x) | Value::List(x) | Value::Set(x) => x.iter().for_each(walk),
        Value::Dict(x) => x.iter().for_each(|(k, v)| {
            walk(k);
            walk(v)
        }),
        Value::Object(o) => {
            o.args.iter().for_each(&mut walk);
            o.state.iter().for_each(&mut walk);
            o.items.iter().for_each(|(k, v)| {
                walk(k);
                walk(v)
            });
            o.appended.iter().for_each(walk);
        }
        _ => {}
    }
}
