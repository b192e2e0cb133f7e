//! The safetensors format (Hugging Face): reading a file as zero-copy tensor
//! views over one mapping, with the header validated as strictly as the
//! reference implementation does, and writing tensors streamed from
//! [`Piece`]s with the header computed first. Also the sharded form
//! (`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`).
//!
//! Layout: an 8-byte little-endian header length `N`, `N` bytes of JSON
//! (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
//! {str: str}}`), then the data; offsets are relative to the data start and
//! the tensors must tile the data exactly.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::formats::torch::dtype::Dtype;
use crate::io::bytes::ByteView;
use crate::io::piece::Piece;

/// The largest header we accept (the reference reader's limit).
pub const MAX_HEADER: u64 = 100_000_000;
/// Most dimensions a tensor may have.
pub const MAX_DIMS: usize = 64;
/// The index file of a sharded model.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The file name of an unsharded model.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Errors reading or writing safetensors; each names the file and, where
/// there is one, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened or mapped.
    #[error("{file}: cannot read: {source}")]
    Io {
        /// The file.
        file: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The header length is missing, too large or past the end of the file.
    #[error("{file}: bad header length {len} (file is {file_len} bytes, limit {MAX_HEADER})")]
    HeaderLength {
        /// The file.
        file: String,
        /// The stored length.
        len: u64,
        /// The file size.
        file_len: u64,
    },
    /// The header is not a JSON object of the expected shape.
    #[error("{file}: bad header: {why}")]
    Header {
        /// The file.
        file: String,
        /// What was wrong.
        why: String,
    },
    /// A tensor entry is inconsistent (dtype, shape, offsets).
    #[error("{file}: tensor `{name}`: {why}")]
    Tensor {
        /// The file.
        file: String,
        /// The tensor.
        name: String,
        /// What was wrong.
        why: String,
    },
    /// The tensors do not tile the data section exactly.
    #[error("{file}: data section: {why}")]
    Coverage {
        /// The file.
        file: String,
        /// What was wrong.
        why: String,
    },
    /// A sharded model's index is inconsistent.
    #[error("{file}: {why}")]
    Index {
        /// The index file.
        file: String,
        /// What was wrong.
        why: String,
    },
    /// Writing failed.
    #[error("{file}: cannot write: {source}")]
    Write {
        /// The file.
        file: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// One tensor of a safetensors file: a view into the file's mapping.
#[derive(Debug, Clone)]
pub struct StTensor {
    /// The tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// Row-major little-endian bytes.
    pub data: ByteView,
}

/// A parsed safetensors file.
#[derive(Debug, Clone)]
pub struct SafeTensors {
    /// Tensors in data order.
    pub tensors: Vec<StTensor>,
    /// `__metadata__` (string to string), if any.
    pub metadata: BTreeMap<String, String>,
}

impl SafeTensors {
    /// Maps and parses a file.
    ///
    /// # Errors
    /// [`Error::Io`] and the validation errors of [`SafeTensors::parse`].
    pub fn open(path: &Path) -> Result<SafeTensors, Error> {
        let file = path.display().to_string();
        let io_err = |source| Error::Io {
            file: file.clone(),
            source,
        };
        let f = File::open(path).map_err(io_err)?;
        let view = if f.metadata().map_err(io_err)?.len() == 0 {
            ByteView::from_vec(Vec::new())
        } else {
            let map = crate::io::mmap::map_file(&f).map_err(io_err)?;
            // Converters stream whole tensors: let the kernel read ahead.
            #[cfg(unix)]
            let _ = map.advise(memmap2::Advice::Sequential);
            ByteView::from_mapped_file(map, f)
        };
        SafeTensors::parse(&file, view)
    }

    /// Parses a whole file held in `view` (named `file` in errors).
    ///
    /// # Errors
    /// [`Error::HeaderLength`], [`Error::Header`], [`Error::Tensor`],
    /// [`Error::Coverage`].
    pub fn parse(file: &str, view: ByteView) -> Result<SafeTensors, Error> {
        let bytes = view.as_slice();
        let file_len = bytes.len() as u64;
        let len_bytes: [u8; 8] =
            bytes
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or(Error::HeaderLength {
                    file: file.to_string(),
                    len: 0,
                    file_len,
                })?;
        let n = u64::from_le_bytes(len_bytes);
        let data_start = n
            .checked_add(8)
            .filter(|&e| e <= file_len && n <= MAX_HEADER);
        let Some(data_start) = data_start else {
            return Err(Error::HeaderLength {
                file: file.to_string(),
                len: n,
                file_len,
            });
        };
        let header = bytes.get(8..data_start as usize).unwrap_or_default();
        let bad = |why: String| Error::Header {
            file: file.to_string(),
            why,
        };
        if header.first() != Some(&b'{') {
            return Err(bad("does not start with `{`".into()));
        }
        let json: serde_json::Value =
            serde_json::from_slice(header).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = json
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let mut metadata = BTreeMap::new();
        let mut entries: Vec<(String, Dtype, Vec<u64>, u64, u64)> = Vec::new();
        for (name, v) in obj {
            if name == "__metadata__" {
                let m = v
                    .as_object()
                    .ok_or_else(|| bad("`__metadata__` is not an object".into()))?;
                for (k, v) in m {
                    let s = v
                        .as_str()
                        .ok_or_else(|| bad(format!("`__metadata__.{k}` is not a string")))?;
                    metadata.insert(k.clone(), s.to_string());
                }
                continue;
            }
            entries.push(parse_entry(file, name, v)?);
        }
        let data_len = file_len - data_start;
        entries.sort_by_key(|e| (e.3, e.4));
        let mut pos = 0u64;
        let mut tensors = Vec::with_capacity(entries.len());
        for (name, dtype, shape, begin, end) in entries {
            if begin != pos {
                return Err(Error::Coverage {
                    file: file.to_string(),
                    why: format!(
                        "tensor `{name}` starts at {begin}, expected {pos} (gap or overlap)"
                    ),
                });
            }
            if end > data_len {
                return Err(Error::Coverage {
                    file: file.to_string(),
                    why: format!("tensor `{name}` ends at {end}, past the data ({data_len} bytes)"),
                });
            }
            let data = view
                .slice((data_start + begin)..(data_start + end))
                .map_err(|e| Error::Coverage {
                    file: file.to_string(),
                    why: format!("tensor `{name}`: {e}"),
                })?;
            pos = end;
            tensors.push(StTensor {
                name,
                dtype,
                shape,
                data,
            });
        }
        if pos != data_len {
            return Err(Error::Coverage {
                file: file.to_string(),
                why: format!("tensors cover {pos} of {data_len} bytes"),
            });
        }
        Ok(SafeTensors { tensors, metadata })
    }
}

/// One header entry: name, dtype, shape, begin, end.
fn parse_entry(
    file: &str,
    name: &str,
    v: &serde_json::Value,
) -> Result<(String, Dtype, Vec<u64>, u64, u64), Error> {
    let bad = |why: String| Error::Tensor {
        file: file.to_string(),
        name: name.to_string(),
        why,
    };
    let o = v
        .as_object()
        .ok_or_else(|| bad("entry is not an object".into()))?;
    if let Some(k) = o
        .keys()
        .find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets"))
    {
        return Err(bad(format!("unknown field `{k}`")));
    }
    let dt = o
        .get("dtype")
        .and_then(|d| d.as_str())
        .ok_or_else(|| bad("missing dtype".into()))?;
    let dtype = Dtype::from_safetensors_name(dt).ok_or_else(|| bad(format!("dtype `{dt}`")))?;
    let shape_v = o
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or_else(|| bad("missing shape".into()))?;
    if shape_v.len() > MAX_DIMS {
        return Err(bad(format!("{} dims (limit {MAX_DIMS})", shape_v.len())));
    }
    let shape = shape_v
        .iter()
        .map(|d| d.as_u64())
        .collect::<Option<Vec<u64>>>()
        .ok_or_else(|| bad("shape is not a list of non-negative integers".into()))?;
    let offs = o
        .get("data_offsets")
        .and_then(|s| s.as_array())
        .filter(|a| a.len() == 2)
        .ok_or_else(|| bad("data_offsets is not [begin, end]".into()))?;
    let (begin, end) = match (
        offs.first().and_then(|x| x.as_u64()),
        offs.get(1).and_then(|x| x.as_u64()),
    ) {
        (Some(b), Some(e)) if b <= e => (b, e),
        _ => return Err(bad("data_offsets is not [begin <= end]".into())),
    };
    let nbytes = shape
        .iter()
        .try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows".into()))?;
    if nbytes != end - begin {
        return Err(bad(format!(
            "{dt}{shape:?} needs {nbytes} bytes but data_offsets span {}",
            end - begin
        )));
    }
    Ok((name.to_string(), dtype, shape, begin, end))
}

/// A tensor to write: its bytes as pieces (row-major, little-endian).
#[derive(Debug, Clone)]
pub struct WriteTensor {
    /// The name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// The bytes, in order.
    pub pieces: Vec<Piece>,
}

impl WriteTensor {
    /// Bytes of data.
    pub fn nbytes(&self) -> u64 {
        self.pieces.iter().map(Piece::len).sum()
    }
}

/// The header bytes (length prefix included) for `tensors` in this order,
/// padded with spaces to a multiple of 8 as the reference writer does.
///
/// # Errors
/// [`Error::Tensor`] for a dtype safetensors cannot name or pieces that do
/// not match the shape.
pub fn header(
    file: &str,
    tensors: &[WriteTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, Error> {
    // Hand-written JSON keeps the tensors in data order (serde_json's map sorts).
    let mut h = String::from("{");
    if !metadata.is_empty() {
        h.push_str("\"__metadata__\":");
        h.push_str(&serde_json::to_string(metadata).unwrap_or_else(|_| "{}".into()));
    }
    let mut pos = 0u64;
    for t in tensors {
        let bad = |why: String| Error::Tensor {
            file: file.to_string(),
            name: t.name.clone(),
            why,
        };
        let dt = t
            .dtype
            .safetensors_name()
            .ok_or_else(|| bad(format!("dtype {} has no safetensors name", t.dtype)))?;
        let need = t
            .shape
            .iter()
            .try_fold(t.dtype.size() as u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("shape overflows".into()))?;
        let have = t.nbytes();
        if need != have {
            return Err(bad(format!("{need} bytes expected, {have} given")));
        }
        if h.len() > 1 {
            h.push(',');
        }
        let name = serde_json::to_string(&t.name).unwrap_or_default();
        let shape: Vec<String> = t.shape.iter().map(u64::to_string).collect();
        h.push_str(&format!(
            "{name}:{{\"dtype\":\"{dt}\",\"shape\":[{}],\"data_offsets\":[{pos},{}]}}",
            shape.join(","),
            pos + have
        ));
        pos += have;
    }
    h.push('}');
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    Ok(out)
}

/// Total file size for `tensors`.
///
/// # Errors
/// As [`header`].
pub fn file_size(
    file: &str,
    tensors: &[WriteTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<u64, Error> {
    let h = header(file, tensors, metadata)?;
    Ok(h.len() as u64 + tensors.iter().map(WriteTensor::nbytes).sum::<u64>())
}

/// Writes one safetensors stream: the header, then each tensor's pieces.
///
/// # Errors
/// As [`header`]; [`Error::Write`] for I/O errors.
pub fn write(
    w: &mut dyn Write,
    file: &str,
    tensors: &[WriteTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<u64, Error> {
    let werr = |source| Error::Write {
        file: file.to_string(),
        source,
    };
    let h = header(file, tensors, metadata)?;
    w.write_all(&h).map_err(werr)?;
    let mut n = h.len() as u64;
    for t in tensors {
        n += write_pieces(w, &t.pieces).map_err(werr)?;
    }
    Ok(n)
}

/// Writes pieces; zeros in bounded blocks.
pub fn write_pieces(w: &mut dyn Write, pieces: &[Piece]) -> io::Result<u64> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut n = 0u64;
    for p in pieces {
        match p {
            Piece::Bytes(b) => w.write_all(b.as_slice())?,
            Piece::Zeros(z) => {
                let mut left = *z;
                while left > 0 {
                    let k = left.min(ZEROS.len() as u64) as usize;
                    w.write_all(ZEROS.get(..k).unwrap_or_default())?;
                    left -= k as u64;
                }
            }
        }
        n += p.len();
    }
    Ok(n)
}

/// How tensors are grouped into shard files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    /// `(file name, indices into the tensor list)` per shard, in order.
    pub files: Vec<(String, Vec<usize>)>,
}

/// Where a dtype sorts in a file the reference writer (`safetensors.torch.save_file`, which
/// transformers uses) writes: its `Dtype` enum order, larger first.
fn reference_rank(dtype: Dtype) -> usize {
    const ORDER: [&str; 15] = [
        "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
        "F64", "I64", "U64",
    ];
    dtype
        .safetensors_name()
        .and_then(|n| ORDER.iter().position(|o| *o == n))
        .unwrap_or(ORDER.len())
}

/// Groups tensors (in order) into files of at most `max_bytes` of data each
/// (a tensor larger than the limit gets a file of its own), named as
/// transformers names them, each file in the reference writer's order. One group is
/// `model.safetensors`.
pub fn plan_shards(tensors: &[WriteTensor], max_bytes: u64) -> ShardPlan {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let n = t.nbytes();
        match groups.last_mut() {
            Some(g) if size.saturating_add(n) <= max_bytes => {
                g.push(i);
                size += n;
            }
            _ => {
                groups.push(vec![i]);
                size = n;
            }
        }
    }
    if groups.is_empty() {
        groups.push(Vec::new());
    }
    // within a file, the reference writer's order (dtype descending, then name), so a model
    // transformers saved as one file comes back byte for byte
    for g in &mut groups {
        g.sort_by(|&a, &b| {
            let (ta, tb) = (&tensors[a], &tensors[b]);
            reference_rank(tb.dtype)
                .cmp(&reference_rank(ta.dtype))
                .then_with(|| ta.name.cmp(&tb.name))
        });
    }
    let total = groups.len();
    let files = groups
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            let name = if total == 1 {
                SINGLE_FILE.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, total)
            };
            (name, g)
        })
        .collect();
    ShardPlan { files }
}

/// The `model.safetensors.index.json` text for a plan.
pub fn index_json(tensors: &[WriteTensor], plan: &ShardPlan) -> String {
    let total: u64 = tensors.iter().map(WriteTensor::nbytes).sum();
    let mut map = serde_json::Map::new();
    for (file, idx) in &plan.files {
        for &i in idx {
            if let Some(t) = tensors.get(i) {
                map.insert(t.name.clone(), serde_json::Value::String(file.clone()));
            }
        }
    }
    let v = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": map,
    });
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    s
}

/// Reads a model folder's weights: `model.safetensors`, or every file that
/// `model.safetensors.index.json` names (checked to hold exactly the tensors
/// the index lists). Returns the files in order.
///
/// # Errors
/// [`Error::Index`] for an inconsistent index or no weights; errors of
/// [`SafeTensors::open`].
pub fn open_dir(dir: &Path) -> Result<Vec<(PathBuf, SafeTensors)>, Error> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let file = index.display().to_string();
        let bad = |why: String| Error::Index {
            file: file.clone(),
            why,
        };
        let text = std::fs::read(&index).map_err(|source| Error::Io {
            file: file.clone(),
            source,
        })?;
        let v: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let mut files: Vec<String> = Vec::new();
        for (name, f) in map {
            let f = f
                .as_str()
                .ok_or_else(|| bad(format!("`{name}`: file is not a string")))?;
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(bad(format!("`{name}`: file name `{f}` leaves the folder")));
            }
            if !files.iter().any(|x| x == f) {
                files.push(f.to_string());
            }
        }
        files.sort();
        let mut out = Vec::new();
        let mut seen = 0usize;
        for f in files {
            let p = dir.join(&f);
            let st = SafeTensors::open(&p)?;
            for t in &st.tensors {
                match map.get(&t.name).and_then(|v| v.as_str()) {
                    Some(x) if x == f => seen += 1,
                    _ => {
                        return Err(bad(format!(
                            "`{}` is in {f} but the index says otherwise",
                            t.name
                        )))
                    }
                }
            }
            out.push((p, st));
        }
        if seen != map.len() {
            return Err(bad(format!(
                "the index lists {} tensors, the files hold {seen}",
                map.len()
            )));
        }
        return Ok(out);
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        let st = SafeTensors::open(&single)?;
        return Ok(vec![(single, st)]);
    }
    Err(Error::Index {
        file: dir.display().to_string(),
        why: format!("no {SINGLE_FILE} or {INDEX_FILE}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, dtype: Dtype, shape: &[u64], bytes: &[u8]) -> WriteTensor {
        WriteTensor {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            pieces: vec![Piece::Bytes(ByteView::from_vec(bytes.to_vec()))],
        }
    }

    fn file_of(tensors: &[WriteTensor]) -> Vec<u8> {
        let mut md = BTreeMap::new();
        md.insert("format".to_string(), "pt".to_string());
        let mut out = Vec::new();
        let n = write(&mut out, "x", tensors, &md).unwrap();
        assert_eq!(n, out.len() as u64);
        assert_eq!(n, file_size("x", tensors, &md).unwrap());
        out
    }

    fn with_header(h: &str, data: &[u8]) -> ByteView {
        let mut v = (h.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(h.as_bytes());
        v.extend_from_slice(data);
        ByteView::from_vec(v)
    }

    #[test]
    fn round_trip_keeps_order_values_and_metadata() {
        let a = t("b.weight", Dtype::F32, &[2], &[0, 0, 128, 63, 0, 0, 0, 64]);
        let mut z = t("a.zero", Dtype::BF16, &[3], &[]);
        z.pieces = vec![Piece::Zeros(6)];
        let bytes = file_of(&[a, z]);
        let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!(hlen % 8, 0);
        let st = SafeTensors::parse("x", ByteView::from_vec(bytes)).unwrap();
        assert_eq!(st.metadata.get("format").map(String::as_str), Some("pt"));
        let names: Vec<_> = st.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b.weight", "a.zero"]);
        assert_eq!(st.tensors[0].data.as_slice(), &[0, 0, 128, 63, 0, 0, 0, 64]);
        assert_eq!(st.tensors[1].dtype, Dtype::BF16);
        assert_eq!(st.tensors[1].data.as_slice(), &[0; 6]);
    }

    #[test]
    fn header_length_errors() {
        let e = SafeTensors::parse("x", ByteView::from_vec(vec![1, 2])).unwrap_err();
        assert!(matches!(e, Error::HeaderLength { len: 0, .. }), "{e}");
        let mut v = 1000u64.to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        let e = SafeTensors::parse("x", ByteView::from_vec(v)).unwrap_err();
        assert!(matches!(e, Error::HeaderLength { len: 1000, .. }), "{e}");
    }

    #[test]
    fn header_errors() {
        for h in ["[1]     ", "{\"a\":", "{\"__metadata__\":{\"k\":1}}"] {
            let e = SafeTensors::parse("x", with_header(h, b"")).unwrap_err();
            assert!(matches!(e, Error::Header { .. }), "{h}: {e}");
        }
    }

    #[test]
    fn tensor_errors() {
        for (h, want) in [
            (
                r#"{"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}"#,
                "dtype",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                "needs 8 bytes",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                "non-negative",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
                "begin <= end",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}"#,
                "unknown field",
            ),
        ] {
            let e = SafeTensors::parse("x", with_header(h, &[0; 4])).unwrap_err();
            assert!(
                matches!(&e, Error::Tensor { name, .. } if name == "a")
                    && e.to_string().contains(want),
                "{h}: {e}"
            );
        }
    }

    #[test]
    fn coverage_errors() {
        // A gap between tensors, trailing bytes, and a tensor past the end.
        let two = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}"#;
        let e = SafeTensors::parse("x", with_header(two, &[0; 3])).unwrap_err();
        assert!(matches!(e, Error::Coverage { .. }) && e.to_string().contains("`b` starts at 2"));
        let one = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        let e = SafeTensors::parse("x", with_header(one, &[0; 2])).unwrap_err();
        assert!(e.to_string().contains("cover 1 of 2"), "{e}");
        let e = SafeTensors::parse("x", with_header(one, &[])).unwrap_err();
        assert!(e.to_string().contains("past the data"), "{e}");
    }

    #[test]
    fn write_refuses_bad_tensors() {
        let e = header("x", &[t("a", Dtype::F32, &[2], &[0; 4])], &BTreeMap::new()).unwrap_err();
        assert!(matches!(e, Error::Tensor { .. }) && e.to_string().contains("8 bytes expected"));
    }

    #[test]
    fn write_error_is_reported() {
        struct Fail;
        impl Write for Fail {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let e = write(
            &mut Fail,
            "x",
            &[t("a", Dtype::U8, &[1], &[1])],
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Write { .. }), "{e}");
    }

    #[test]
    fn shards_and_index() {
        let ts: Vec<_> = (0..5)
            .map(|i| t(&format!("w{i}"), Dtype::U8, &[4], &[i; 4]))
            .collect();
        let plan = plan_shards(&ts, 8);
        assert_eq!(plan.files.len(), 3);
        assert_eq!(plan.files[0].0, "model-00001-of-00003.safetensors");
        assert_eq!(plan.files[2].1, vec![4]);
        let idx: serde_json::Value = serde_json::from_str(&index_json(&ts, &plan)).unwrap();
        assert_eq!(idx["metadata"]["total_size"], 20);
        assert_eq!(idx["weight_map"]["w3"], "model-00002-of-00003.safetensors");
        assert_eq!(plan_shards(&ts, 100).files[0].0, SINGLE_FILE);

        // Written to a folder and read back through the index.
        let dir = tempfile::tempdir().unwrap();
        for (f, ix) in &plan.files {
            let sel: Vec<_> = ix.iter().map(|&i| ts[i].clone()).collect();
            std::fs::write(dir.path().join(f), file_of(&sel)).unwrap();
        }
        std::fs::write(dir.path().join(INDEX_FILE), index_json(&ts, &plan)).unwrap();
        let files = open_dir(dir.path()).unwrap();
        let all: Vec<_> = files.iter().flat_map(|(_, s)| s.tensors.iter()).collect();
        assert_eq!(all.len(), 5);
        assert_eq!(all[3].data.as_slice(), &[3; 4]);

        // An index that names a tensor no file holds.
        let bad = index_json(&ts, &plan).replace("\"w4\"", "\"w9\"");
        std::fs::write(dir.path().join(INDEX_FILE), bad).unwrap();
        let e = open_dir(dir.path()).unwrap_err();
        assert!(matches!(e, Error::Index { .. }), "{e}");
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(open_dir(empty.path()), Err(Error::Index { .. })));
        let e = SafeTensors::open(&empty.path().join("none")).unwrap_err();
        assert!(matches!(e, Error::Io { .. }));
    }
}
