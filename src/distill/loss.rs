//! Vocab-parallel knowledge-distillation losses over logits sharded on the vocab dim across
//! TP ranks, and the sequence-chunked driver that keeps fp32 logits small.
//!
//! Every loss is a per-token sum over the (padded) vocabulary, then a masked mean over valid
//! tokens: `Σ_tokens loss·mask / Σ mask`. Under TP each rank sums its vocab slice; the scalar
//! is summed across ranks with [`ProcessGroup::reduce_from_tp`] (identity backward: the total
//! loss is the sum of the ranks' terms), and the softmax normaliser is all-reduced with
//! [`ProcessGroup::all_reduce_autograd`] so each rank's gradient sees every rank's terms.
//! This is NeMo's `LogitsKLLoss` (nemo-format.md §5.2): fp32, logits / temperature, no T²
//! factor, KL(teacher ‖ student) by default.

use tch::{Kind, Tensor};

use super::hidden_loss::{self, Pair, Projection};
use super::model::{self, Gpt, Recompute};
use super::parallel::{self, ProcessGroup};

/// Errors of the losses.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A collective failed.
    #[error(transparent)]
    Parallel(#[from] parallel::Error),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] model::Error),
    /// Inputs or options that do not fit.
    #[error("kd loss: {0}")]
    Input(String),
    /// libtorch failed during a backward pass (e.g. a collective inside it).
    #[error("kd loss: backward: {0}")]
    Backward(String),
}

/// Which divergence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossKind {
    /// KL(teacher ‖ student): NeMo's `LogitsKLLoss` (`reverse=False`).
    ForwardKl,
    /// KL(student ‖ teacher): `LogitsKLLoss(reverse=True)`.
    ReverseKl,
    /// Generalised Jensen-Shannon with mixture `m = β·p_t + (1-β)·p_s`:
    /// `β·KL(p_t ‖ m) + (1-β)·KL(p_s ‖ m)`, `0 < β < 1` (β = 0.5 is the symmetric JSD).
    Jsd {
        /// Mixture weight of the teacher.
        beta: f64,
    },
    /// KL(teacher_k ‖ student): the teacher distribution restricted to its `k` largest logits
    /// (every logit ≥ the k-th largest, so ties may add a few) and renormalised there; the
    /// student keeps its full-vocabulary log-probabilities.
    TopK {
        /// Teacher tokens kept per position.
        k: i64,
    },
    /// ModelOpt's `TopKLogitsKLLoss` (`logit_kl_topk`): the teacher's `k` largest logits over
    /// the whole vocabulary (exactly `k`, as `torch.topk` picks them), the student's logits at
    /// the same ids, and KL(teacher ‖ student) between the two softmaxes over those `k`
    /// entries only (both renormalised there, unlike [`LossKind::TopK`]).
    ModeloptTopK {
        /// Teacher tokens kept per position.
        k: i64,
    },
}

/// A configured distillation loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdLoss {
    /// The divergence.
    pub kind: LossKind,
    /// Logits are divided by it.
    pub temperature: f64,
    /// Multiply the loss by T² (the HF-style recipes' convention; NeMo and ModelOpt's
    /// Megatron losses do not).
    pub temperature_squared: bool,
    /// ModelOpt's `skip_lm_loss: false` with this `kd_loss_scale`: the student's LM loss is
    /// added, the KD loss rescaled to its magnitude (`LogitsAndIntermediatesLossBalancer`).
    pub lm_loss_scale: Option<f64>,
}

/// The terms of a micro-batch's loss (masked token means, summed over TP ranks).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Parts {
    /// What is minimised: the logits loss, or with the LM loss `lm + scale·f·logits` where
    /// `f = lm / logits` (detached) when both are positive.
    pub total: f64,
    /// The logits KD loss.
    pub logits: f64,
    /// The student's LM cross-entropy, when it is part of the loss.
    pub lm: Option<f64>,
    /// The mean of the intermediate-layer losses, when there are some.
    pub intermediate: Option<f64>,
}

impl std::ops::AddAssign for Parts {
    fn add_assign(&mut self, o: Parts) {
        let add = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
        };
        self.total += o.total;
        self.logits += o.logits;
        self.lm = add(self.lm, o.lm);
        self.intermediate = add(self.intermediate, o.intermediate);
    }
}

/// A teacher's top-k logits per token, from a teacher cache or [`global_topk`]: raw logits
/// (largest first) and their vocabulary ids, `[.., k]` each (f32, i64).
#[derive(Debug)]
pub struct TopK {
    /// The logits.
    pub values: Tensor,
    /// Their ids in the whole (padded) vocabulary.
    pub ids: Tensor,
}

/// Where the teacher's side of the logits loss comes from.
#[derive(Debug, Clone, Copy)]
pub enum Teacher<'a> {
    /// A live teacher, run under no_grad.
    Model(&'a Gpt),
    /// Top-k logits read from a teacher cache (ModelOpt's top-k loss only).
    Cached(&'a TopK),
}

/// The teacher's side of a micro-batch, ready for the loss.
#[derive(Debug)]
pub enum TeacherOut<'a> {
    /// A live teacher's final hidden states; its output layer runs chunk by chunk.
    Hidden(&'a Gpt, Tensor),
    /// Cached top-k logits `[b, s, k]`.
    Cached(&'a TopK),
}

impl<'a> Teacher<'a> {
    /// The teacher's side for `tokens` (the live teacher's forward, under no_grad).
    ///
    /// # Errors
    /// The teacher's forward.
    pub fn run(self, tokens: &Tensor) -> Result<TeacherOut<'a>, Error> {
        Ok(match self {
            Teacher::Model(m) => TeacherOut::Hidden(m, tch::no_grad(|| m.hidden(tokens))?),
            Teacher::Cached(c) => TeacherOut::Cached(c),
        })
    }
}

/// One sequence chunk of the teacher's side.
enum TeacherChunk {
    Logits(Tensor),
    TopK(Tensor, Tensor),
}

impl TeacherOut<'_> {
    fn chunk(&self, s0: i64, len: i64) -> Result<TeacherChunk, Error> {
        Ok(match self {
            TeacherOut::Hidden(m, h) => TeacherChunk::Logits(tch::no_grad(|| {
                m.logits_from_hidden(&h.narrow(1, s0, len).to_device(m.device()))
            })?),
            TeacherOut::Cached(c) => {
                TeacherChunk::TopK(c.values.narrow(1, s0, len), c.ids.narrow(1, s0, len))
            }
        })
    }
}

/// The weights ModelOpt's `LogitsAndIntermediatesLossBalancer` gives each term (its dynamic
/// factors are detached, so they are constants of the step), and the total's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Balance {
    /// Weight of the logits loss.
    pub logits: f64,
    /// Weight of the mean intermediate loss.
    pub intermediate: f64,
    /// Weight of the LM loss.
    pub lm: f64,
    /// The balanced total.
    pub total: f64,
}

/// The balancer on the terms' values: the intermediate mean `i` is rescaled to the logits
/// loss `l` (`× l/i` when `i > 0`); without the LM loss the total is their sum; with it
/// (`lm = Some((value, kd_loss_scale))`) the KD sum is rescaled to the LM loss
/// (`× lm/kd` when both are positive) and the total is `lm + kd_loss_scale · kd`.
pub fn balance(l: f64, i: Option<f64>, lm: Option<(f64, f64)>) -> Balance {
    let r = match i {
        Some(i) if i > 0.0 => l / i,
        _ => 0.0,
    };
    let kd = l + r * i.unwrap_or(0.0);
    match lm {
        None => Balance {
            logits: 1.0,
            intermediate: r,
            lm: 0.0,
            total: kd,
        },
        Some((lm, scale)) => {
            let f = if kd > 0.0 && lm > 0.0 { lm / kd } else { 1.0 };
            Balance {
                logits: scale * f,
                intermediate: scale * f * r,
                lm: 1.0,
                total: lm + scale * f * kd,
            }
        }
    }
}

impl KdLoss {
    /// Checks the options.
    ///
    /// # Errors
    /// [`Error::Input`] for a non-positive temperature, β outside (0, 1) or k < 1.
    pub fn new(kind: LossKind, temperature: f64) -> Result<KdLoss, Error> {
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(Error::Input(format!(
                "temperature {temperature} must be positive"
            )));
        }
        match kind {
            LossKind::Jsd { beta } if !(beta > 0.0 && beta < 1.0) => {
                return Err(Error::Input(format!("jsd beta {beta} must be in (0, 1)")));
            }
            LossKind::TopK { k } | LossKind::ModeloptTopK { k } if k < 1 => {
                return Err(Error::Input(format!("top-k k={k} must be at least 1")));
            }
            _ => {}
        }
        Ok(KdLoss {
            kind,
            temperature,
            temperature_squared: false,
            lm_loss_scale: None,
        })
    }

    /// The same loss plus the student's LM loss balanced as ModelOpt does (`Some(kd_loss_scale)`),
    /// or the KD loss alone (`None`, ModelOpt's `skip_lm_loss: true`).
    pub fn with_lm_loss(self, kd_loss_scale: Option<f64>) -> KdLoss {
        KdLoss {
            lm_loss_scale: kd_loss_scale,
            ..self
        }
    }

    /// The same loss times T² when `on`.
    pub fn with_temperature_squared(self, on: bool) -> KdLoss {
        KdLoss {
            temperature_squared: on,
            ..self
        }
    }

    /// Per-token partial loss `[..]` of this rank's vocab slice (fp32): summed over ranks it
    /// is the per-token divergence. `student` carries the graph; `teacher` is detached.
    ///
    /// # Errors
    /// Shape mismatch; collective errors.
    pub fn token_partials(
        &self,
        pg: &ProcessGroup,
        student: &Tensor,
        teacher: &Tensor,
    ) -> Result<Tensor, Error> {
        if student.size() != teacher.size() {
            return Err(Error::Input(format!(
                "student logits {:?} and teacher logits {:?} differ (same padded vocab and TP needed)",
                student.size(),
                teacher.size()
            )));
        }
        let s = self.scaled(student);
        let t = self.scaled(&teacher.detach());
        if let LossKind::ModeloptTopK { k } = self.kind {
            let (tv, ids) = global_topk(pg, &t, k)?;
            return Ok(self.t2(topk_kl_at(pg, &s, &tv, &ids)?));
        }
        let ls = log_softmax_tp(pg, &s)?;
        let per_token = match self.kind {
            LossKind::ForwardKl => {
                let lt = log_softmax_tp(pg, &t)?;
                (lt.exp() * (&lt - &ls)).sum_dim_intlist(-1, false, Kind::Float)
            }
            LossKind::ReverseKl => {
                let lt = log_softmax_tp(pg, &t)?;
                (ls.exp() * (&ls - &lt)).sum_dim_intlist(-1, false, Kind::Float)
            }
            LossKind::Jsd { beta } => {
                let lt = log_softmax_tp(pg, &t)?;
                let lm = Tensor::stack(&[&ls + (1.0 - beta).ln(), &lt + beta.ln()], 0)
                    .logsumexp([0], false);
                let kl_t = (lt.exp() * (&lt - &lm)).sum_dim_intlist(-1, false, Kind::Float);
                let kl_s = (ls.exp() * (&ls - &lm)).sum_dim_intlist(-1, false, Kind::Float);
                kl_t * beta + kl_s * (1.0 - beta)
            }
            LossKind::TopK { k } => {
                let keep = topk_mask(pg, &t, k)?;
                let masked = t.masked_fill(&keep.logical_not(), f64::NEG_INFINITY);
                let lt = log_softmax_tp(pg, &masked)?;
                // outside the top-k p_t = 0: those terms are 0 (not 0·(-inf))
                let term = (lt.exp() * (&lt - &ls)).masked_fill(&keep.logical_not(), 0.0);
                term.sum_dim_intlist(-1, false, Kind::Float)
            }
            LossKind::ModeloptTopK { .. } => unreachable!("returned above"),
        };
        Ok(self.t2(per_token))
    }

    /// [`KdLoss::token_partials`] against a teacher's cached top-k logits (`values`, raw, and
    /// their global `ids`, `[.., k]`): ModelOpt's top-k loss with the teacher's selection
    /// read instead of computed. Only [`LossKind::ModeloptTopK`] with `k` at most the cached.
    ///
    /// # Errors
    /// Another loss kind; shapes that do not fit; collective errors.
    pub fn token_partials_cached(
        &self,
        pg: &ProcessGroup,
        student: &Tensor,
        values: &Tensor,
        ids: &Tensor,
    ) -> Result<Tensor, Error> {
        let LossKind::ModeloptTopK { k } = self.kind else {
            return Err(Error::Input(
                "a teacher cache serves ModelOpt's top-k loss only (logit_kl_topk)".to_string(),
            ));
        };
        let have = *values.size().last().unwrap_or(&0);
        if k > have || values.size() != ids.size() {
            return Err(Error::Input(format!(
                "cached teacher top-k {:?} (ids {:?}) for logit_kl_topk {k}",
                values.size(),
                ids.size()
            )));
        }
        let (tv, ids) = if k < have {
            (values.narrow(-1, 0, k), ids.narrow(-1, 0, k))
        } else {
            (values.shallow_clone(), ids.shallow_clone())
        };
        let s = self.scaled(student);
        let tv = self.scaled(&tv.to_device(s.device()));
        Ok(self.t2(topk_kl_at(pg, &s, &tv, &ids.to_device(s.device()))?))
    }

    /// `x` in fp32, divided by the temperature.
    fn scaled(&self, x: &Tensor) -> Tensor {
        let x = x.to_kind(Kind::Float);
        if self.temperature == 1.0 {
            x
        } else {
            x / self.temperature
        }
    }

    fn t2(&self, x: Tensor) -> Tensor {
        if self.temperature_squared && self.temperature != 1.0 {
            x * (self.temperature * self.temperature)
        } else {
            x
        }
    }

    /// The masked mean over tokens, summed over TP ranks: a differentiable scalar equal on
    /// every rank. `mask` is `[..]` like the logits without the vocab dim (1 = valid).
    ///
    /// # Errors
    /// No valid token; shape mismatch; collective errors.
    pub fn masked_mean(
        &self,
        pg: &ProcessGroup,
        student: &Tensor,
        teacher: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor, Error> {
        self.masked_mean_with(pg, student, teacher, None, mask)
    }

    /// [`KdLoss::masked_mean`] with the student's LM loss balanced in when the loss has one
    /// (`labels`: the next token ids `[..]`): `lm + kd_loss_scale·f·kd`, where
    /// `f = lm / kd` (detached) when both are positive, else 1 (ModelOpt's
    /// `LogitsAndIntermediatesLossBalancer` with `skip_original_loss=False`).
    ///
    /// # Errors
    /// As [`KdLoss::masked_mean`]; the LM loss without labels.
    pub fn masked_mean_with(
        &self,
        pg: &ProcessGroup,
        student: &Tensor,
        teacher: &Tensor,
        labels: Option<&Tensor>,
        mask: &Tensor,
    ) -> Result<Tensor, Error> {
        let n = valid_tokens(mask)?;
        let kd = pg.reduce_from_tp(&(self.masked_sum(pg, student, teacher, mask)? / n))?;
        let Some(scale) = self.lm_loss_scale else {
            return Ok(kd);
        };
        let labels = labels.ok_or_else(|| {
            Error::Input("the LM loss (skip_lm_loss: false) needs the labels".to_string())
        })?;
        let lm = lm_mean(pg, student, labels, mask)?;
        let b = balance(
            kd.double_value(&[]),
            None,
            Some((lm.double_value(&[]), scale)),
        );
        Ok(lm * b.lm + kd * b.logits)
    }

    /// This rank's `Σ partial·mask` (not yet divided nor TP-summed).
    fn masked_sum(
        &self,
        pg: &ProcessGroup,
        student: &Tensor,
        teacher: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor, Error> {
        self.masked_sum_of(
            pg,
            student,
            &TeacherChunk::Logits(teacher.shallow_clone()),
            mask,
        )
    }

    fn masked_sum_of(
        &self,
        pg: &ProcessGroup,
        student: &Tensor,
        teacher: &TeacherChunk,
        mask: &Tensor,
    ) -> Result<Tensor, Error> {
        let per_tok = match teacher {
            TeacherChunk::Logits(t) => self.token_partials(pg, student, t)?,
            TeacherChunk::TopK(v, i) => self.token_partials_cached(pg, student, v, i)?,
        };
        if per_tok.size() != mask.size() {
            return Err(Error::Input(format!(
                "mask {:?} does not match tokens {:?}",
                mask.size(),
                per_tok.size()
            )));
        }
        Ok((per_tok * mask.to_kind(Kind::Float)).sum(Kind::Float))
    }

    /// Forward + backward of the loss over a student and a teacher, `chunk` sequence
    /// positions at a time, so only `[b, chunk, V/TP]` fp32 logits of each model exist at
    /// once (instead of `[b, s, V/TP]`).
    ///
    /// The student's final hidden states are computed once with the graph; a detached leaf
    /// copy feeds the output layer per chunk, each chunk's loss (already divided by the
    /// global valid-token count, so the chunks add up to the exact masked mean) is
    /// back-propagated at once into the output layer and the leaf, and at the end the
    /// accumulated leaf gradient is pushed through the rest of the student. The teacher runs
    /// under no_grad. Gradients accumulate into the student's parameters; returns the loss.
    ///
    /// # Errors
    /// Model, collective or input errors.
    pub fn chunked_backward(
        &self,
        student: &Gpt,
        teacher: &Gpt,
        tokens: &Tensor,
        mask: &Tensor,
        chunk: i64,
    ) -> Result<f64, Error> {
        self.chunked_backward_with(student, teacher, tokens, mask, chunk, Recompute::None)
    }

    /// [`KdLoss::chunked_backward`] with the student's activations kept as `recompute` says
    /// (the result is the same: only the memory held between forward and backward differs).
    ///
    /// # Errors
    /// As [`KdLoss::chunked_backward`].
    pub fn chunked_backward_with(
        &self,
        student: &Gpt,
        teacher: &Gpt,
        tokens: &Tensor,
        mask: &Tensor,
        chunk: i64,
        recompute: Recompute,
    ) -> Result<f64, Error> {
        self.chunked_backward_parts(
            student,
            Teacher::Model(teacher),
            tokens,
            None,
            mask,
            chunk,
            recompute,
        )
        .map(|p| p.total)
    }

    /// [`KdLoss::chunked_backward_parts`] plus intermediate-layer losses (ModelOpt's
    /// `intermediate_layer_pairs`), balanced with the logits loss as ModelOpt does: the pairs'
    /// module outputs are captured in the forward passes, each pair's masked token mean taken
    /// (the student's side through `projection` when given), and their mean back-propagated
    /// with its balancing weight in the same backward pass as the logits' gradient.
    ///
    /// # Errors
    /// As [`KdLoss::chunked_backward_parts`]; [`Error::Input`] with full activation recompute
    /// (the captured outputs would not be kept).
    #[allow(clippy::too_many_arguments)]
    pub fn chunked_backward_full(
        &self,
        student: &Gpt,
        teacher: Teacher<'_>,
        tokens: &Tensor,
        labels: Option<&Tensor>,
        mask: &Tensor,
        chunk: i64,
        recompute: Recompute,
        pairs: &[Pair],
        projection: Option<&Projection>,
    ) -> Result<Parts, Error> {
        if pairs.is_empty() {
            return self
                .chunked_backward_parts(student, teacher, tokens, labels, mask, chunk, recompute);
        }
        if !matches!(recompute, Recompute::None | Recompute::Selective) {
            return Err(Error::Input(
                "intermediate_layer_pairs need activations_checkpoint_granularity null or selective (full recompute does not keep the captured outputs)"
                    .to_string(),
            ));
        }
        let Teacher::Model(teacher) = teacher else {
            return Err(Error::Input(
                "intermediate_layer_pairs need the live teacher (a teacher cache holds logits only)"
                    .to_string(),
            ));
        };
        let n = valid_tokens(mask)?;
        let ssites: Vec<_> = pairs.iter().map(|p| p.student).collect();
        let tsites: Vec<_> = pairs.iter().map(|p| p.teacher).collect();
        let (th, tcaps) = tch::no_grad(|| teacher.hidden_captured(tokens, &tsites))?;
        let (sh, scaps) = student.hidden_captured(tokens, &ssites)?;
        let inter = self.intermediate_mean(pairs, projection, &scaps, &tcaps, mask, n)?;
        let iv = inter.double_value(&[]);
        let th = TeacherOut::Hidden(teacher, th);
        let (parts, g, w) =
            self.balanced_loss_and_grad(student, &th, &sh, labels, mask, chunk, Some(iv))?;
        let mut objective = inter * w;
        if let Some(g) = g {
            objective += (sh * g.detach()).sum(Kind::Float);
        }
        objective
            .f_backward()
            .map_err(|e| Error::Backward(e.to_string()))?;
        Ok(parts)
    }

    /// The mean over `pairs` of each pair's masked token mean (`n` valid tokens), with graph.
    ///
    /// # Errors
    /// Shapes that do not fit (a projection of the wrong size).
    pub fn intermediate_mean(
        &self,
        pairs: &[Pair],
        projection: Option<&Projection>,
        student: &[Tensor],
        teacher: &[Tensor],
        mask: &Tensor,
        n: f64,
    ) -> Result<Tensor, Error> {
        let mut terms = Vec::with_capacity(pairs.len());
        for ((p, s), t) in pairs.iter().zip(student).zip(teacher) {
            let s = match projection {
                Some(pr) => pr.apply(s),
                None => s.shallow_clone(),
            };
            if s.size() != t.size() {
                return Err(Error::Input(format!(
                    "intermediate pair {:?} / {:?}: student {:?} vs teacher {:?} (hidden sizes differ: a projection is needed)",
                    p.student,
                    p.teacher,
                    s.size(),
                    t.size()
                )));
            }
            let mk = mask.to_device(s.device()).to_kind(Kind::Float);
            terms.push((hidden_loss::per_token(p.loss, &s, t) * mk).sum(Kind::Float) / n);
        }
        Ok(Tensor::stack(&terms, 0).sum(Kind::Float) / pairs.len().max(1) as f64)
    }

    /// [`KdLoss::chunked_backward_with`] with the labels the LM loss needs, returning every
    /// term.
    ///
    /// # Errors
    /// As [`KdLoss::loss_and_grad`].
    #[allow(clippy::too_many_arguments)]
    pub fn chunked_backward_parts(
        &self,
        student: &Gpt,
        teacher: Teacher<'_>,
        tokens: &Tensor,
        labels: Option<&Tensor>,
        mask: &Tensor,
        chunk: i64,
        recompute: Recompute,
    ) -> Result<Parts, Error> {
        if chunk < 1 {
            return Err(Error::Input(format!("chunk {chunk} must be at least 1")));
        }
        valid_tokens(mask)?;
        let th = teacher.run(tokens)?;
        let (sh, ck) = match recompute {
            Recompute::None | Recompute::Selective => (student.hidden(tokens)?, None),
            rc => {
                let ck = student.hidden_checkpointed(tokens, rc)?;
                (ck.hidden.shallow_clone(), Some(ck))
            }
        };
        let (parts, g) = self.loss_and_grad(student, &th, &sh, labels, mask, chunk)?;
        if let Some(g) = g {
            match ck {
                Some(ck) => {
                    ck.backward(student, &g)
                        .map_err(|e| Error::Backward(e.to_string()))?;
                }
                None => (sh * g.detach())
                    .sum(Kind::Float)
                    .f_backward()
                    .map_err(|e| Error::Backward(e.to_string()))?,
            }
        }
        Ok(parts)
    }

    /// The loss of final hidden states `student_hidden` (its graph is not used) against the
    /// teacher's, `chunk` positions at a time, back-propagated into the student's output
    /// layer; returns the loss and its gradient with respect to `student_hidden` (what the
    /// rest of the student, or a pipeline's last stage, continues with). `labels` (the next
    /// tokens) are needed when the LM loss is part of it.
    ///
    /// With the LM loss, a first pass under no_grad gives both terms' values, which fix the
    /// balancing factors (ModelOpt detaches them); the second pass back-propagates the
    /// balanced sum chunk by chunk.
    ///
    /// # Errors
    /// As [`KdLoss::chunked_backward`]; [`Error::Input`] for the LM loss without labels.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grad(
        &self,
        student: &Gpt,
        teacher: &TeacherOut<'_>,
        student_hidden: &Tensor,
        labels: Option<&Tensor>,
        mask: &Tensor,
        chunk: i64,
    ) -> Result<(Parts, Option<Tensor>), Error> {
        let (parts, g, _) = self.balanced_loss_and_grad(
            student,
            teacher,
            student_hidden,
            labels,
            mask,
            chunk,
            None,
        )?;
        Ok((parts, g))
    }

    /// [`KdLoss::loss_and_grad`] balanced with intermediate-layer losses whose mean is
    /// `intermediate` (computed by the caller); also returns the weight the caller must give
    /// their gradient ([`balance`]).
    ///
    /// # Errors
    /// As [`KdLoss::loss_and_grad`].
    #[allow(clippy::too_many_arguments)]
    pub fn balanced_loss_and_grad(
        &self,
        student: &Gpt,
        teacher: &TeacherOut<'_>,
        student_hidden: &Tensor,
        labels: Option<&Tensor>,
        mask: &Tensor,
        chunk: i64,
        intermediate: Option<f64>,
    ) -> Result<(Parts, Option<Tensor>, f64), Error> {
        if chunk < 1 {
            return Err(Error::Input(format!("chunk {chunk} must be at least 1")));
        }
        let pg = student.group();
        let n = valid_tokens(mask)?;
        let leaf = student_hidden.detach().set_requires_grad(true);
        let seq = *leaf.size().get(1).ok_or_else(|| {
            Error::Input("hidden states must be [batch, seq, hidden]".to_string())
        })?;
        let mask = mask.to_device(student.device());
        let labels = match (self.lm_loss_scale, labels) {
            (None, _) => None,
            (Some(_), Some(l)) => Some(l.to_device(student.device())),
            (Some(_), None) => {
                return Err(Error::Input(
                    "the LM loss (skip_lm_loss: false) needs the labels".to_string(),
                ))
            }
        };
        let chunks: Vec<(i64, i64)> = (0..seq)
            .step_by(usize::try_from(chunk).unwrap_or(usize::MAX))
            .map(|s0| (s0, chunk.min(seq - s0)))
            .collect();
        // this rank's (KD, LM) masked sums of one chunk, before the TP sum
        let terms = |s0: i64, len: i64| -> Result<(Tensor, Option<Tensor>), Error> {
            let tl = teacher.chunk(s0, len)?;
            let sl = student.logits_from_hidden(&leaf.narrow(1, s0, len))?;
            let mk = mask.narrow(1, s0, len);
            let kd = self.masked_sum_of(pg, &sl, &tl, &mk)?;
            let lm = match &labels {
                Some(l) => Some(
                    (lm_partials(pg, &sl, &l.narrow(1, s0, len))? * mk.to_kind(Kind::Float))
                        .sum(Kind::Float),
                ),
                None => None,
            };
            Ok((kd, lm))
        };
        // the balancing weights: with the LM loss they need both values first; without it
        // the logits loss keeps weight 1 and the intermediate weight follows from its value
        let weights = match self.lm_loss_scale {
            None => None,
            Some(scale) => {
                let (mut kd, mut lm) = (0.0, 0.0);
                tch::no_grad(|| -> Result<(), Error> {
                    for &(s0, len) in &chunks {
                        let (k, l) = terms(s0, len)?;
                        kd += k.double_value(&[]);
                        lm += l.map_or(0.0, |l| l.double_value(&[]));
                    }
                    Ok(())
                })?;
                let (kd, lm) = (pg.sum_f64(kd)? / n, pg.sum_f64(lm)? / n);
                Some((balance(kd, intermediate, Some((lm, scale))), lm))
            }
        };
        let (c_kd, c_lm) = weights.map_or((1.0, 0.0), |(b, _)| (b.logits, b.lm));
        let mut logits = 0.0;
        for &(s0, len) in &chunks {
            let (kd, lm) = terms(s0, len)?;
            let kd = pg.reduce_from_tp(&(kd / n))?;
            logits += kd.double_value(&[]);
            let part = match lm {
                Some(lm) => &kd * c_kd + pg.reduce_from_tp(&(lm / n))? * c_lm,
                None => kd,
            };
            part.f_backward()
                .map_err(|e| Error::Backward(e.to_string()))?;
        }
        let (b, lm) = match weights {
            Some((b, lm)) => (b, Some(lm)),
            None => (balance(logits, intermediate, None), None),
        };
        let parts = Parts {
            total: b.total,
            logits,
            lm,
            intermediate,
        };
        let g = leaf.grad();
        Ok((parts, g.defined().then_some(g), b.intermediate))
    }
}

/// The student's LM cross-entropy of logits sharded on the last dim: the masked token mean of
/// `-log p(label)` (Megatron's vocab-parallel cross entropy), equal on every TP rank.
///
/// # Errors
/// No valid token; collective errors.
pub fn lm_mean(
    pg: &ProcessGroup,
    logits: &Tensor,
    labels: &Tensor,
    mask: &Tensor,
) -> Result<Tensor, Error> {
    let n = valid_tokens(mask)?;
    let lm = (lm_partials(pg, logits, labels)? * mask.to_kind(Kind::Float)).sum(Kind::Float);
    Ok(pg.reduce_from_tp(&(lm / n))?)
}

/// Per-token partial LM cross-entropy `-log p(label)` of logits sharded on the last dim:
/// the rank holding the label's row has it, the others 0 (Megatron's vocab-parallel cross
/// entropy; the softmax normaliser is all-reduced with gradient).
fn lm_partials(pg: &ProcessGroup, logits: &Tensor, labels: &Tensor) -> Result<Tensor, Error> {
    let vl = *logits.size().last().unwrap_or(&0);
    let start = i64::from(pg.rank()) * vl;
    let ls = log_softmax_tp(pg, &logits.to_kind(Kind::Float))?;
    let inside = labels.ge(start).logical_and(&labels.lt(start + vl));
    let idx = (labels - start).masked_fill(&inside.logical_not(), 0);
    let picked = ls
        .gather(-1, &idx.unsqueeze(-1), false)
        .squeeze_dim(-1)
        .masked_fill(&inside.logical_not(), 0.0);
    Ok(-picked)
}

fn valid_tokens(mask: &Tensor) -> Result<f64, Error> {
    let n = mask
        .to_kind(Kind::Double)
        .sum(Kind::Double)
        .double_value(&[]);
    if n > 0.0 {
        Ok(n)
    } else {
        Err(Error::Input("loss mask has no valid token".to_string()))
    }
}

/// `log_softmax` over the full vocabulary of logits sharded on the last dim: per token
/// `x - M - log Z` with `M` the (detached) all-reduced max and `Z = Σ_ranks Σ exp(x - M)`
/// all-reduced with gradient (NeMo `LogitsKLLoss` TP path).
pub fn log_softmax_tp(pg: &ProcessGroup, x: &Tensor) -> Result<Tensor, Error> {
    if pg.world() == 1 {
        return Ok(x.log_softmax(-1, Kind::Float));
    }
    let m = pg.max_no_grad(&x.amax([-1], true))?;
    let z = pg.all_reduce_autograd(&(x - &m).exp().sum_dim_intlist(-1, true, Kind::Float))?;
    Ok(x - m - z.log())
}

/// The teacher's `k` largest logits over the whole vocabulary of logits sharded on the last
/// dim, and their global ids (`[.., k]` each, largest first), equal on every rank: each rank's
/// own `k` candidates, then the global `k` among them in rank order (ModelOpt's
/// `TopKLogitsKLLoss` selection; what a teacher cache stores).
///
/// # Errors
/// `k` larger than the vocabulary; collective errors.
pub fn global_topk(pg: &ProcessGroup, t: &Tensor, k: i64) -> Result<(Tensor, Tensor), Error> {
    let v_local = *t.size().last().unwrap_or(&0);
    let tp = i64::from(pg.world());
    if k > v_local * tp {
        return Err(Error::Input(format!(
            "top-k k={k} exceeds the vocabulary {}",
            v_local * tp
        )));
    }
    let (tv, idx) = t.topk(k.min(v_local), -1, true, true);
    if tp == 1 {
        return Ok((tv, idx));
    }
    let ids = idx + i64::from(pg.rank()) * v_local;
    let all_t = Tensor::cat(&pg.all_gather(&tv.contiguous())?, -1);
    let all_i = Tensor::cat(&pg.all_gather(&ids.contiguous())?, -1);
    let (gv, g) = all_t.topk(k, -1, true, true);
    Ok((gv, all_i.gather(-1, &g, false)))
}

/// Per-token ModelOpt top-k KL of temperature-scaled student logits sharded on the last dim
/// against the teacher's top-k `tv` (scaled) at global `ids`: KL between the two softmaxes
/// over those `k` entries. Every rank computes the whole per-token loss from the student's
/// candidates (each rank contributes those in its slice, summed over TP with identity
/// backward); the returned partial has value `L / TP` (the ranks' sum is `L`) and gradient
/// `dL`, so each rank's own logits get the full gradient.
fn topk_kl_at(pg: &ProcessGroup, s: &Tensor, tv: &Tensor, ids: &Tensor) -> Result<Tensor, Error> {
    let v_local = *s.size().last().unwrap_or(&0);
    let tp = i64::from(pg.world());
    let sv = if tp > 1 {
        let local = ids - i64::from(pg.rank()) * v_local;
        let mine = local.ge(0).logical_and(&local.lt(v_local));
        let picked = s
            .gather(-1, &local.clamp(0, (v_local - 1).max(0)), false)
            .masked_fill(&mine.logical_not(), 0.0);
        pg.reduce_from_tp(&picked)?
    } else {
        s.gather(-1, ids, false)
    };
    let ls = sv.log_softmax(-1, Kind::Float);
    let lt = tv.log_softmax(-1, Kind::Float);
    let per_token = (lt.exp() * (&lt - &ls)).sum_dim_intlist(-1, false, Kind::Float);
    Ok(if tp > 1 {
        &per_token - per_token.detach() * (1.0 - 1.0 / tp as f64)
    } else {
        per_token
    })
}

/// Where the teacher logit is among the `k` largest of the full vocabulary (≥ the k-th
/// largest), for logits sharded on the last dim.
fn topk_mask(pg: &ProcessGroup, t: &Tensor, k: i64) -> Result<Tensor, Error> {
    let v_local = *t.size().last().unwrap_or(&0);
    let total = v_local * i64::from(pg.world());
    if k > total {
        return Err(Error::Input(format!(
            "top-k k={k} exceeds the vocabulary {total}"
        )));
    }
    let (local_top, _) = t.topk(k.min(v_local), -1, true, false);
    let all = Tensor::cat(&pg.all_gather(&local_top)?, -1);
    let (top, _) = all.topk(k, -1, true, true);
    let thr = top.narrow(-1, k - 1, 1);
    Ok(t.ge_tensor(&thr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(seed: i64, shape: &[i64]) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn(shape, (Kind::Float, tch::Device::Cpu)) * 3.0
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-5 * (1.0 + b.abs())
    }

    #[test]
    fn forward_kl_matches_the_definition() {
        let pg = ProcessGroup::single();
        let (s, t) = (logits(1, &[2, 3, 11]), logits(2, &[2, 3, 11]));
        let mask = Tensor::ones([2, 3], (Kind::Float, tch::Device::Cpu));
        let l =
            KdLoss::new(LossKind::ForwardKl, 1.0).and_then(|k| k.masked_mean(&pg, &s, &t, &mask));
        let got = l.map(|l| l.double_value(&[])).unwrap_or(f64::NAN);
        let (ps, pt) = (
            s.log_softmax(-1, Kind::Float),
            t.log_softmax(-1, Kind::Float),
        );
        let want = (pt.exp() * (&pt - &ps)).sum(Kind::Float).double_value(&[]) / 6.0;
        assert!(close(got, want), "{got} vs {want}");
    }

    #[test]
    fn jsd_is_symmetric_at_half() {
        let pg = ProcessGroup::single();
        let (s, t) = (logits(3, &[1, 4, 9]), logits(4, &[1, 4, 9]));
        let mask = Tensor::ones([1, 4], (Kind::Float, tch::Device::Cpu));
        let k = KdLoss::new(LossKind::Jsd { beta: 0.5 }, 2.0).unwrap_or_else(|e| panic!("{e}"));
        let a = k
            .masked_mean(&pg, &s, &t, &mask)
            .map(|x| x.double_value(&[]))
            .unwrap_or(f64::NAN);
        let b = k
            .masked_mean(&pg, &t, &s, &mask)
            .map(|x| x.double_value(&[]))
            .unwrap_or(f64::NAN);
        assert!(close(a, b), "{a} vs {b}");
    }

    #[test]
    fn topk_with_full_vocab_is_forward_kl() {
        let pg = ProcessGroup::single();
        let (s, t) = (logits(5, &[1, 2, 7]), logits(6, &[1, 2, 7]));
        let mask = Tensor::ones([1, 2], (Kind::Float, tch::Device::Cpu));
        let v = |kind| {
            KdLoss::new(kind, 1.0)
                .and_then(|k| k.masked_mean(&pg, &s, &t, &mask))
                .map(|x| x.double_value(&[]))
                .unwrap_or(f64::NAN)
        };
        assert!(close(v(LossKind::TopK { k: 7 }), v(LossKind::ForwardKl)));
    }

    #[test]
    fn refuses_bad_options_and_empty_masks() {
        assert!(KdLoss::new(LossKind::ForwardKl, 0.0).is_err());
        assert!(KdLoss::new(LossKind::Jsd { beta: 1.0 }, 1.0).is_err());
        assert!(KdLoss::new(LossKind::TopK { k: 0 }, 1.0).is_err());
        let pg = ProcessGroup::single();
        let s = logits(7, &[1, 2, 5]);
        let zero = Tensor::zeros([1, 2], (Kind::Float, tch::Device::Cpu));
        let k = KdLoss::new(LossKind::ForwardKl, 1.0).unwrap_or_else(|e| panic!("{e}"));
        assert!(k.masked_mean(&pg, &s, &s, &zero).is_err());
        assert!(k
            .masked_mean(&pg, &s, &logits(8, &[1, 2, 6]), &zero)
            .is_err());
    }
}
