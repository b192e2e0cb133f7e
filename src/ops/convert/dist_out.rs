//! Writing a named model as a `.nemo` whose weights are a megatron-core
//! `torch_dist` folder (`model_weights/`), mirroring what mcore saves from a
//! TP=1 model (fixtures/mcore README fact 8): `model.`-prefixed keys, layers
//! stacked on a leading axis with one chunk per layer (two for gated fc1:
//! gate and up), TE norm names, `_extra_state` as ShardedObjects
//! `…/shard_{l}_{L}` holding `torch.save([obj])`, no
//! `output_layer._extra_state`, `common.pt` = `torch.save({})`, and the
//! torch_dist `metadata.json`. SequentialMLP experts are stacked as megatron-core stacks
//! them: `decoder.layers.mlp.experts.experts.X` of shape `[layers, experts, ...]`, one chunk
//! per (layer, expert) (two for a gated fc1), objects `…/shard_{l}.{e}_{L}.{E}`.
//! megatron-core loads it at any TP.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use crate::formats::dist::{Backend, Chunk, DistCheckpoint, DistTensor, Location};
use crate::formats::tar_write::{python_add_order, TarWriter};
use crate::formats::torch::value::Value;
use crate::io::bytes::ByteView;
use crate::io::output::OutputFile;
use crate::io::piece::Piece;
use crate::model::checkpoint::write::TarDir;
use crate::model::checkpoint::{Checkpoint, CONFIG_MEMBER};

use super::named::{stack_name, te_name, Item, NamedModel};

pub use crate::formats::dist::dcp_write::METADATA_JSON;

/// Errors writing the distributed `.nemo`; each names the member or key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating or committing the output, the tar stream, a source member,
    /// a member's bytes (the failures every archive writer shares).
    #[error(transparent)]
    Write(#[from] crate::formats::tar_write::WriteError),
    /// Writing the DCP folder.
    #[error("model_weights/: {0}")]
    Dist(#[from] crate::formats::dist::Error),
    /// Layers of one stacked key disagree.
    #[error("{key}: {why}")]
    Stack {
        /// The stacked key.
        key: String,
        /// Why.
        why: String,
    },
    /// Serializing an object.
    #[error("{key}: cannot save: {why}")]
    Object {
        /// The object key.
        key: String,
        /// Why.
        why: String,
    },
}

crate::formats::tar_write::from_write_errors!(Error);

/// What was written.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The output file.
    pub output: PathBuf,
    /// Distributed tensors (stacked keys count once).
    pub tensors: usize,
    /// Non-fatal findings.
    pub warnings: Vec<String>,
}

/// `torch.save(value)` bytes (archive folder `archive`, as `torch.save` into
/// a BytesIO names it).
fn torch_save(key: &str, v: &Value) -> Result<ByteView, Error> {
    let mut out = Vec::new();
    crate::formats::torch::file::save(&mut out, "archive", v).map_err(|e| Error::Object {
        key: key.to_string(),
        why: e.to_string(),
    })?;
    Ok(ByteView::from_vec(out))
}

/// The distributed layout of `canon`: tensors with chunks, the pieces of
/// every chunk (same order), and the object items.
#[allow(clippy::type_complexity)]
pub fn plan(
    canon: &NamedModel,
    gated: bool,
) -> Result<
    (
        Vec<DistTensor>,
        Vec<Vec<Vec<Piece>>>,
        Vec<(String, ByteView)>,
        Vec<String>,
    ),
    Error,
> {
    let layers = canon.num_layers();
    let experts = canon
        .entries
        .iter()
        .filter_map(|e| expert_of(&e.name).map(|(_, x, _)| x + 1))
        .max()
        .unwrap_or(0);
    let mut tensors: Vec<DistTensor> = Vec::new();
    let mut pieces: Vec<Vec<Vec<Piece>>> = Vec::new();
    let mut objects = Vec::new();
    let mut warnings = Vec::new();
    for e in &canon.entries {
        let te = te_name(&e.name);
        // where a layer's (or a layer's expert's) entry goes: the stacked key, its indices on
        // the leading axes, those axes, and the object shard suffix
        let stacked = match (expert_of(&te), stack_name(&te)) {
            (Some((l, x, key)), _) => Some((
                key,
                vec![l, x],
                vec![layers, experts],
                format!("shard_{l}.{x}_{layers}.{experts}"),
            )),
            (None, Some((l, key))) => {
                Some((key, vec![l], vec![layers], format!("shard_{l}_{layers}")))
            }
            (None, None) => None,
        };
        match (&e.item, stacked) {
            (Item::Object(v), Some((key, _, _, shard))) => {
                let k = format!("{key}/{shard}");
                let b = torch_save(&k, &Value::List(vec![v.clone()]))?;
                objects.push((k, b));
            }
            (Item::Object(_), None) => {
                // mcore drops output_layer._extra_state from the sharded dict.
                if e.name != "model.output_layer._extra_state" {
                    warnings.push(format!("dropped non-layer object `{}`", e.name));
                }
            }
            (Item::Tensor(t), Some((key, lead, dims, _))) => {
                stack_into(&mut tensors, &mut pieces, key, &dims, &lead, t, gated)?;
            }
            (Item::Tensor(t), None) => {
                tensors.push(DistTensor {
                    key: te.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    chunks: vec![Chunk {
                        offsets: vec![0; t.shape.len()],
                        sizes: t.shape.clone(),
                        location: Location::File {
                            member: String::new(),
                        },
                    }],
                });
                pieces.push(vec![t.pieces().to_vec()]);
            }
        }
    }
    for t in &tensors {
        crate::formats::dist::validate_chunks(t)?;
    }
    Ok((tensors, pieces, objects, warnings))
}

/// Adds `t` to the stacked tensor `key` (leading axes `dims`, created at the first entry) at
/// the leading indices `lead`: one chunk, or two for a gated fc1 (its gate and up halves, as
/// mcore's swiglu factory saves them).
fn stack_into(
    tensors: &mut Vec<DistTensor>,
    pieces: &mut Vec<Vec<Vec<Piece>>>,
    key: String,
    dims: &[u64],
    lead: &[u64],
    t: &super::tensor::Flat,
    gated: bool,
) -> Result<(), Error> {
    let idx = match tensors.iter().position(|x| x.key == key) {
        Some(i) => i,
        None => {
            let mut shape = dims.to_vec();
            shape.extend(&t.shape);
            tensors.push(DistTensor {
                key: key.clone(),
                dtype: t.dtype,
                shape,
                chunks: Vec::new(),
            });
            pieces.push(Vec::new());
            tensors.len() - 1
        }
    };
    let (Some(dt), Some(ps)) = (tensors.get_mut(idx), pieces.get_mut(idx)) else {
        return Ok(());
    };
    let n = lead.len();
    if dt.dtype != t.dtype || dt.shape.get(n..) != Some(&t.shape[..]) {
        return Err(Error::Stack {
            key,
            why: format!(
                "at {lead:?} it is {}{:?}, the first {}{:?}",
                t.dtype, t.shape, dt.dtype, dt.shape
            ),
        });
    }
    let rows = t.shape.first().copied().unwrap_or(0);
    let halves = gated
        && (key.ends_with("linear_fc1.weight") || key.ends_with("linear_fc1.bias"))
        && rows % 2 == 0;
    let parts: Vec<(u64, u64)> = if halves {
        vec![(0, rows / 2), (rows / 2, rows)]
    } else {
        vec![(0, rows)]
    };
    for (r0, r1) in parts {
        let mut offsets = vec![0; dt.shape.len()];
        let mut sizes = dt.shape.clone();
        for (i, &x) in lead.iter().enumerate() {
            offsets[i] = x;
            sizes[i] = 1;
        }
        let p = if sizes.len() > n {
            offsets[n] = r0;
            sizes[n] = r1 - r0;
            t.rows(r0, r1).map_err(|e| Error::Stack {
                key: key.clone(),
                why: e.to_string(),
            })?
        } else {
            t.pieces().to_vec()
        };
        dt.chunks.push(Chunk {
            offsets,
            sizes,
            location: Location::File {
                member: String::new(),
            },
        });
        ps.push(p);
    }
    Ok(())
}

/// (layer, expert, stacked key) of a SequentialMLP expert's entry
/// (`model.decoder.layers.L.mlp.experts.local_experts.E.X` ->
/// `model.decoder.layers.mlp.experts.experts.X`).
fn expert_of(name: &str) -> Option<(u64, u64, String)> {
    let (l, suffix) = stack_name(name)?;
    let rest = suffix.strip_prefix("model.decoder.layers.mlp.experts.local_experts.")?;
    let (x, tail) = rest.split_once('.')?;
    Some((
        l,
        x.parse().ok()?,
        format!("model.decoder.layers.mlp.experts.experts.{tail}"),
    ))
}

/// Writes a planned torch_dist folder into `out`: `tensors` with the `pieces` of each chunk,
/// the object items, the torch_dist `metadata.json`, and `common` as `common.pt` (`{}` when
/// none is given).
///
/// # Errors
/// I/O errors, a chunk without pieces.
pub fn write_planned(
    tensors: &[DistTensor],
    pieces: &[Vec<Vec<Piece>>],
    objects: &[(String, ByteView)],
    common: Option<ByteView>,
    out: &mut dyn crate::formats::dist::OutDir,
) -> Result<(), Error> {
    let common = match common {
        Some(c) => c,
        None => torch_save("common.pt", &Value::Dict(Vec::new()))?,
    };
    let dist = DistCheckpoint {
        dir: String::new(),
        backend: Backend::TorchDist,
        metadata_json: Some(METADATA_JSON.to_string()),
        tensors: tensors.to_vec(),
        objects: Vec::new(),
        common_bytes: Some(common),
        common: None,
        warnings: Vec::new(),
        mcore: false,
        planner_paths: Vec::new(),
    };
    let mut fill =
        |ti: usize, ci: usize, sink: &mut dyn FnMut(&[u8]) -> io::Result<()>| -> io::Result<()> {
            let p = pieces
                .get(ti)
                .and_then(|c| c.get(ci))
                .ok_or_else(|| io::Error::other("chunk without pieces"))?;
            super::tensor::stream_pieces(p, None, &mut |b: &[u8]| sink(b))
        };
    crate::formats::dist::dcp_write::write_torch_dist_streamed(&dist, objects, &mut fill, out)?;
    Ok(())
}

/// Writes `canon` (from `ck`, whose artifacts are copied; its config as `config`) as a
/// distributed `.nemo` at `out`.
///
/// # Errors
/// [`Error`]; the output appears only on success.
pub fn write(
    ck: &Checkpoint,
    canon: &NamedModel,
    config: &str,
    out: &Path,
    force: bool,
) -> Result<Summary, Error> {
    let (tensors, pieces, objects, warnings) = plan(canon, ck.config.is_gated())?;
    let n_tensors = tensors.len();
    let mut names: Vec<String> = vec![CONFIG_MEMBER.to_string()];
    names.extend(ck.artifacts.iter().cloned());
    names.push(crate::model::checkpoint::detect::DIST_DIR.to_string());
    let dirs: BTreeSet<String> = ck
        .artifacts
        .iter()
        .filter_map(|a| a.rsplit_once('/').map(|(d, _)| d.to_string()))
        .collect();
    names.extend(dirs.iter().cloned());
    names.sort_by(|a, b| python_add_order(a, b));
    names.dedup();
    let mut file = OutputFile::create(out, force)?;
    let mut tar =
        TarWriter::new(crate::io::sink::BlockWriter::new(file.file()).with_writeback(true));
    tar.append_dir("")?;
    for name in &names {
        if name == crate::model::checkpoint::detect::DIST_DIR {
            tar.append_dir(name)?;
            write_planned(
                &tensors,
                &pieces,
                &objects,
                None,
                &mut TarDir::new(&mut tar, crate::model::checkpoint::detect::DIST_DIR),
            )?;
        } else if dirs.contains(name) {
            tar.append_dir(name)?;
        } else if name == CONFIG_MEMBER {
            tar.append_pieces(name, config.len() as u64, [config.as_bytes()])?;
        } else {
            let b = ck.read_member(name)?;
            tar.append_pieces(name, b.len() as u64, [b])?;
        }
    }
    // (finish flushes; the writer borrows the file until dropped)
    drop(tar.finish()?);
    let output = file.commit()?;
    Ok(Summary {
        output,
        tensors: n_tensors,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::torch::dtype::Dtype;
    use crate::ops::convert::named::Entry;
    use crate::ops::convert::tensor::Flat;

    fn t(name: &str, shape: &[u64]) -> Entry {
        let n: u64 = shape.iter().product::<u64>() * 4;
        Entry {
            name: name.into(),
            item: Item::Tensor(
                Flat::new(name, Dtype::F32, shape.to_vec(), vec![Piece::Zeros(n)]).unwrap(),
            ),
        }
    }

    #[test]
    fn layers_stack_with_gated_halves_and_objects() {
        let c = NamedModel {
            entries: vec![
                t("model.decoder.layers.0.mlp.linear_fc1.weight", &[4, 2]),
                t("model.decoder.layers.1.mlp.linear_fc1.weight", &[4, 2]),
                t("model.decoder.layers.0.input_layernorm.weight", &[2]),
                t("model.decoder.layers.1.input_layernorm.weight", &[2]),
                Entry {
                    name: "model.decoder.layers.1.mlp.linear_fc1._extra_state".into(),
                    item: Item::Object(Value::None),
                },
                Entry {
                    name: "model.output_layer._extra_state".into(),
                    item: Item::Object(Value::None),
                },
            ],
        };
        let (tensors, pieces, objects, warnings) = plan(&c, true).unwrap();
        assert!(warnings.is_empty());
        let fc1 = &tensors[0];
        assert_eq!(fc1.key, "model.decoder.layers.mlp.linear_fc1.weight");
        assert_eq!(fc1.shape, vec![2, 4, 2]);
        let boxes: Vec<_> = fc1
            .chunks
            .iter()
            .map(|c| (c.offsets.clone(), c.sizes.clone()))
            .collect();
        assert_eq!(
            boxes,
            vec![
                (vec![0, 0, 0], vec![1, 2, 2]),
                (vec![0, 2, 0], vec![1, 2, 2]),
                (vec![1, 0, 0], vec![1, 2, 2]),
                (vec![1, 2, 0], vec![1, 2, 2]),
            ]
        );
        assert_eq!(pieces[0].len(), 4);
        assert_eq!(
            tensors[1].key,
            "model.decoder.layers.self_attention.linear_qkv.layer_norm_weight"
        );
        assert_eq!(tensors[1].chunks.len(), 2);
        assert_eq!(objects.len(), 1);
        assert_eq!(
            objects[0].0,
            "model.decoder.layers.mlp.linear_fc1._extra_state/shard_1_2"
        );
    }

    #[test]
    fn layers_of_different_shapes_do_not_stack() {
        let c = NamedModel {
            entries: vec![
                t("model.decoder.layers.0.mlp.linear_fc2.weight", &[2, 2]),
                t("model.decoder.layers.1.mlp.linear_fc2.weight", &[2, 3]),
            ],
        };
        let e = plan(&c, true).unwrap_err();
        assert!(
            matches!(&e, Error::Stack { key, .. } if key.ends_with("linear_fc2.weight")),
            "{e}"
        );
    }
}
