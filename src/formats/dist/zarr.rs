//! Megatron-Core's `zarr` sharded backend (nemo-format.md §1.8): one zarr
//! v2 array directory per tensor key (`<key>/.zarray` + raw chunk files
//! named by dot-joined chunk indices) and ShardedObjects as
//! `<key>/shard_<offsets>_<shape>.pt` `torch.save` files. Reading maps it to
//! the [`crate::formats::dist`] model; [`super::zarr_write`] writes it back.
//!
//! Only what mcore wrote is supported: no compressor, no filters, C order,
//! little-endian dtypes or mcore's literal `"bfloat16"`. Chunk files always
//! hold the full chunk shape, even at the array edge (zarr v2 spec).
//!
//! # Errors
//! [`Error`] names the `.zarray` member or the chunk file.

use std::collections::{BTreeMap, HashSet};

use super::error::Error as DistError;
pub use super::error::ZarrError as Error;
use super::model::{self as dist, Chunk, DistCheckpoint, DistObject, DistTensor, Location};
use crate::formats::members::Members;
use crate::formats::torch::dtype::Dtype;

/// Largest `.zarray` accepted.
pub const MAX_ZARRAY_BYTES: usize = 1 << 20;

/// The parts of a `.zarray` this reader uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZArray {
    /// Global shape.
    pub shape: Vec<u64>,
    /// Chunk shape.
    pub chunks: Vec<u64>,
    /// Element type.
    pub dtype: Dtype,
    /// Chunk-name separator (`.` unless `dimension_separator` says `/`).
    pub separator: char,
}

/// Parses and checks a `.zarray` text.
///
/// # Errors
/// [`Error::BadZarray`], [`Error::Unsupported`].
pub fn parse_zarray(member: &str, text: &[u8]) -> Result<ZArray, Error> {
    let bad = |why: String| Error::BadZarray {
        member: member.into(),
        why,
    };
    let unsup = |why: String| Error::Unsupported {
        member: member.into(),
        why,
    };
    if text.len() > MAX_ZARRAY_BYTES {
        return Err(bad(format!("{} bytes is over the cap", text.len())));
    }
    let v: serde_json::Value = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
    if v.get("zarr_format").and_then(|f| f.as_u64()) != Some(2) {
        return Err(unsup(format!("zarr_format {:?}", v.get("zarr_format"))));
    }
    let dims = |name: &str| -> Result<Vec<u64>, Error> {
        v.get(name)
            .and_then(|a| a.as_array())
            .ok_or_else(|| bad(format!("`{name}` missing or not a list")))?
            .iter()
            .map(|x| x.as_u64().ok_or_else(|| bad(format!("`{name}` holds {x}"))))
            .collect()
    };
    let shape = dims("shape")?;
    let chunks = dims("chunks")?;
    if shape.len() != chunks.len() || shape.len() > dist::MAX_DIMS {
        return Err(bad(format!(
            "shape {shape:?} and chunks {chunks:?} disagree"
        )));
    }
    if chunks.contains(&0) {
        return Err(bad(format!("zero chunk size in {chunks:?}")));
    }
    let dt = v.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| {
        unsup(format!(
            "dtype {:?} (structured dtypes are not supported)",
            v.get("dtype")
        ))
    })?;
    let dtype = Dtype::from_zarr_name(dt).ok_or_else(|| unsup(format!("dtype {dt:?}")))?;
    if let Some(c) = v.get("compressor").filter(|c| !c.is_null()) {
        return Err(unsup(format!("compressor {c} (only uncompressed arrays)")));
    }
    if let Some(f) = v
        .get("filters")
        .filter(|f| !f.is_null() && f.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(unsup(format!("filters {f}")));
    }
    match v.get("order").and_then(|o| o.as_str()) {
        Some("C") | None => {}
        Some(o) => return Err(unsup(format!("order {o:?} (only C)"))),
    }
    let separator = match v.get("dimension_separator").and_then(|s| s.as_str()) {
        None | Some(".") => '.',
        Some("/") => '/',
        Some(s) => return Err(unsup(format!("dimension_separator {s:?}"))),
    };
    Ok(ZArray {
        shape,
        chunks,
        dtype,
        separator,
    })
}

/// The chunk grid index of a chunk file name (`3.1.0`; `0` for 0-d arrays).
fn chunk_index(name: &str, za: &ZArray) -> Option<Vec<u64>> {
    if za.shape.is_empty() {
        return (name == "0").then(Vec::new);
    }
    let idx: Vec<u64> = name
        .split(za.separator)
        .map(|p| p.parse::<u64>().ok())
        .collect::<Option<_>>()?;
    let ok = idx.len() == za.shape.len()
        && idx
            .iter()
            .zip(za.chunks.iter().zip(&za.shape))
            .all(|(&i, (&c, &s))| i.checked_mul(c).is_some_and(|o| o < s));
    ok.then_some(idx)
}

fn grid(za: &ZArray) -> Vec<u64> {
    za.shape
        .iter()
        .zip(&za.chunks)
        .map(|(&s, &c)| s.div_ceil(c))
        .collect()
}

/// Reads every `.zarray` and lists chunk files and shard objects into `ck`.
pub(crate) fn read_metadata(
    members: &dyn Members,
    ck: &mut DistCheckpoint,
) -> Result<(), DistError> {
    let prefix = if ck.dir.is_empty() {
        String::new()
    } else {
        format!("{}/", ck.dir)
    };
    let names: Vec<String> = if ck.dir.is_empty() {
        members.member_names()
    } else {
        members.members_under(&ck.dir)
    };
    let arrays: BTreeMap<String, String> = names
        .iter()
        .filter_map(|n| {
            let rel = n.strip_prefix(&prefix)?;
            let key = rel.strip_suffix("/.zarray")?;
            Some((key.to_string(), n.clone()))
        })
        .collect();
    let mut tensors = Vec::new();
    let mut claimed = HashSet::new();
    for (key, zmember) in &arrays {
        let za = parse_zarray(zmember, dist::read(members, zmember)?.as_slice())?;
        let adir = format!("{prefix}{key}/");
        let mut chunks = Vec::new();
        for n in &names {
            let Some(rel) = n.strip_prefix(&adir) else {
                continue;
            };
            if rel.starts_with('.') || (za.separator == '.' && rel.contains('/')) {
                continue; // .zarray, .zattrs; nested arrays are listed on their own
            }
            let idx = chunk_index(rel, &za).ok_or_else(|| Error::BadChunkName {
                member: n.clone(),
                ndim: za.shape.len(),
                grid: grid(&za),
            })?;
            let offsets: Vec<u64> = idx.iter().zip(&za.chunks).map(|(i, c)| i * c).collect();
            let sizes = offsets
                .iter()
                .zip(za.chunks.iter().zip(&za.shape))
                .map(|(&o, (&c, &s))| c.min(s - o))
                .collect();
            claimed.insert(n.clone());
            chunks.push(Chunk {
                offsets,
                sizes,
                location: Location::ZarrChunk {
                    member: n.clone(),
                    chunk_shape: za.chunks.clone(),
                },
            });
        }
        chunks.sort_by(|a, b| a.offsets.cmp(&b.offsets));
        claimed.insert(zmember.clone());
        tensors.push(DistTensor {
            key: key.clone(),
            dtype: za.dtype,
            shape: za.shape.clone(),
            chunks,
        });
    }
    let mut objects: Vec<DistObject> = names
        .iter()
        .filter(|n| !claimed.contains(*n))
        .filter_map(|n| {
            let rel = n.strip_prefix(&prefix)?;
            let key = rel.strip_suffix(".pt")?;
            let base = key.rsplit('/').next()?;
            base.starts_with("shard_").then(|| DistObject {
                key: key.to_string(),
                location: Location::File { member: n.clone() },
            })
        })
        .collect();
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    ck.tensors = tensors;
    ck.objects = objects;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::dist::testutil::{dir_members, f32s, TempOut};
    use crate::formats::dist::zarr_write::{grid_shape, write_zarr};
    use crate::formats::dist::{pieces_to_vec, Backend, DistCheckpoint};
    use crate::formats::members::MemoryMembers;

    const EXTRA: &str = "fixtures/zarr/extra";
    const LLAMA: &str = "fixtures/zarr/llama_tp2";

    #[test]
    fn reads_edge_bf16_and_scalar_arrays() {
        let m = dir_members(EXTRA);
        let ck = DistCheckpoint::open(&m, "model_weights").unwrap();
        assert_eq!(ck.backend, Backend::Zarr);
        let edge = ck.tensor("edge").unwrap();
        assert_eq!(edge.shape, vec![5, 3]);
        assert_eq!(edge.chunks.len(), 6);
        // the last row of chunks is clipped to 1 x {2, 1}
        assert_eq!(edge.chunks[5].offsets, vec![4, 2]);
        assert_eq!(edge.chunks[5].sizes, vec![1, 1]);
        let v = f32s(&pieces_to_vec(&ck.read_global(&m, edge).unwrap()));
        assert_eq!(v, (0..15).map(|i| 100.0 + i as f32).collect::<Vec<_>>());
        // a box across chunk edges
        let b = f32s(&pieces_to_vec(
            &ck.read_box(&m, edge, &[1, 1], &[3, 2]).unwrap(),
        ));
        assert_eq!(b, vec![104.0, 105.0, 107.0, 108.0, 110.0, 111.0]);

        let q = ck
            .tensor("decoder.layers.self_attention.linear_qkv.weight")
            .unwrap();
        assert_eq!(q.dtype, Dtype::BF16);
        let raw = pieces_to_vec(&ck.read_global(&m, q).unwrap());
        let vals: Vec<f32> = raw
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert_eq!(vals, (0..96).map(|i| i as f32).collect::<Vec<_>>());
        // one layer of the stacked tensor is one contiguous piece per chunk
        let layer = ck.read_box(&m, q, &[1, 0, 0], &[1, 12, 4]).unwrap();
        assert_eq!(layer.len(), 2);

        let s = ck.tensor("scalar").unwrap();
        assert!(s.shape.is_empty());
        let sv = pieces_to_vec(&ck.read_global(&m, s).unwrap());
        assert_eq!(i64::from_le_bytes(sv.try_into().unwrap()), 7);

        assert_eq!(ck.objects.len(), 1);
        assert_eq!(
            ck.objects[0].key,
            "decoder.layers.self_attention.linear_qkv._extra_state/shard_0_1"
        );
        assert!(ck.common_bytes.is_some());
    }

    #[test]
    fn reads_llama_zarr_layout() {
        let m = dir_members(LLAMA);
        let ck = DistCheckpoint::open(&m, "model_weights").unwrap();
        assert_eq!(ck.tensors.len(), 9);
        let fc1 = ck
            .tensor("model.decoder.layers.mlp.linear_fc1.weight")
            .unwrap();
        assert_eq!(fc1.shape, vec![2, 192, 64]);
        assert_eq!(fc1.chunks.len(), 8);
        assert_eq!(ck.objects.len(), 8);
    }

    fn assert_same(a: &DistCheckpoint, am: &dyn Members, b: &DistCheckpoint, bm: &dyn Members) {
        assert_eq!(a.tensors.len(), b.tensors.len());
        for (x, y) in a.tensors.iter().zip(&b.tensors) {
            assert_eq!((&x.key, x.dtype, &x.shape), (&y.key, y.dtype, &y.shape));
            let bx: Vec<_> = x.chunks.iter().map(|c| (&c.offsets, &c.sizes)).collect();
            let by: Vec<_> = y.chunks.iter().map(|c| (&c.offsets, &c.sizes)).collect();
            assert_eq!(bx, by, "{}", x.key);
            assert_eq!(
                pieces_to_vec(&a.read_global(am, x).unwrap()),
                pieces_to_vec(&b.read_global(bm, y).unwrap()),
                "{}",
                x.key
            );
        }
        let ko: Vec<_> = a.objects.iter().map(|o| &o.key).collect();
        let kb: Vec<_> = b.objects.iter().map(|o| &o.key).collect();
        assert_eq!(ko, kb);
    }

    #[test]
    fn zarr_round_trip_is_identical() {
        for fx in [EXTRA, LLAMA] {
            let m = dir_members(fx);
            let ck = DistCheckpoint::open(&m, "model_weights").unwrap();
            let mut out = TempOut::new();
            write_zarr(&ck, &m, &mut out.dir).unwrap();
            let m2 = out.members("model_weights");
            let ck2 = DistCheckpoint::open(&m2, "model_weights").unwrap();
            assert_same(&ck, &m, &ck2, &m2);
            // chunk files and .zarray texts are byte-identical to what zarr wrote
            for n in m.member_names() {
                assert_eq!(
                    m.read_member(&n).unwrap().as_slice(),
                    m2.read_member(&n).unwrap().as_slice(),
                    "{n}"
                );
            }
        }
    }

    fn zarray(extra: &str) -> Vec<u8> {
        format!(
            r#"{{"zarr_format": 2, "shape": [4], "chunks": [2], "dtype": "<f4", "fill_value": null, "order": "C", "compressor": null{extra}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn rejects_compressor_filters_and_f_order() {
        let z = zarray("").to_vec();
        assert!(parse_zarray("a/.zarray", &z).is_ok());
        let blosc = String::from_utf8(zarray("")).unwrap().replace(
            r#""compressor": null"#,
            r#""compressor": {"id": "blosc", "cname": "lz4"}"#,
        );
        let e = parse_zarray("a/.zarray", blosc.as_bytes()).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("compressor"), "{e}");
        let f = String::from_utf8(zarray(""))
            .unwrap()
            .replace(r#""C""#, r#""F""#);
        assert!(matches!(
            parse_zarray("a/.zarray", f.as_bytes()),
            Err(Error::Unsupported { .. })
        ));
        let filt = zarray(r#", "filters": [{"id": "delta"}]"#);
        assert!(matches!(
            parse_zarray("a/.zarray", &filt),
            Err(Error::Unsupported { .. })
        ));
        let be = String::from_utf8(zarray("")).unwrap().replace("<f4", ">f4");
        assert!(matches!(
            parse_zarray("a/.zarray", be.as_bytes()),
            Err(Error::Unsupported { .. })
        ));
    }

    #[test]
    fn rejects_bad_zarray_json() {
        assert!(matches!(
            parse_zarray("a/.zarray", b"{"),
            Err(Error::BadZarray { .. })
        ));
        let no_shape = br#"{"zarr_format": 2, "chunks": [2], "dtype": "<f4"}"#;
        assert!(matches!(
            parse_zarray("a/.zarray", no_shape),
            Err(Error::BadZarray { .. })
        ));
    }

    fn tiny(files: &[(&str, Vec<u8>)]) -> MemoryMembers {
        let mut m = MemoryMembers::default();
        m.insert(
            "mw/metadata.json",
            br#"{"sharded_backend": "zarr"}"#.to_vec(),
        );
        m.insert("mw/w/.zarray", zarray(""));
        for (n, b) in files {
            m.insert(n, b.clone());
        }
        m
    }

    #[test]
    fn rejects_stray_chunk_names() {
        let m = tiny(&[("mw/w/0", vec![0; 8]), ("mw/w/7", vec![0; 8])]);
        let e = DistCheckpoint::open(&m, "mw").unwrap_err();
        assert!(
            matches!(e, DistError::Zarr(Error::BadChunkName { .. })),
            "{e}"
        );
    }

    #[test]
    fn missing_chunk_fails_coverage_and_short_file_fails_read() {
        let m = tiny(&[("mw/w/0", vec![0; 8])]);
        let e = DistCheckpoint::open(&m, "mw").unwrap_err();
        assert!(matches!(e, DistError::Coverage { .. }), "{e}");
        let m = tiny(&[("mw/w/0", vec![0; 8]), ("mw/w/1", vec![0; 5])]);
        let ck = DistCheckpoint::open(&m, "mw").unwrap();
        let e = ck.read_global(&m, &ck.tensors[0]).unwrap_err();
        assert!(e.to_string().contains("holds 5 bytes"), "{e}");
    }

    #[test]
    fn off_grid_chunks_cannot_be_written() {
        let t = DistTensor {
            key: "x".into(),
            dtype: Dtype::F32,
            shape: vec![4],
            chunks: vec![
                Chunk {
                    offsets: vec![0],
                    sizes: vec![1],
                    location: Location::File { member: "a".into() },
                },
                Chunk {
                    offsets: vec![1],
                    sizes: vec![3],
                    location: Location::File { member: "b".into() },
                },
            ],
        };
        assert!(matches!(grid_shape(&t), Err(Error::NotAGrid { .. })));
    }

    #[test]
    fn write_errors_name_the_file() {
        let e = DistError::Write {
            member: "w/0".into(),
            source: std::io::Error::other("disk full"),
        };
        assert_eq!(e.to_string(), "w/0: write failed: disk full");
        let mut fs = crate::io::outdir::FsDir::new(std::env::temp_dir());
        let e = crate::io::outdir::write_bytes(&mut fs, "../escape", b"x").unwrap_err();
        assert!(e.to_string().contains("unsafe output name"), "{e}");
    }
}
