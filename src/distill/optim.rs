//! The student's optimizer: AdamW with decoupled weight decay (torch.optim.AdamW's update,
//! which is what NeMo's `fused_adam` computes with `adam_w_mode`), no decay on norms and
//! biases (NeMo's `do_layer_norm_weight_decay: false`: every 1-D parameter), fp32 master
//! weights and moments (also when the model computes in bf16), and gradient clipping by the
//! global norm over all TP ranks with replicated parameters counted once.

use tch::{Kind, Tensor};

use super::model::{Gpt, NamedParam};
use super::parallel::{self, ProcessGroup};
use crate::model::layout::Rule;

/// Errors of the optimizer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A collective failed.
    #[error(transparent)]
    Parallel(#[from] parallel::Error),
    /// Restored state that does not fit the model.
    #[error("optimizer state {name}: {why}")]
    State {
        /// Parameter name.
        name: String,
        /// Why.
        why: String,
    },
    /// A non-finite gradient norm (the step is refused).
    #[error("gradient norm is {0}: loss diverged")]
    NonFinite(f64),
}

/// Target size of one data-parallel gradient all-reduce (Megatron's DDP buckets are of this
/// order: large enough to amortise the collective's latency).
pub const DP_BUCKET_BYTES: usize = 32 << 20;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// β1, β2.
    pub betas: (f64, f64),
    /// ε (NeMo's fused_adam default 1e-8).
    pub eps: f64,
}

/// One parameter's optimizer slot.
#[derive(Debug)]
pub struct Slot {
    /// Canonical name.
    pub name: String,
    /// Split rule (replicated slots count once in the global norm).
    pub rule: Rule,
    /// Whether weight decay applies.
    pub decay: bool,
    /// Counted in the gradient norm (not the last stage's copy of tied embeddings, which
    /// the first stage counts: Megatron's `param_is_not_shared`).
    pub in_norm: bool,
    /// The model's parameter (fp32 or bf16).
    pub param: Tensor,
    /// fp32 master weights (the same tensor as `param` when the model is fp32).
    pub master: Tensor,
    /// First moment.
    pub exp_avg: Tensor,
    /// Second moment.
    pub exp_avg_sq: Tensor,
}

/// AdamW over a model's parameter shards.
#[derive(Debug)]
pub struct AdamW {
    /// Settings.
    pub cfg: AdamWConfig,
    /// Updates taken.
    pub step: u64,
    /// Slots in the model's parameter order.
    pub slots: Vec<Slot>,
    pg: ProcessGroup,
    /// The pipeline: stages' norms add up over it.
    pipeline: ProcessGroup,
    /// The distributed optimizer's layout, when masters and moments are sharded over DP.
    sharded: Option<Sharded>,
    /// The value averaged along with the last gradient bucket ([`AdamW::average_grads_and`]).
    carried: Option<f64>,
}

/// ZeRO-1 (Megatron's distributed optimizer): each slot's fp32 master weights and Adam
/// moments hold only this replica's contiguous shard of the flattened parameter (padded to
/// `dp × len`). Gradients are reduce-scattered into those shards and the updated shards
/// all-gathered back into the parameters, one collective per bucket of parameters.
#[derive(Debug)]
struct Sharded {
    dp: ProcessGroup,
    /// Per slot: elements of each replica's shard.
    lens: Vec<i64>,
    /// Slot index ranges of the communication buckets.
    buckets: Vec<std::ops::Range<usize>>,
    /// This step's averaged gradient shard per slot (set by [`AdamW::average_grads`]).
    grads: Vec<Option<Tensor>>,
}

impl AdamW {
    /// Slots for every parameter of `model`.
    pub fn new(model: &Gpt, cfg: AdamWConfig) -> AdamW {
        Self::with_extra(model, &[], cfg)
    }

    /// Slots for every parameter of `model`, then `extra` trainable parameters outside it
    /// (the KD projection layer), replicated on every TP rank.
    pub fn with_extra(model: &Gpt, extra: &[NamedParam], cfg: AdamWConfig) -> AdamW {
        let slots = model
            .params()
            .iter()
            .chain(extra)
            .map(|p: &NamedParam| {
                let master = if p.tensor.kind() == Kind::Float {
                    p.tensor.shallow_clone()
                } else {
                    tch::no_grad(|| p.tensor.detach().to_kind(Kind::Float))
                };
                Slot {
                    in_norm: model.tied_copy().is_none_or(|c| c.name != p.name),
                    name: p.name.clone(),
                    rule: p.rule,
                    decay: p.tensor.dim() >= 2,
                    param: p.tensor.shallow_clone(),
                    exp_avg: master.zeros_like(),
                    exp_avg_sq: master.zeros_like(),
                    master,
                }
            })
            .collect();
        AdamW {
            cfg,
            step: 0,
            slots,
            pg: model.group().clone(),
            pipeline: ProcessGroup::single(),
            sharded: None,
            carried: None,
        }
    }

    /// The distributed optimizer over the data-parallel group `dp` (plain [`AdamW::new`]
    /// when `dp` has one rank): this replica keeps the fp32 master and moments of its shard
    /// of every parameter only.
    pub fn new_distributed(model: &Gpt, cfg: AdamWConfig, dp: &ProcessGroup) -> AdamW {
        Self::distributed_with_extra(model, &[], cfg, dp)
    }

    /// [`AdamW::new_distributed`] with [`AdamW::with_extra`]'s extra parameters.
    pub fn distributed_with_extra(
        model: &Gpt,
        extra: &[NamedParam],
        cfg: AdamWConfig,
        dp: &ProcessGroup,
    ) -> AdamW {
        let mut opt = AdamW::with_extra(model, extra, cfg);
        let (w, d) = (i64::from(dp.world()), i64::from(dp.rank()));
        if w == 1 {
            return opt;
        }
        let mut lens = Vec::with_capacity(opt.slots.len());
        tch::no_grad(|| {
            for s in &mut opt.slots {
                let len = (s.param.numel() as i64 + w - 1) / w;
                let shard = padded_rows(&s.param.detach().to_kind(Kind::Float), w, len)
                    .get(d)
                    .copy();
                s.exp_avg = shard.zeros_like();
                s.exp_avg_sq = shard.zeros_like();
                s.master = shard;
                lens.push(len);
            }
        });
        let mut buckets = Vec::new();
        let mut start = 0;
        while start < opt.slots.len() {
            let (kind, device) = (
                opt.slots[start].param.kind(),
                opt.slots[start].param.device(),
            );
            let mut end = start;
            let mut bytes = 0usize;
            while end < opt.slots.len()
                && opt.slots[end].param.kind() == kind
                && opt.slots[end].param.device() == device
                && (end == start || bytes < DP_BUCKET_BYTES)
            {
                bytes += lens[end] as usize * 4 * w as usize;
                end += 1;
            }
            buckets.push(start..end);
            start = end;
        }
        opt.sharded = Some(Sharded {
            dp: dp.clone(),
            grads: lens.iter().map(|_| None).collect(),
            lens,
            buckets,
        });
        opt
    }

    /// The optimizer of one stage of a pipeline `pp`: the gradient norm covers every stage.
    pub fn in_pipeline(self, pp: &ProcessGroup) -> AdamW {
        AdamW {
            pipeline: pp.clone(),
            ..self
        }
    }

    /// Whether masters and moments are sharded over data-parallel replicas.
    pub fn is_distributed(&self) -> bool {
        self.sharded.is_some()
    }

    /// Every slot's full fp32 master weights (the distributed optimizer gathers its shards:
    /// every replica must call it).
    ///
    /// # Errors
    /// Collective errors.
    pub fn full_masters(&self) -> Result<Vec<Tensor>, Error> {
        let Some(sh) = &self.sharded else {
            return Ok(self
                .slots
                .iter()
                .map(|s| s.master.shallow_clone())
                .collect());
        };
        let mut out = Vec::with_capacity(self.slots.len());
        for b in &sh.buckets {
            let full = gather_bucket(sh, &self.slots, b.clone())?;
            out.extend(full);
        }
        Ok(out)
    }

    /// Writes the gathered shards into the parameters (after a step or a restore).
    fn gather_params(&mut self) -> Result<(), Error> {
        let Some(sh) = &self.sharded else {
            return Ok(());
        };
        for b in &sh.buckets {
            let full = gather_bucket(sh, &self.slots, b.clone())?;
            tch::no_grad(|| {
                for (s, f) in self.slots[b.clone()].iter_mut().zip(full) {
                    s.param.copy_(&f);
                }
            });
        }
        Ok(())
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            s.param.zero_grad();
        }
    }

    /// Multiplies every gradient by `f` (gradient accumulation: the mean over micro-batches).
    pub fn scale_grads(&mut self, f: f64) {
        if let Some(sh) = &mut self.sharded {
            if sh.grads.iter().any(Option::is_some) {
                tch::no_grad(|| {
                    for g in sh.grads.iter_mut().flatten() {
                        let _ = g.g_mul_scalar_(f);
                    }
                });
                return;
            }
        }
        tch::no_grad(|| {
            for s in &self.slots {
                let mut g = s.param.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(f);
                }
            }
        });
    }

    /// [`AdamW::average_grads`], also averaging `value` (a logged loss) over `dp`: it rides
    /// in the last fp32 bucket's all-reduce, so a step needs no collective of its own for it.
    ///
    /// # Errors
    /// Collective errors.
    pub fn average_grads_and(&mut self, dp: &ProcessGroup, value: f64) -> Result<f64, Error> {
        if dp.world() == 1 {
            return Ok(value);
        }
        let mut v = Some(value);
        self.average(dp, &mut v)?;
        match v {
            // not carried (distributed optimizer, or no fp32 bucket): its own all-reduce
            Some(x) => Ok(dp.sum_f64(x)? / f64::from(dp.world())),
            None => Ok(self.carried.take().unwrap_or(value)),
        }
    }

    /// Averages every gradient over the data-parallel group `dp`: consecutive gradients of
    /// one type and device are flattened into buckets of about [`DP_BUCKET_BYTES`], each
    /// all-reduced once (few large collectives instead of one per parameter).
    ///
    /// # Errors
    /// Collective errors.
    pub fn average_grads(&mut self, dp: &ProcessGroup) -> Result<(), Error> {
        self.average(dp, &mut None)
    }

    fn average(&mut self, dp: &ProcessGroup, value: &mut Option<f64>) -> Result<(), Error> {
        if dp.world() == 1 {
            return Ok(());
        }
        if let Some(sh) = &mut self.sharded {
            // reduce-scatter: row r of each padded [dp, len] gradient goes to replica r
            let w = i64::from(sh.dp.world());
            for b in sh.buckets.clone() {
                let total: i64 = sh.lens[b.clone()].iter().sum();
                let shard = tch::no_grad(|| -> Result<Tensor, Error> {
                    let rows: Vec<Tensor> = b
                        .clone()
                        .map(|i| {
                            let p = &self.slots[i].param;
                            let g = p.grad();
                            let g = if g.defined() { g } else { p.zeros_like() };
                            padded_rows(&g.to_kind(Kind::Float), w, sh.lens[i])
                        })
                        .collect();
                    let buf = Tensor::cat(&rows, 1);
                    Ok(sh.dp.reduce_scatter(&buf, parallel::ReduceOp::Avg)?)
                })?;
                debug_assert_eq!(shard.numel() as i64, total);
                let mut off = 0;
                for i in b {
                    sh.grads[i] = Some(shard.narrow(0, off, sh.lens[i]));
                    off += sh.lens[i];
                }
            }
            return Ok(());
        }
        let grads: Vec<Tensor> = self
            .slots
            .iter()
            .map(|s| s.param.grad())
            .filter(Tensor::defined)
            .collect();
        let mut i = 0;
        while i < grads.len() {
            let (kind, device) = (grads[i].kind(), grads[i].device());
            let mut j = i;
            let mut bytes = 0usize;
            while j < grads.len()
                && grads[j].kind() == kind
                && grads[j].device() == device
                && (j == i || bytes < DP_BUCKET_BYTES)
            {
                bytes += grads[j].numel() * kind.elt_size_in_bytes();
                j += 1;
            }
            let bucket = &grads[i..j];
            // the last fp32 bucket carries the value as one more element
            let carry = if j == grads.len() && kind == Kind::Float {
                value.take()
            } else {
                None
            };
            let carried = tch::no_grad(|| -> Result<Option<f64>, Error> {
                let mut views: Vec<Tensor> = bucket.iter().map(|g| g.reshape([-1])).collect();
                if let Some(x) = carry {
                    views.push(Tensor::from_slice(&[x as f32]).to_device(device));
                }
                let mut flat = Tensor::cat(&views, 0);
                dp.all_reduce(&mut flat, parallel::ReduceOp::Avg)?;
                let mut off = 0i64;
                for g in bucket {
                    let n = g.numel() as i64;
                    let mut g = g.shallow_clone();
                    g.copy_(&flat.narrow(0, off, n).view_as(&g));
                    off += n;
                }
                Ok(carry.map(|_| flat.double_value(&[off])))
            })?;
            if carried.is_some() {
                self.carried = carried;
            }
            i = j;
        }
        Ok(())
    }

    /// The L2 norm of all gradients over all ranks (split shards summed over ranks,
    /// replicated ones counted once).
    ///
    /// # Errors
    /// Collective errors.
    pub fn grad_norm(&self) -> Result<f64, Error> {
        let world = f64::from(self.pg.world());
        let mut sq = Tensor::zeros([], (Kind::Double, tch::Device::Cpu));
        tch::no_grad(|| {
            for (i, s) in self.slots.iter().enumerate() {
                let g = match &self.sharded {
                    Some(sh) => match &sh.grads[i] {
                        Some(g) => g.shallow_clone(),
                        None => continue,
                    },
                    None => s.param.grad(),
                };
                if !g.defined() || !s.in_norm {
                    continue;
                }
                let part = g
                    .to_kind(Kind::Float)
                    .square()
                    .sum(Kind::Double)
                    .to_device(tch::Device::Cpu);
                // replicated: identical on every rank, so each contributes its share
                let share = if s.rule == Rule::Replicated {
                    world
                } else {
                    1.0
                };
                sq += part / share;
            }
        });
        let mut local = sq.double_value(&[]);
        if let Some(sh) = &self.sharded {
            // each replica holds a disjoint shard of every gradient
            local = sh.dp.sum_f64(local)?;
        }
        let total = self.pipeline.sum_f64(self.pg.sum_f64(local)?)?;
        Ok(total.max(0.0).sqrt())
    }

    /// Clips to `max_norm` (Megatron: scale by `max_norm / (norm + 1e-6)` when below 1) and
    /// returns the norm before clipping.
    ///
    /// # Errors
    /// Collective errors; [`Error::NonFinite`].
    pub fn clip(&mut self, max_norm: Option<f64>) -> Result<f64, Error> {
        let norm = self.grad_norm()?;
        if !norm.is_finite() {
            return Err(Error::NonFinite(norm));
        }
        if let Some(m) = max_norm.filter(|m| *m > 0.0) {
            let c = m / (norm + 1e-6);
            if c < 1.0 {
                self.scale_grads(c);
            }
        }
        Ok(norm)
    }

    /// One AdamW update at learning rate `lr` (torch.optim.AdamW's arithmetic); the
    /// distributed optimizer updates its shards and gathers them into the parameters.
    ///
    /// # Errors
    /// Collective errors (distributed optimizer).
    pub fn step(&mut self, lr: f64) -> Result<(), Error> {
        self.step += 1;
        let (b1, b2) = self.cfg.betas;
        let t = self.step as i32;
        let bc1 = 1.0 - b1.powi(t);
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let step_size = lr / bc1;
        let mut shard_grads = self
            .sharded
            .as_mut()
            .map(|sh| std::mem::take(&mut sh.grads));
        tch::no_grad(|| {
            for (i, s) in self.slots.iter_mut().enumerate() {
                let g = match shard_grads.as_mut() {
                    Some(gs) => match gs.get_mut(i).and_then(Option::take) {
                        Some(g) => g,
                        None => continue,
                    },
                    None => s.param.grad(),
                };
                if !g.defined() {
                    continue;
                }
                let g = if g.kind() == Kind::Float {
                    g
                } else {
                    g.to_kind(Kind::Float)
                };
                if s.decay && self.cfg.weight_decay != 0.0 {
                    let _ = s.master.g_mul_scalar_(1.0 - lr * self.cfg.weight_decay);
                }
                let _ = s.exp_avg.lerp_(&g, 1.0 - b1);
                let _ = s.exp_avg_sq.g_mul_scalar_(b2);
                let _ = s.exp_avg_sq.addcmul_(&g, &(&g * (1.0 - b2)));
                let denom = (s.exp_avg_sq.sqrt() / bc2_sqrt) + self.cfg.eps;
                let _ = s.master.addcdiv_(&(&s.exp_avg * (-step_size)), &denom);
                if shard_grads.is_none() && s.param.kind() != Kind::Float {
                    s.param.copy_(&s.master);
                }
            }
        });
        if let Some(sh) = self.sharded.as_mut() {
            sh.grads = sh.lens.iter().map(|_| None).collect();
        }
        self.gather_params()
    }

    /// Named state tensors for a checkpoint: `master.<name>`, `exp_avg.<name>`,
    /// `exp_avg_sq.<name>`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::with_capacity(self.slots.len() * 3);
        for s in &self.slots {
            v.push((format!("master.{}", s.name), s.master.shallow_clone()));
            v.push((format!("exp_avg.{}", s.name), s.exp_avg.shallow_clone()));
            v.push((
                format!("exp_avg_sq.{}", s.name),
                s.exp_avg_sq.shallow_clone(),
            ));
        }
        v
    }

    /// Restores the state tensors of a checkpoint and the step count (weights included). Each
    /// tensor is whole: shaped like its parameter, or flattened and zero-padded (the shards of
    /// a distributed optimizer concatenated, see [`super::state::load_latest`]); this
    /// optimizer cuts its own layout from it, so a checkpoint of either optimizer at any DP
    /// size restores into either at this one. `own_shards`: the tensors are already this
    /// rank's shards (a distributed optimizer resuming at the same DP size).
    ///
    /// # Errors
    /// [`Error::State`] for a missing entry or a size that does not fit the parameter.
    pub fn load_state(
        &mut self,
        named: &[(String, Tensor)],
        step: u64,
        own_shards: bool,
    ) -> Result<(), Error> {
        // own shards have the masters' shape: cut nothing
        let layout = self
            .sharded
            .as_ref()
            .filter(|_| !own_shards)
            .map(|sh| (i64::from(sh.dp.world()), i64::from(sh.dp.rank())));
        for (i, s) in self.slots.iter_mut().enumerate() {
            let numel = s.param.numel() as i64;
            let len = self.sharded.as_ref().map(|sh| sh.lens[i]);
            let find = |k: String| -> Result<Tensor, Error> {
                let t = named
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, t)| t)
                    .ok_or_else(|| Error::State {
                        name: s.name.clone(),
                        why: format!("{k} missing from the checkpoint"),
                    })?;
                if own_shards {
                    if t.size() != s.master.size() {
                        return Err(Error::State {
                            name: s.name.clone(),
                            why: format!(
                                "{k}: shard {:?}, this rank's is {:?}",
                                t.size(),
                                s.master.size()
                            ),
                        });
                    }
                    return Ok(t.to_kind(Kind::Float));
                }
                let shaped_wrong = t.dim() > 1 && t.size() != s.param.size();
                if shaped_wrong || (t.numel() as i64) < numel {
                    return Err(Error::State {
                        name: s.name.clone(),
                        why: format!("{k}: shape {:?}, model has {:?}", t.size(), s.param.size()),
                    });
                }
                let whole = t.to_kind(Kind::Float).reshape([-1]).narrow(0, 0, numel);
                Ok(match (layout, len) {
                    (Some((w, d)), Some(len)) => padded_rows(&whole, w, len).get(d),
                    _ => whole.view_as(&s.param),
                })
            };
            let m = find(format!("master.{}", s.name))?;
            let a = find(format!("exp_avg.{}", s.name))?;
            let b = find(format!("exp_avg_sq.{}", s.name))?;
            let sharded = layout.is_some() || own_shards;
            tch::no_grad(|| {
                s.master.copy_(&m);
                s.exp_avg.copy_(&a);
                s.exp_avg_sq.copy_(&b);
                if !sharded && s.param.kind() != Kind::Float {
                    s.param.copy_(&s.master);
                }
            });
        }
        self.step = step;
        self.gather_params()
    }
}

/// `t` flattened, zero-padded to `rows × len` elements, as `[rows, len]`.
fn padded_rows(t: &Tensor, rows: i64, len: i64) -> Tensor {
    let flat = t.reshape([-1]);
    let pad = rows * len - flat.numel() as i64;
    let flat = if pad > 0 {
        Tensor::cat(&[flat, t.new_zeros([pad], (t.kind(), t.device()))], 0)
    } else {
        flat
    };
    flat.view([rows, len])
}

/// The full fp32 masters of the slots in `range`: every replica's shards gathered in one
/// collective, cut back to each parameter's shape.
fn gather_bucket(
    sh: &Sharded,
    slots: &[Slot],
    range: std::ops::Range<usize>,
) -> Result<Vec<Tensor>, Error> {
    let w = i64::from(sh.dp.world());
    let total: i64 = sh.lens[range.clone()].iter().sum();
    let local = Tensor::cat(
        &slots[range.clone()]
            .iter()
            .map(|s| s.master.shallow_clone())
            .collect::<Vec<_>>(),
        0,
    );
    let all = sh.dp.all_gather_flat(&local)?.view([w, total]);
    let mut out = Vec::new();
    let mut off = 0;
    for i in range {
        let p = &slots[i].param;
        let n = p.numel() as i64;
        let full = all
            .narrow(1, off, sh.lens[i])
            .reshape([-1])
            .narrow(0, 0, n)
            .view_as(p);
        out.push(full);
        off += sh.lens[i];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::model::InitFrom;
    use crate::distill::spec::GptSpec;
    use crate::model::config::ModelConfig;
    use tch::Device;

    fn tiny() -> Gpt {
        let cfg = ModelConfig::parse(
            "num_layers: 1\nhidden_size: 8\nffn_hidden_size: 16\nnum_attention_heads: 2\n\
             normalization: rmsnorm\nactivation: fast-swiglu\nbias: false\nposition_embedding_type: rope\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let spec = GptSpec::from_config(&cfg, 1, 16).unwrap_or_else(|e| panic!("{e}"));
        let pg = ProcessGroup::single();
        Gpt::new(
            spec,
            &InitFrom::Random { seed: 3 },
            &pg,
            Kind::Float,
            Device::Cpu,
            true,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn adamw_matches_the_reference_arithmetic() {
        let m = tiny();
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            betas: (0.9, 0.95),
            eps: 1e-8,
        };
        let mut opt = AdamW::new(&m, cfg);
        let tokens = Tensor::from_slice(&[1i64, 5, 7, 2]).view([1, 4]);
        let before: Vec<Tensor> = opt.slots.iter().map(|s| s.master.copy()).collect();
        let l = m
            .forward(&tokens)
            .unwrap_or_else(|e| panic!("{e}"))
            .square()
            .mean(Kind::Float);
        l.backward();
        let grads: Vec<Tensor> = opt.slots.iter().map(|s| s.param.grad().copy()).collect();
        opt.step(1e-2).unwrap_or_else(|e| panic!("{e}"));
        for ((s, p0), g) in opt.slots.iter().zip(&before).zip(&grads) {
            // one step from zero moments: p·(1 - lr·wd) - lr·g/(|g| + eps)
            let wd = if s.decay { 0.1 } else { 0.0 };
            let want = p0 * (1.0 - 1e-2 * wd) - g / (g.abs() + 1e-8) * 1e-2;
            let d = (&s.master - want).abs().max().double_value(&[]);
            assert!(d < 1e-6, "{}: {d}", s.name);
        }
        // norms are 1-D: never decayed
        assert!(opt.slots.iter().all(|s| s.decay == (s.param.dim() >= 2)));
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let m = tiny();
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
        };
        let mut opt = AdamW::new(&m, cfg);
        let tokens = Tensor::from_slice(&[1i64, 2, 3]).view([1, 3]);
        let l = m
            .forward(&tokens)
            .unwrap_or_else(|e| panic!("{e}"))
            .sum(Kind::Float);
        l.backward();
        let n0 = opt.clip(Some(1e-3)).unwrap_or_else(|e| panic!("{e}"));
        assert!(n0 > 1e-3);
        let n1 = opt.grad_norm().unwrap_or_else(|e| panic!("{e}"));
        assert!((n1 - 1e-3).abs() < 1e-6, "{n1}");
    }

    #[test]
    fn refuses_state_that_does_not_fit() {
        let m = tiny();
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
        };
        let mut opt = AdamW::new(&m, cfg);
        assert!(matches!(
            opt.load_state(&[], 3, false),
            Err(Error::State { .. })
        ));
        let mut st = opt.state_tensors();
        st[0].1 = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        assert!(matches!(
            opt.load_state(&st, 3, false),
            Err(Error::State { .. })
        ));
    }
}
