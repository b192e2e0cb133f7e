//! Whole `torch.save` files: [`load`] turns a zip stream (at any offset of a
//! bigger file, e.g. a DCP item) or a legacy pre-1.6 file into a [`Value`]
//! tree whose `_rebuild_*` calls are replaced by [`Value::Tensor`] nodes over
//! shared storage bytes; [`save`] writes such a tree back exactly as torch
//! lays files out (record order, miniz framing, storages streamed from their
//! pieces).
//!
//! Recognised tensor encodings: `torch._utils._rebuild_tensor{,_v2,_v3}`,
//! `_rebuild_parameter(_with_state)` and `torch._tensor._rebuild_from_type_v2`.
//! Everything else (OrderedDict with `_metadata`, `_io.BytesIO` extra state,
//! numbers, strings, nested containers) stays as parsed, so it is written back
//! unchanged in value. The optional 7th `metadata` argument of
//! `_rebuild_tensor_v2` (conj/neg bits) is dropped.

use std::collections::HashMap;

use crate::formats::torch::dtype::Dtype;
use crate::formats::torch::pickle::{self, Policy};
use crate::formats::torch::tensor::{self, StorageRef, TensorKind, TensorRef};
use crate::formats::torch::value::{Global, Object, Value};
use crate::formats::torch::{emit, zip};
use crate::io::bytes::ByteView;
use crate::io::piece::Piece;
use crate::io::sink::{RecordSink, Sink, StreamedWrite};

/// Why a torch file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The zip container is broken.
    #[error(transparent)]
    Zip(#[from] zip::Error),
    /// The first record is not inside an archive folder.
    #[error("torch file: first record `{name}` is not inside an archive folder")]
    NoArchiveFolder {
        /// The record name.
        name: String,
    },
    /// A TorchScript archive (`torch.jit.save`), not a `torch.save` file.
    #[error("torch file: `{archive}/constants.pkl` present: this is a TorchScript archive (torch.jit.save), not a torch.save file")]
    TorchScript {
        /// Archive folder.
        archive: String,
    },
    /// A big-endian file.
    #[error("torch file: `{record}` says `big`: big-endian files are not supported")]
    BigEndian {
        /// The byteorder record.
        record: String,
    },
    /// A record the pickle needs is missing.
    #[error("torch file: no record `{record}`")]
    Missing {
        /// Record name.
        record: String,
    },
    /// The pickle could not be read.
    #[error("torch file: `{record}`: {source}")]
    Pickle {
        /// Record holding the pickle (or the legacy section).
        record: String,
        /// The pickle error.
        source: pickle::Error,
    },
    /// A `_rebuild_*` call with unexpected arguments.
    #[error("torch file: `{record}`: malformed {func}: {why}")]
    BadTensor {
        /// Record holding the pickle.
        record: String,
        /// The rebuild function.
        func: String,
        /// What was wrong.
        why: String,
    },
    /// A storage record shorter than the pickle declares.
    #[error("torch file: storage record `{record}` holds {actual} bytes but the pickle declares {declared}")]
    StorageTooSmall {
        /// Record name.
        record: String,
        /// Bytes declared (numel x element size).
        declared: u64,
        /// Bytes present.
        actual: u64,
    },
    /// A tensor view that does not fit its storage.
    #[error("torch file: {0}")]
    View(#[from] tensor::Error),
    /// A legacy (pre-1.6, non-zip) file that could not be read.
    #[error("torch file (legacy format): {why}")]
    Legacy {
        /// What was wrong.
        why: String,
    },
    /// The value could not be pickled.
    #[error(transparent)]
    Emit(#[from] emit::Error),
    /// An archive name that cannot be a single folder.
    #[error("torch file: archive name `{name}` must be non-empty and contain no `/`")]
    BadArchiveName {
        /// The name given.
        name: String,
    },
    /// A file could not be opened or mapped.
    #[error("torch file: {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A loaded file.
#[derive(Debug, Clone)]
pub struct TorchFile {
    /// Archive folder (`archive` for streams, the file stem for paths);
    /// empty for legacy files.
    pub archive_name: String,
    /// The object, with tensors resolved.
    pub root: Value,
}

impl TorchFile {
    /// Every tensor with its path: dict keys joined by `.`, list/tuple
    /// indices as `[i]` (e.g. `model.layers[1].b`), in pickle order.
    pub fn tensors(&self) -> Vec<(String, &TensorRef)> {
        let mut out = Vec::new();
        collect(&self.root, String::new(), &mut out);
        out
    }
}

fn collect<'a>(v: &'a Value, path: String, out: &mut Vec<(String, &'a TensorRef)>) {
    let key = |k: &Value| match k {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => format!("{other:?}"),
    };
    let join = |k: String| {
        if path.is_empty() {
            k
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Tensor(t) => out.push((path, t)),
        Value::List(items) | Value::Tuple(items) => {
            for (i, x) in items.iter().enumerate() {
                collect(x, format!("{path}[{i}]"), out);
            }
        }
        _ => {
            if let Some(items) = v.dict_items() {
                for (k, x) in items {
                    collect(x, join(key(k)), out);
                }
            }
        }
    }
}

/// Reads a `torch.save` stream. `view` must start at the stream's first
/// byte (for DCP, slice the item first).
///
/// # Errors
/// Any [`Error`]; never panics on malformed input.
pub fn load(view: ByteView, policy: &Policy) -> Result<TorchFile, Error> {
    load_with(view, policy, true)
}

/// Like [`load`], but maps no storage bytes: tensors carry dtype, shape,
/// strides and their storage's declared size (`StorageRef::unmapped_len`),
/// and only the zip directory and `data.pkl` are read. For `inspect` on
/// multi-GB files. Legacy (non-zip) files are read in full.
///
/// # Errors
/// As [`load`].
pub fn load_metadata(view: ByteView, policy: &Policy) -> Result<TorchFile, Error> {
    load_with(view, policy, false)
}

fn load_with(view: ByteView, policy: &Policy, with_data: bool) -> Result<TorchFile, Error> {
    if !view.as_slice().starts_with(b"PK\x03\x04") {
        return legacy::load(view, policy);
    }
    let z = zip::ZipArchive::open(view)?;
    let first = z
        .entries()
        .first()
        .map(|e| e.name.clone())
        .unwrap_or_default();
    let archive = match first.split_once('/') {
        Some((a, _)) if !a.is_empty() => a.to_string(),
        _ => return Err(Error::NoArchiveFolder { name: first }),
    };
    let rec = |n: &str| format!("{archive}/{n}");
    if z.entry(&rec("constants.pkl")).is_some() {
        return Err(Error::TorchScript { archive });
    }
    if let Ok(b) = z.read(&rec("byteorder")) {
        if b.as_slice() == b"big" {
            return Err(Error::BigEndian {
                record: rec("byteorder"),
            });
        }
    }
    let pkl_name = rec("data.pkl");
    let pkl = z.read(&pkl_name).map_err(|e| match e {
        zip::Error::Missing { name } => Error::Missing { record: name },
        e => Error::Zip(e),
    })?;
    let value = pickle::parse(pkl.as_slice(), policy).map_err(|source| Error::Pickle {
        record: pkl_name.clone(),
        source,
    })?;
    let mut fetch = |key: &str| -> Result<Fetched, Error> {
        let name = rec(&format!("data/{key}"));
        let entry = z.entry(&name).ok_or_else(|| Error::Missing {
            record: name.clone(),
        })?;
        if !with_data {
            // Size from the central directory; the payload pages stay untouched.
            let len = Some(entry.size);
            return Ok(Fetched {
                record: name,
                bytes: ByteView::from_vec(Vec::new()),
                unmapped_len: len,
            });
        }
        match z.payload(entry) {
            Ok(b) => Ok(Fetched {
                record: name,
                bytes: b,
                unmapped_len: None,
            }),
            Err(e) => Err(Error::Zip(e)),
        }
    };
    let mut r = Resolver {
        record: pkl_name,
        fetch: &mut fetch,
        cache: HashMap::new(),
    };
    let root = r.resolve(value)?;
    Ok(TorchFile {
        archive_name: archive,
        root,
    })
}

/// Memory-maps `path` and [`load`]s it; tensors borrow the mapping (no copies).
///
/// # Errors
/// [`Error::Io`] if the file cannot be opened or mapped, else as [`load`].
pub fn load_file(path: &std::path::Path, policy: &Policy) -> Result<TorchFile, Error> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let map = crate::io::mmap::map_file(&f).map_err(io)?;
    load(ByteView::from_mapped_file(map, f), policy)
}

/// A storage record fetched by key.
#[derive(Debug, Clone)]
pub(crate) struct Fetched {
    /// Record name, for errors.
    pub(crate) record: String,
    /// Its bytes (empty when not mapped).
    pub(crate) bytes: ByteView,
    /// Declared size when the bytes were deliberately not mapped.
    pub(crate) unmapped_len: Option<u64>,
}

/// Fetches a storage record by key.
pub(crate) type Fetch<'a> = dyn FnMut(&str) -> Result<Fetched, Error> + 'a;

/// Replaces `_rebuild_*` calls by tensors, bottom-up.
pub(crate) struct Resolver<'a, 'f> {
    pub(crate) record: String,
    pub(crate) fetch: &'a mut Fetch<'f>,
    pub(crate) cache: HashMap<String, Fetched>,
}

impl Resolver<'_, '_> {
    pub(crate) fn resolve(&mut self, v: Value) -> Result<Value, Error> {
        Ok(match v {
            Value::Tuple(x) => Value::Tuple(self.all(x)?),
            Value::List(x) => Value::List(self.all(x)?),
            Value::Set(x) => Value::Set(self.all(x)?),
            Value::Dict(x) => Value::Dict(self.pairs(x)?),
            Value::PersId(x) => Value::PersId(Box::new(self.resolve(*x)?)),
            Value::Object(o) => {
                let o = *o;
                let o = Object {
                    args: self.all(o.args)?,
                    kwargs: o.kwargs.map(|k| self.resolve(k)).transpose()?,
                    state: o.state.map(|s| self.resolve(s)).transpose()?,
                    items: self.pairs(o.items)?,
                    appended: self.all(o.appended)?,
                    ..o
                };
                match self.tensor(&o)? {
                    Some(t) => Value::Tensor(Box::new(t)),
                    None => Value::Object(Box::new(o)),
                }
            }
            other => other,
        })
    }

    fn all(&mut self, v: Vec<Value>) -> Result<Vec<Value>, Error> {
        v.into_iter().map(|x| self.resolve(x)).collect()
    }

    fn pairs(&mut self, v: Vec<(Value, Value)>) -> Result<Vec<(Value, Value)>, Error> {
        v.into_iter()
            .map(|(k, x)| Ok((self.resolve(k)?, self.resolve(x)?)))
            .collect()
    }

    fn bad(&self, func: &Global, why: impl Into<String>) -> Error {
        Error::BadTensor {
            record: self.record.clone(),
            func: format!("{}.{}", func.module, func.name),
            why: why.into(),
        }
    }

    /// The tensor an object stands for, if it is a recognised rebuild call.
    fn tensor(&mut self, o: &Object) -> Result<Option<TensorRef>, Error> {
        let c = &o.class;
        match (c.module.as_str(), c.name.as_str()) {
            ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2" | "_rebuild_tensor_v3") => {
                self.rebuild(c, &o.args).map(Some)
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                let mut t = match o.args.first() {
                    Some(Value::Tensor(t)) => (**t).clone(),
                    _ => return Err(self.bad(c, "first argument is not a tensor")),
                };
                t.requires_grad = o
                    .args
                    .get(1)
                    .and_then(Value::as_bool)
                    .ok_or_else(|| self.bad(c, "requires_grad is not a bool"))?;
                let state = if c.name.ends_with("_with_state") {
                    let s = o.args.get(3).ok_or_else(|| self.bad(c, "missing state"))?;
                    Some(Box::new(s.clone()))
                } else {
                    None
                };
                t.kind = TensorKind::Parameter { state };
                Ok(Some(t))
            }
            ("torch._tensor", "_rebuild_from_type_v2") => {
                let [func, class, args, state] = o.args.as_slice() else {
                    return Err(self.bad(c, "expected (func, type, args, state)"));
                };
                let (Some(func), Some(class), Some(args)) =
                    (func.as_global(), class.as_global(), args.as_seq())
                else {
                    return Err(self.bad(c, "expected (global, global, tuple, state)"));
                };
                if !matches!(
                    func.name.as_str(),
                    "_rebuild_tensor_v2" | "_rebuild_tensor_v3"
                ) {
                    return Ok(None);
                }
                let mut t = self.rebuild(func, args)?;
                t.kind = TensorKind::FromType {
                    class: class.clone(),
                    state: Box::new(state.clone()),
                };
                Ok(Some(t))
            }
            _ => Ok(None),
        }
    }

    fn dims(&self, f: &Global, v: Option<&Value>, what: &str) -> Result<Vec<u64>, Error> {
        v.and_then(Value::as_seq)
            .and_then(|s| {
                s.iter()
                    .map(|x| x.as_int().and_then(|i| u64::try_from(i).ok()))
                    .collect::<Option<Vec<u64>>>()
            })
            .ok_or_else(|| self.bad(f, format!("{what} is not a tuple of non-negative ints")))
    }

    fn rebuild(&mut self, f: &Global, args: &[Value]) -> Result<TensorRef, Error> {
        let pid = match args.first() {
            Some(Value::PersId(p)) => p.as_seq().unwrap_or(&[]),
            _ => return Err(self.bad(f, "first argument is not a persistent id")),
        };
        let (class, key, location, numel) = match pid {
            [tag, class, key, loc, numel, ..] if tag.as_str() == Some("storage") => (
                class.as_global(),
                key.as_str(),
                loc.as_str(),
                numel.as_int().and_then(|n| u64::try_from(n).ok()),
            ),
            _ => {
                return Err(self.bad(
                    f,
                    "persistent id is not ('storage', type, key, location, numel)",
                ))
            }
        };
        let (Some(class), Some(key), Some(location), Some(numel)) = (class, key, location, numel)
        else {
            return Err(self.bad(f, "persistent id has fields of the wrong type"));
        };
        let untyped = class.name == "UntypedStorage";
        let storage_dtype = if untyped {
            None
        } else {
            Some(Dtype::from_storage_class(&class.name).ok_or_else(|| {
                self.bad(
                    f,
                    format!("unknown storage type {}.{}", class.module, class.name),
                )
            })?)
        };
        let dtype = if f.name == "_rebuild_tensor_v3" {
            let g = args.get(6).and_then(Value::as_global);
            g.and_then(|g| Dtype::from_torch_name(&g.name))
                .ok_or_else(|| self.bad(f, "7th argument is not a known torch dtype"))?
        } else {
            storage_dtype.ok_or_else(|| self.bad(f, "untyped storage without a dtype"))?
        };
        let elem = storage_dtype.map_or(1, |d| d.size() as u64);
        let declared = numel
            .checked_mul(elem)
            .ok_or_else(|| self.bad(f, "storage size overflows"))?;
        let Fetched {
            record,
            bytes: whole,
            unmapped_len,
        } = self.storage(key)?;
        let actual = unmapped_len.unwrap_or(whole.len() as u64);
        if actual < declared {
            return Err(Error::StorageTooSmall {
                record,
                declared,
                actual,
            });
        }
        // Metadata-only loads keep the declared size and map nothing.
        let unmapped_len = unmapped_len.map(|_| declared);
        let mut bytes = if unmapped_len.is_some() {
            whole
        } else {
            whole
                .slice(0..declared)
                .map_err(|_| Error::StorageTooSmall {
                    record: record.clone(),
                    declared,
                    actual,
                })?
        };
        // Legacy files may name a view of the root storage: (view_key, offset, size).
        if let Some(Value::Tuple(vm)) = pid.get(5) {
            let ints: Option<Vec<u64>> = vm.get(1..3).map(|s| {
                s.iter()
                    .filter_map(|x| x.as_int().and_then(|i| u64::try_from(i).ok()))
                    .collect()
            });
            match ints.as_deref() {
                Some([off, len]) => {
                    bytes = off
                        .checked_mul(elem)
                        .zip(len.checked_mul(elem))
                        .and_then(|(o, l)| bytes.slice_len(o, l).ok())
                        .ok_or_else(|| self.bad(f, "storage view outside its root storage"))?;
                }
                _ => return Err(self.bad(f, "malformed storage view metadata")),
            }
        }
        let int = |i: usize| {
            args.get(i)
                .and_then(Value::as_int)
                .and_then(|x| u64::try_from(x).ok())
        };
        let storage_offset = int(1).ok_or_else(|| self.bad(f, "storage offset is not an int"))?;
        let shape = self.dims(f, args.get(2), "size")?;
        let stride = self.dims(f, args.get(3), "stride")?;
        let requires_grad = match f.name.as_str() {
            "_rebuild_tensor" => false,
            _ => args.get(4).and_then(Value::as_bool).unwrap_or(false),
        };
        let t = TensorRef {
            dtype,
            shape,
            stride,
            storage_offset,
            storage: StorageRef {
                key: key.to_string(),
                bytes,
                location: location.to_string(),
                composed: Vec::new(),
                unmapped_len,
            },
            requires_grad,
            kind: TensorKind::Plain,
        };
        t.validate()?;
        Ok(t)
    }

    fn storage(&mut self, key: &str) -> Result<Fetched, Error> {
        if let Some(s) = self.cache.get(key) {
            return Ok(s.clone());
        }
        let s = (self.fetch)(key)?;
        self.cache.insert(key.to_string(), s.clone());
        Ok(s)
    }
}

/// Writes `root` as a `torch.save` zip stream under `archive_name/`: records
/// in torch's order (`data.pkl`, `.format_version`, `.storage_alignment`,
/// `byteorder`, `data/0..`, `version`, `.data/serialization_id`), storages
/// keyed by first use and streamed from their pieces. The serialization id
/// (used by torch only for logging) is 40 zeros.
///
/// # Errors
/// [`Error::BadArchiveName`], [`Error::Emit`] for unpicklable values,
/// [`Error::Zip`] for I/O errors.
pub fn save<W: Sink>(out: W, archive_name: &str, root: &Value) -> Result<W, Error> {
    save_with(out, archive_name, root, &mut |s, sink| {
        sink.pieces(&s.pieces())
    })
}

/// The open record of a [`zip::ZipWriter`] as a [`RecordSink`].
struct RecordOf<'a, W: Sink>(&'a mut zip::ZipWriter<W>);

impl<W: Sink> RecordSink for RecordOf<'_, W> {
    fn bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.0.write(b).map_err(std::io::Error::other)
    }

    fn pieces(&mut self, pieces: &[Piece]) -> std::io::Result<()> {
        self.0.write_pieces(pieces).map_err(std::io::Error::other)
    }

    fn streamed(&mut self, len: u64, write: &mut StreamedWrite<'_>) -> std::io::Result<()> {
        self.0
            .write_streamed(len, write)
            .map_err(std::io::Error::other)
    }
}

/// Produces one storage record's bytes: called with the storage and a sink
/// that appends to its record; must write exactly `storage.nbytes()` bytes.
pub type StorageFill<'a> = dyn FnMut(&StorageRef, &mut dyn RecordSink) -> std::io::Result<()> + 'a;

/// Like [`save`], but each storage's bytes come from `fill`: lets a streaming
/// writer prefetch and release source pages around each record, or convert
/// element types chunk by chunk, without materialising a tensor.
///
/// # Errors
/// As [`save`]; an error from `fill` is an [`Error::Zip`] I/O error.
pub fn save_with<W: Sink>(
    out: W,
    archive_name: &str,
    root: &Value,
    fill: &mut StorageFill<'_>,
) -> Result<W, Error> {
    if archive_name.is_empty() || archive_name.contains('/') {
        return Err(Error::BadArchiveName {
            name: archive_name.to_string(),
        });
    }
    let e = emit::emit(root)?;
    let mut z = zip::ZipWriter::new(out, archive_name);
    z.add("data.pkl", &e.pickle)?;
    z.add(".format_version", b"1")?;
    z.add(".storage_alignment", b"64")?;
    z.add("byteorder", b"little")?;
    for s in &e.storages {
        z.begin(&format!("data/{}", s.key), s.nbytes())?;
        fill(s, &mut RecordOf(&mut z)).map_err(zip::Error::Io)?;
        z.end()?;
    }
    z.add("version", b"3\n")?;
    z.add(".data/serialization_id", &[b'0'; 40])?;
    Ok(z.finish()?)
}

// The pre-1.6 (non-zip) format: read only, behind `load`.
#[path = "legacy.rs"]
mod legacy;

#[cfg(test)]
mod tests {
    use super::*;

    /// torch-formats.md §5.2: `{'w': tensor([1., 2.])}` without memo.
    const MINIMAL: &str = concat!(
        "80027d58010000007763746f7263682e5f7574696c730a5f72656275696c645f74656e736f725f76320a2828580700000073",
        "746f7261676563746f7263680a466c6f617453746f726167650a58010000003058030000006370754b0274514b004b02854b",
        "01858963636f6c6c656374696f6e730a4f726465726564446963740a29527452732e"
    );

    fn archive(name: &str, pkl: &[u8], storage: Option<&[u8]>) -> ByteView {
        let mut w = zip::ZipWriter::new(Vec::new(), name);
        w.add("data.pkl", pkl).unwrap();
        if let Some(s) = storage {
            w.add("data/0", s).unwrap();
        }
        w.add("version", b"3\n").unwrap();
        ByteView::from_vec(w.finish().unwrap())
    }

    fn minimal() -> Vec<u8> {
        hex::decode(MINIMAL).unwrap()
    }

    const DATA: [u8; 8] = [0, 0, 0x80, 0x3f, 0, 0, 0, 0x40];

    #[test]
    fn minimal_archive_loads() {
        let f = load(
            archive("archive", &minimal(), Some(&DATA)),
            &Policy::torch(),
        )
        .unwrap();
        let t = f.root.get("w").and_then(Value::as_tensor).unwrap();
        assert_eq!((t.dtype, t.shape.clone()), (Dtype::F32, vec![2]));
        assert_eq!(t.to_vec().unwrap(), DATA);
    }

    #[test]
    fn record_outside_an_archive_folder() {
        let e = load(archive("", &minimal(), Some(&DATA)), &Policy::torch()).unwrap_err();
        assert!(
            matches!(e, Error::NoArchiveFolder { ref name } if name == "/data.pkl"),
            "{e}"
        );
    }

    #[test]
    fn missing_storage_record_is_named() {
        let e = load(archive("archive", &minimal(), None), &Policy::torch()).unwrap_err();
        assert_eq!(e.to_string(), "torch file: no record `archive/data/0`");
        let mut w = zip::ZipWriter::new(Vec::new(), "archive");
        w.add("version", b"3\n").unwrap();
        let e = load(ByteView::from_vec(w.finish().unwrap()), &Policy::torch()).unwrap_err();
        assert_eq!(e.to_string(), "torch file: no record `archive/data.pkl`");
    }

    #[test]
    fn malformed_persistent_id_is_a_bad_tensor() {
        let pkl = hex::encode(minimal()).replace(
            hex::encode("storage").as_str(),
            hex::encode("storagX").as_str(),
        );
        let e = load(
            archive("archive", &hex::decode(pkl).unwrap(), Some(&DATA)),
            &Policy::torch(),
        )
        .unwrap_err();
        assert!(matches!(e, Error::BadTensor { .. }), "{e}");
        assert!(
            e.to_string().starts_with(
                "torch file: `archive/data.pkl`: malformed torch._utils._rebuild_tensor_v2"
            ),
            "{e}"
        );
    }

    #[test]
    fn view_outside_its_storage_is_refused() {
        // size (2,) -> (3,) over a 2-element storage
        let pkl = hex::encode(minimal()).replace("4b004b02854b0185", "4b004b03854b0185");
        let e = load(
            archive("archive", &hex::decode(pkl).unwrap(), Some(&DATA)),
            &Policy::torch(),
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::View(tensor::Error::OutOfStorage { .. })),
            "{e}"
        );
    }

    #[test]
    fn unpicklable_value_is_an_emit_error() {
        let e = save(Vec::new(), "a", &Value::BigInt(vec![1; 300])).unwrap_err();
        assert!(matches!(e, Error::Emit(_)), "{e}");
    }
}
