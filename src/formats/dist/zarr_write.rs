//! Writing a [`DistCheckpoint`] as Megatron-Core's `zarr` backend: one zarr v2
//! array per tensor key (`.zarray` + raw C-order chunk files, edge chunks
//! padded to the full chunk shape) and ShardedObjects as `torch.save` files;
//! the chunks of any source (torch_dist or zarr) are read through
//! [`DistCheckpoint::read_box`].
//!
//! # Errors
//! [`super::Error`]; zarr-specific ones as [`super::zarr::Error`].

use serde_json::json;

use super::error::{Error as DistError, ZarrError as Error};
use super::model::{self as dist, Backend, DistCheckpoint, DistTensor, Location};
use crate::formats::members::Members;
use crate::io::outdir::{write_bytes, OutDir};

/// The `.zarray` text mcore (through zarr 2.x) writes: sorted keys, 4-space
/// indent; bf16 as the literal `"bfloat16"`.
pub fn zarray_text(t: &DistTensor, chunk_shape: &[u64]) -> Result<String, Error> {
    let dtype = t.dtype.zarr_name().ok_or_else(|| Error::NotAGrid {
        key: t.key.clone(),
        why: format!("dtype {} has no zarr name", t.dtype),
    })?;
    let v = json!({
        "chunks": chunk_shape,
        "compressor": null,
        "dtype": dtype,
        "fill_value": null,
        "filters": null,
        "order": "C",
        "shape": t.shape,
        "zarr_format": 2,
    });
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    serde::Serialize::serialize(&v, &mut ser).map_err(|e| Error::NotAGrid {
        key: t.key.clone(),
        why: e.to_string(),
    })?;
    String::from_utf8(out).map_err(|e| Error::NotAGrid {
        key: t.key.clone(),
        why: e.to_string(),
    })
}

/// The regular chunk shape of a tensor's chunks, or why there is none.
pub(crate) fn grid_shape(t: &DistTensor) -> Result<Vec<u64>, Error> {
    let not = |why: String| Error::NotAGrid {
        key: t.key.clone(),
        why,
    };
    if let Some(Location::ZarrChunk { chunk_shape, .. }) = t.chunks.first().map(|c| &c.location) {
        return Ok(chunk_shape.clone());
    }
    let first = t
        .chunks
        .iter()
        .find(|c| c.offsets.iter().all(|&o| o == 0))
        .ok_or_else(|| not("no chunk at the origin".into()))?;
    let cs = first.sizes.clone();
    if cs.contains(&0) {
        return Err(not("empty chunks".into()));
    }
    for c in &t.chunks {
        for d in 0..cs.len() {
            let want = cs[d].min(t.shape[d].saturating_sub(c.offsets[d]));
            if c.offsets[d] % cs[d] != 0 || c.sizes[d] != want {
                return Err(not(format!(
                    "chunk at {:?} size {:?} is off the {:?} grid",
                    c.offsets, c.sizes, cs
                )));
            }
        }
    }
    Ok(cs)
}

/// Writes `ck` (read from `src`) as an mcore zarr folder into `out`:
/// `metadata.json` (verbatim from a zarr source, else the zarr default), `common.pt` verbatim, per tensor a
/// `.zarray` and one full-size chunk file per chunk, and shard objects
/// (a DCP byte item `torch.save([obj])` becomes the zarr file `torch.save(obj)`).
///
/// # Errors
/// Unreadable source chunks, tensors whose chunks are no regular grid, I/O.
pub fn write_zarr(
    ck: &DistCheckpoint,
    src: &dyn Members,
    out: &mut dyn OutDir,
) -> Result<(), DistError> {
    let io = |member: &str| {
        let member = member.to_string();
        move |source| DistError::Write { member, source }
    };
    let json = br#"{"sharded_backend": "zarr", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}"#;
    let json = match (&ck.metadata_json, ck.backend) {
        (Some(j), Backend::Zarr) => j.as_bytes(),
        _ => &json[..],
    };
    write_bytes(out, "metadata.json", json).map_err(io("metadata.json"))?;
    if let Some(c) = &ck.common_bytes {
        write_bytes(out, "common.pt", c.as_slice()).map_err(io("common.pt"))?;
    }
    for t in &ck.tensors {
        let cs = grid_shape(t)?;
        let text = zarray_text(t, &cs)?;
        let zname = format!("{}/.zarray", t.key);
        write_bytes(out, &zname, text.as_bytes()).map_err(io(&zname))?;
        let esize = t.dtype.size() as u64;
        let full = cs
            .iter()
            .try_fold(esize, |a, &b| a.checked_mul(b))
            .ok_or_else(|| Error::NotAGrid {
                key: t.key.clone(),
                why: format!("chunk shape {cs:?} overflows"),
            })?;
        for c in &t.chunks {
            let idx: Vec<String> = c
                .offsets
                .iter()
                .zip(&cs)
                .map(|(o, s)| (o / s).to_string())
                .collect();
            let name = if idx.is_empty() {
                format!("{}/0", t.key)
            } else {
                format!("{}/{}", t.key, idx.join("."))
            };
            let pieces = ck.read_box(src, t, &c.offsets, &c.sizes)?;
            let bytes = dist::pieces_to_vec(&pieces);
            let padded = if c.sizes == cs {
                bytes
            } else {
                pad_chunk(&bytes, &c.sizes, &cs, esize)
            };
            if padded.len() as u64 != full {
                return Err(Error::NotAGrid {
                    key: t.key.clone(),
                    why: format!(
                        "chunk at {:?} gave {} bytes, not {full}",
                        c.offsets,
                        padded.len()
                    ),
                }
                .into());
            }
            write_bytes(out, &name, &padded).map_err(io(&name))?;
        }
    }
    for o in &ck.objects {
        let name = format!("{}.pt", o.key);
        let bytes = ck.object_bytes_for(src, o, Backend::Zarr)?;
        write_bytes(out, &name, bytes.as_slice()).map_err(io(&name))?;
    }
    Ok(())
}

/// Lays a clipped edge chunk's row-major bytes into a zero-filled buffer of
/// the full chunk shape.
fn pad_chunk(bytes: &[u8], sizes: &[u64], full: &[u64], esize: u64) -> Vec<u8> {
    let total = full.iter().product::<u64>() * esize;
    let mut out = vec![0u8; total as usize];
    let nd = sizes.len();
    let row = (sizes[nd - 1] * esize) as usize;
    let rows: u64 = sizes[..nd - 1].iter().product();
    let fstr = dist::c_strides(full);
    let mut idx = vec![0u64; nd - 1];
    for r in 0..rows as usize {
        let dst = idx.iter().zip(&fstr).map(|(i, s)| i * s).sum::<u64>() * esize;
        let dst = dst as usize;
        if let (Some(d), Some(s)) = (
            out.get_mut(dst..dst + row),
            bytes.get(r * row..(r + 1) * row),
        ) {
            d.copy_from_slice(s);
        }
        for d in (0..nd - 1).rev() {
            idx[d] += 1;
            if idx[d] < sizes[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}
