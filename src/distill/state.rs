//! Training checkpoints in the experiment folder, for `exp_manager.resume_if_exists`:
//! `checkpoints/step_<N>/rank_<r>.pt` (fp32 master weights and both Adam moments of rank r,
//! libtorch's own serialisation, bit-exact) plus `state.json` (step, consumed samples, world
//! size and the metric history for the logs and the plot). A checkpoint is written into a
//! `.partial` folder and renamed once every rank has written its file, so a run killed at any
//! point leaves only complete checkpoints behind; the two newest are kept.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::parallel::{self, Grid};

/// Errors reading or writing training checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// File system.
    #[error("{path}: {why}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A checkpoint written by a different launch.
    #[error("{path}: {why}")]
    Mismatch {
        /// The checkpoint.
        path: PathBuf,
        /// Why it cannot be resumed.
        why: String,
    },
    /// A collective.
    #[error(transparent)]
    Parallel(#[from] parallel::Error),
}

/// One training step's metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step number (1-based: updates done).
    pub step: u64,
    /// Mean KD loss over the step's micro-batches.
    pub kd_loss: f64,
    /// Learning rate used by the update.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Training tokens per second of the step.
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation of the step (0..1), where the device peak is known
    /// (see [`crate::distill::flops`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// The logits KD loss alone, when the step's loss also has the LM loss (`kd_loss` is
    /// then the balanced total, as ModelOpt reports it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits_loss: Option<f64>,
    /// The student's LM loss, when it is part of the step's loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lm_loss: Option<f64>,
    /// The mean intermediate-layer loss, when there are pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_loss: Option<f64>,
    /// A mixture-of-experts student's load-balancing loss (megatron-core's
    /// `load_balancing_loss`: `E · Σ_i f_i · P_i`, unscaled), the mean over its MoE layers and
    /// the step's micro-batches; logged, not part of the objective.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe_load_balancing_loss: Option<f64>,
}

/// One validation's metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValRecord {
    /// After this many steps.
    pub step: u64,
    /// Mean KD loss on the validation batches.
    pub val_kd_loss: f64,
    /// Mean student LM cross-entropy (NeMo's `val_loss`).
    pub val_loss: f64,
}

/// What `state.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Training samples consumed (the data position).
    pub consumed_samples: u64,
    /// Ranks that wrote it.
    pub world: u32,
    /// Their tensor-parallel size (0 in checkpoints from before data parallelism: TP = world).
    #[serde(default)]
    pub tp: u32,
    /// Their pipeline-parallel size (0 in checkpoints from before pipelines: 1). At PP > 1
    /// each stage's files carry `_pp<stage>` after the TP rank.
    #[serde(default)]
    pub pp: u32,
    /// Written by the distributed optimizer: one file per rank (`rank_<t>_dp<d>.pt`).
    #[serde(default)]
    pub distributed_optimizer: bool,
    /// Every step so far.
    pub train: Vec<StepRecord>,
    /// Every validation so far.
    pub val: Vec<ValRecord>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

fn step_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step_{step:08}"))
}

/// Complete checkpoints in `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step_")?.parse::<u64>().ok()?;
            let p = e.path();
            p.join("state.json").is_file().then_some((step, p))
        })
        .collect();
    v.sort();
    v
}

/// Saves the tensors of data-parallel replica 0 (one file per TP rank: the other replicas
/// hold the same; with the distributed optimizer every rank saves its own shards) and, on
/// rank 0, the state; every rank must call it.
///
/// # Errors
/// [`Error::Io`], collective errors.
pub fn save(
    dir: &Path,
    grid: &Grid,
    tensors: &[(String, Tensor)],
    state: &TrainState,
) -> Result<PathBuf, Error> {
    let fin = step_dir(dir, state.step);
    let partial = dir.join(format!(".step_{:08}.partial", state.step));
    let world = &grid.world;
    if world.rank() == 0 {
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
    }
    world.barrier()?;
    if grid.dp_rank() == 0 || state.distributed_optimizer {
        let file = partial.join(rank_file(grid, state.distributed_optimizer));
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::save_multi(&named, &file).map_err(|e| Error::Io {
            path: file.clone(),
            why: e.to_string(),
        })?;
    }
    world.barrier()?;
    if world.rank() == 0 {
        let json = serde_json::to_vec_pretty(state).map_err(|e| Error::Io {
            path: partial.clone(),
            why: e.to_string(),
        })?;
        let sp = partial.join("state.json");
        std::fs::write(&sp, json).map_err(io(&sp))?;
        let _ = std::fs::remove_dir_all(&fin);
        std::fs::rename(&partial, &fin).map_err(io(&fin))?;
        let all = list(dir);
        for (_, old) in all.iter().take(all.len().saturating_sub(2)) {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    world.barrier()?;
    Ok(fin)
}

/// This rank's file in a checkpoint folder.
fn rank_file(grid: &Grid, distributed_optimizer: bool) -> String {
    if distributed_optimizer {
        format!(
            "rank_{}{}_dp{}.pt",
            grid.tp_rank(),
            stage_tag(grid),
            grid.dp_rank()
        )
    } else {
        format!("rank_{}{}.pt", grid.tp_rank(), stage_tag(grid))
    }
}

/// `_pp<stage>` at PP > 1, else nothing (the file names of pipeline-free runs).
fn stage_tag(grid: &Grid) -> String {
    if grid.layout.pp > 1 {
        format!("_pp{}", grid.stage())
    } else {
        String::new()
    }
}

/// A loaded checkpoint: its folder, its state, this TP rank's named optimizer tensors, and
/// whether those are this rank's own distributed-optimizer shards (same DP layout) rather
/// than whole tensors.
pub type Loaded = (PathBuf, TrainState, Vec<(String, Tensor)>, bool);

/// The newest complete checkpoint: its state and this TP rank's optimizer tensors, whole.
///
/// The data-parallel layout may differ from the run that wrote it (another DP size, plain
/// AdamW or the distributed optimizer): replicas hold the same state, and the distributed
/// optimizer's shards of a TP rank (`rank_<t>_dp<d>.pt`, each a `1/DP` slice of every
/// flattened tensor) are concatenated back here, so the tensors come out as the flattened
/// whole, padded to the writer's DP. [`super::optim::AdamW::load_state`] cuts its own
/// layout from them. A distributed-optimizer run resuming at the writer's DP size
/// (`distributed_optimizer` set) reads only its own shard file.
///
/// # Errors
/// [`Error::Mismatch`] when it was written at another TP; I/O errors.
pub fn load_latest(
    dir: &Path,
    grid: &Grid,
    distributed_optimizer: bool,
) -> Result<Option<Loaded>, Error> {
    let Some((_, path)) = list(dir).pop() else {
        return Ok(None);
    };
    let sp = path.join("state.json");
    let text = std::fs::read(&sp).map_err(io(&sp))?;
    let state: TrainState = serde_json::from_slice(&text).map_err(|e| Error::Io {
        path: sp.clone(),
        why: e.to_string(),
    })?;
    let tp = grid.tp.world() as u32;
    let saved_tp = if state.tp == 0 { state.world } else { state.tp };
    let pp = grid.layout.pp as u32;
    let saved_pp = state.pp.max(1);
    if saved_pp != pp {
        return Err(Error::Mismatch {
            path,
            why: format!(
                "written at PP {saved_pp} (by {} ranks), this launch has PP {pp}; resume at the same PP and TP (DP may change), or use a new exp_manager folder",
                state.world,
            ),
        });
    }
    if saved_tp != tp {
        return Err(Error::Mismatch {
            path,
            why: format!(
                "written at TP {saved_tp} (by {} ranks), this launch has TP {tp}; resume at the same TP (DP may change), or use a new exp_manager folder",
                state.world,
            ),
        });
    }
    let load = |file: PathBuf| {
        Tensor::load_multi(&file).map_err(|e| Error::Io {
            path: file.clone(),
            why: e.to_string(),
        })
    };
    let t = grid.tp_rank();
    let stage = stage_tag(grid);
    let saved_dp = state.world / (saved_tp.max(1) * saved_pp);
    if state.distributed_optimizer && distributed_optimizer && saved_dp == grid.dp_size() as u32 {
        let own = load(path.join(rank_file(grid, true)))?;
        return Ok(Some((path, state, own, true)));
    }
    let tensors = if state.distributed_optimizer {
        let mut parts: Vec<Vec<(String, Tensor)>> = Vec::new();
        for d in 0..saved_dp {
            parts.push(load(path.join(format!("rank_{t}{stage}_dp{d}.pt")))?);
        }
        let Some(first) = parts.first() else {
            return Err(Error::Mismatch {
                path,
                why: "no shard files".to_string(),
            });
        };
        let mut whole = Vec::with_capacity(first.len());
        for (name, _) in first {
            let mut shards = Vec::with_capacity(parts.len());
            for p in &parts {
                let s = p
                    .iter()
                    .find(|(n, _)| n == name)
                    .ok_or_else(|| Error::Mismatch {
                        path: path.clone(),
                        why: format!("{name} missing from a shard file of TP rank {t}"),
                    })?;
                shards.push(s.1.reshape([-1]));
            }
            whole.push((name.clone(), Tensor::cat(&shards, 0)));
        }
        whole
    } else {
        load(path.join(format!("rank_{t}{stage}.pt")))?
    };
    Ok(Some((path, state, tensors, false)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn saves_loads_and_keeps_two() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let pg = Grid::single();
        let t = Tensor::arange(5, (Kind::Float, Device::Cpu)) / 3.0;
        for step in [2u64, 4, 6] {
            let st = TrainState {
                step,
                consumed_samples: step * 8,
                world: 1,
                ..TrainState::default()
            };
            save(
                dir.path(),
                &pg,
                &[("master.w".to_string(), &t * step as f64)],
                &st,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let steps: Vec<u64> = list(dir.path()).iter().map(|x| x.0).collect();
        assert_eq!(steps, vec![4, 6]);
        let (_, st, ts, _) = load_latest(dir.path(), &pg, false)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("nothing saved"));
        assert_eq!(st.consumed_samples, 48);
        let want = &t * 6.0;
        assert!(ts[0].1.equal(&want));
    }

    #[test]
    fn refuses_another_world_size() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let pg = Grid::single();
        let st = TrainState {
            step: 1,
            world: 2,
            ..TrainState::default()
        };
        let t = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        save(dir.path(), &pg, &[("x".to_string(), t)], &st).unwrap_or_else(|e| panic!("{e}"));
        let e = load_latest(dir.path(), &pg, false)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("written at TP 2 (by 2 ranks), this launch has TP 1"),
            "{e}"
        );
        assert!(load_latest(&dir.path().join("none"), &pg, false)
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none());
    }
}
