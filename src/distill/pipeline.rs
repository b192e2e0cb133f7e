//! Pipeline parallelism for distillation: megatron-core's non-interleaved 1F1B schedule
//! (`forward_backward_pipelining_without_interleaving`) over the stages of a [`Grid::pp`]
//! group, with the teacher run stage by stage under no_grad beside the student.
//!
//! Between stages travels one tensor per micro-batch: the student's and the teacher's
//! activations concatenated on the hidden dim (how NeMo and ModelOpt pass both models
//! through one pipeline); gradients travel back for the student part only. The KD loss is
//! computed on the last stage. Sends and receives that cross between two neighbours are
//! posted together ([`ProcessGroup::exchange`]), so no stage waits on the other.
//!
//! Stage `s` of `P` runs `P - s - 1` warm-up forwards, then alternates one forward and one
//! backward, then drains the remaining backwards: at most `P - s` micro-batches' activations
//! are alive on a stage, instead of all of them.

use std::collections::VecDeque;

use tch::{Kind, Tensor};

use super::hidden_loss::{Pair, Projection};
use super::loss::{self, KdLoss, Parts, TeacherOut, TopK};
use super::model::{self, Checkpointed, Gpt, Recompute, StageInput};
use super::parallel::{self, Grid, ProcessGroup, ReduceOp};

/// Errors of a pipeline step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stage's model.
    #[error(transparent)]
    Model(#[from] model::Error),
    /// The loss on the last stage.
    #[error(transparent)]
    Loss(#[from] loss::Error),
    /// Sending or receiving between stages.
    #[error(transparent)]
    Parallel(#[from] parallel::Error),
    /// libtorch failed during a backward pass.
    #[error("pipeline backward: {0}")]
    Backward(String),
}

/// A micro-batch: input ids, labels and loss mask, `[b, s]` each.
#[derive(Debug)]
pub struct Batch {
    /// Input token ids.
    pub tokens: Tensor,
    /// The next token of each position.
    pub labels: Tensor,
    /// 1 where the position counts in the loss.
    pub mask: Tensor,
    /// The teacher's top-k logits from a teacher cache (instead of a live teacher).
    pub cached: Option<TopK>,
}

/// The two models of one stage and how to run them.
pub struct Stage<'a> {
    /// Trainable student stage.
    pub student: &'a Gpt,
    /// Frozen teacher stage (same stage index); None when a teacher cache stands in for it.
    pub teacher: Option<&'a Gpt>,
    /// The KD loss (last stage).
    pub kd: &'a KdLoss,
    /// Sequence positions per logits chunk of the loss.
    pub chunk: i64,
    /// Student activation recompute.
    pub recompute: Recompute,
    /// Intermediate-layer losses (their modules on the last stage).
    pub pairs: &'a [Pair],
    /// The KD projection, when the hidden sizes differ.
    pub projection: Option<&'a Projection>,
}

impl std::fmt::Debug for Stage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage").finish_non_exhaustive()
    }
}

/// Point-to-point with the neighbouring stages of a pipeline group.
struct Links<'a> {
    pp: &'a ProcessGroup,
    stage: i32,
    last: bool,
    /// Shapes and type of what crosses: `[b, s, Hs + Ht]` forward, `[b, s, Hs]` backward.
    fwd: Vec<i64>,
    bwd: Vec<i64>,
    kind: Kind,
}

impl Links<'_> {
    fn first(&self) -> bool {
        self.stage == 0
    }

    fn empty(&self, shape: &[i64]) -> Tensor {
        Tensor::empty(shape, (self.kind, tch::Device::Cpu))
    }

    /// Sends `send` (to the next stage forward, the previous one backward) and receives the
    /// tensor of `recv_from` (`Some(true)`: the previous stage's activations, `Some(false)`:
    /// the next stage's gradient), posted together.
    fn exchange(
        &self,
        send: Option<(&Tensor, bool)>,
        recv: Option<bool>,
    ) -> Result<Option<Tensor>, Error> {
        let peer = |forward: bool| {
            if forward {
                self.stage + 1
            } else {
                self.stage - 1
            }
        };
        let sends: Vec<(&Tensor, i32)> = send.into_iter().map(|(t, f)| (t, peer(f))).collect();
        let mut recvs: Vec<(Tensor, i32)> = recv
            .into_iter()
            .map(|from_prev| {
                if from_prev {
                    (self.empty(&self.fwd), self.stage - 1)
                } else {
                    (self.empty(&self.bwd), self.stage + 1)
                }
            })
            .collect();
        self.pp.exchange(&sends, &mut recvs, 0)?;
        Ok(recvs.pop().map(|(t, _)| t))
    }

    fn recv_forward(&self) -> Result<Option<Tensor>, Error> {
        if self.first() {
            return Ok(None);
        }
        self.exchange(None, Some(true))
    }

    fn send_forward(&self, y: Option<&Tensor>) -> Result<(), Error> {
        match y {
            Some(y) if !self.last => self.exchange(Some((y, true)), None).map(|_| ()),
            _ => Ok(()),
        }
    }

    fn send_forward_recv_backward(&self, y: Option<&Tensor>) -> Result<Option<Tensor>, Error> {
        match y {
            Some(y) if !self.last => self.exchange(Some((y, true)), Some(false)),
            _ => Ok(None),
        }
    }

    fn send_backward_recv_forward(&self, g: &Tensor) -> Result<Option<Tensor>, Error> {
        if self.first() {
            return Ok(None);
        }
        self.exchange(Some((g, false)), Some(true))
    }

    fn recv_backward(&self) -> Result<Option<Tensor>, Error> {
        if self.last {
            return Ok(None);
        }
        self.exchange(None, Some(false))
    }

    fn send_backward(&self, g: &Tensor) -> Result<(), Error> {
        if self.first() {
            return Ok(());
        }
        self.exchange(Some((g, false)), None).map(|_| ())
    }
}

/// A micro-batch between its forward and its backward.
enum InFlight {
    /// What backward needs.
    Kept {
        ck: Checkpointed,
        /// The loss gradient of the student's final hidden states (last stage).
        grad: Option<Tensor>,
    },
    /// Already back-propagated (the last stage with intermediate-layer losses, whose
    /// backward runs right after the forward, as 1F1B has it there anyway).
    Done {
        /// The gradient of the stage's input (None on a single stage).
        input_grad: Option<Tensor>,
        /// The stage's output (shaped like its input).
        output: Tensor,
    },
}

impl InFlight {
    /// The stage's output, whose shape the input's gradient has.
    fn output(&self) -> Tensor {
        match self {
            InFlight::Kept { ck, .. } => ck.hidden.shallow_clone(),
            InFlight::Done { output, .. } => output.shallow_clone(),
        }
    }
}

impl Stage<'_> {
    fn links<'g>(&self, pp: &'g ProcessGroup, micro: &Batch) -> Links<'g> {
        let (b, s) = (micro.tokens.size()[0], micro.tokens.size()[1]);
        let (hs, ht) = (self.student.spec.hidden, self.teacher_hidden());
        Links {
            pp,
            stage: pp.rank(),
            last: self.student.stage.is_last(),
            fwd: vec![b, s, hs + ht],
            bwd: vec![b, s, hs],
            kind: self.student.kind(),
        }
    }

    /// The teacher's width in what crosses between stages (0 without a live teacher).
    fn teacher_hidden(&self) -> i64 {
        self.teacher.map_or(0, |t| t.spec.hidden)
    }

    /// The student's and the teacher's half of what the previous stage sent.
    fn halves(&self, x: &Tensor) -> (Tensor, Option<Tensor>) {
        let (hs, ht) = (self.student.spec.hidden, self.teacher_hidden());
        let t = self.teacher.map(|_| x.narrow(2, hs, ht));
        (x.narrow(2, 0, hs), t)
    }

    /// The teacher's stage output for `input` (under no_grad), None with a cache.
    fn teacher_stage(&self, input: StageInput) -> Result<Option<Tensor>, Error> {
        match self.teacher {
            Some(t) => Ok(Some(tch::no_grad(|| t.stage_output(input))?)),
            None => Ok(None),
        }
    }

    /// What the loss takes from the teacher on the last stage.
    fn teacher_out<'b>(
        &'b self,
        micro: &'b Batch,
        th: Option<Tensor>,
    ) -> Result<TeacherOut<'b>, Error> {
        match (self.teacher, th, &micro.cached) {
            (Some(t), Some(h), _) => Ok(TeacherOut::Hidden(t, h)),
            (None, _, Some(c)) => Ok(TeacherOut::Cached(c)),
            _ => Err(Error::Loss(loss::Error::Input(
                "no teacher output: neither a live teacher nor cached logits".to_string(),
            ))),
        }
    }

    /// The student's activations and the teacher's (when live) side by side, to send on.
    fn to_send(&self, sh: &Tensor, th: Option<Tensor>) -> Tensor {
        match th {
            Some(th) => Tensor::cat(&[sh.detach(), th.to_kind(sh.kind())], 2),
            None => sh.detach(),
        }
    }

    /// One micro-batch forward on this stage: the student keeping what backward needs, the
    /// teacher under no_grad. On the last stage the loss and its gradient are computed too
    /// (returned loss); elsewhere the activations to send are returned.
    fn forward(
        &self,
        micro: &Batch,
        received: Option<Tensor>,
    ) -> Result<(InFlight, Option<Tensor>, Parts), Error> {
        let parts = received.as_ref().map(|x| self.halves(x));
        let (s_in, t_in) = inputs(micro, &parts);
        if self.student.stage.is_last() && !self.pairs.is_empty() {
            return self.forward_backward_with_pairs(micro, s_in, t_in);
        }
        let th = self.teacher_stage(t_in)?;
        let ck = self.student.stage_checkpointed(s_in, self.recompute)?;
        if self.student.stage.is_last() {
            let tout = self.teacher_out(micro, th)?;
            let (loss, grad) = self.kd.loss_and_grad(
                self.student,
                &tout,
                &ck.hidden,
                Some(&micro.labels),
                &micro.mask,
                self.chunk,
            )?;
            Ok((InFlight::Kept { ck, grad }, None, loss))
        } else {
            let out = self.to_send(&ck.hidden, th);
            Ok((
                InFlight::Kept { ck, grad: None },
                Some(out),
                Parts::default(),
            ))
        }
    }

    /// The last stage with intermediate-layer losses: forward with the pairs' modules
    /// captured, the balanced loss, and at once the backward of all of it.
    fn forward_backward_with_pairs(
        &self,
        micro: &Batch,
        s_in: StageInput,
        t_in: StageInput,
    ) -> Result<(InFlight, Option<Tensor>, Parts), Error> {
        let leaf = match s_in {
            StageInput::Hidden(h) => Some(h.detach().set_requires_grad(true)),
            StageInput::Tokens(_) => None,
        };
        let s_in = match &leaf {
            Some(l) => StageInput::Hidden(l),
            None => s_in,
        };
        let ssites: Vec<_> = self.pairs.iter().map(|p| p.student).collect();
        let tsites: Vec<_> = self.pairs.iter().map(|p| p.teacher).collect();
        let teacher = self.teacher.ok_or_else(|| {
            Error::Loss(loss::Error::Input(
                "intermediate_layer_pairs need the live teacher (a teacher cache holds logits only)"
                    .to_string(),
            ))
        })?;
        let (th, tcaps) = tch::no_grad(|| teacher.stage_captured(t_in, &tsites))?;
        let (sh, scaps) = self.student.stage_captured(s_in, &ssites)?;
        let n = micro.mask.sum(Kind::Double).double_value(&[]);
        let inter = self.kd.intermediate_mean(
            self.pairs,
            self.projection,
            &scaps,
            &tcaps,
            &micro.mask,
            n,
        )?;
        let tout = TeacherOut::Hidden(teacher, th);
        let (parts, g, w) = self.kd.balanced_loss_and_grad(
            self.student,
            &tout,
            &sh,
            Some(&micro.labels),
            &micro.mask,
            self.chunk,
            Some(inter.double_value(&[])),
        )?;
        let mut objective = inter * w;
        if let Some(g) = g {
            objective += (&sh * g.detach()).sum(Kind::Float);
        }
        objective
            .f_backward()
            .map_err(|e| Error::Backward(e.to_string()))?;
        let input_grad = leaf.map(|l| l.grad()).filter(Tensor::defined);
        let output = sh.detach();
        Ok((InFlight::Done { input_grad, output }, None, parts))
    }

    /// One micro-batch backward: the gradient of this stage's input (to send back; zeros
    /// where nothing reached it).
    fn backward(&self, f: InFlight, grad: Option<Tensor>) -> Result<Tensor, Error> {
        let output = f.output();
        let g = match f {
            InFlight::Done { input_grad, .. } => input_grad,
            InFlight::Kept { ck, grad: own } => {
                // nothing reached this micro-batch's output: all positions masked upstream
                let g = own.or(grad).unwrap_or_else(|| output.zeros_like());
                ck.backward(self.student, &g)?
            }
        };
        Ok(g.unwrap_or_else(|| output.zeros_like()))
    }

    /// Forward and backward of every micro-batch of a step in the 1F1B order; gradients
    /// accumulate into the student stage's parameters. Returns the sum of the micro-batch
    /// losses on the last stage, zeros elsewhere.
    ///
    /// # Errors
    /// Model, loss and communication errors.
    pub fn train_step(&self, pp: &ProcessGroup, micro: &[Batch]) -> Result<Parts, Error> {
        let Some(m0) = micro.first() else {
            return Ok(Parts::default());
        };
        let links = self.links(pp, m0);
        let stages = self.student.stage.count;
        let stage = self.student.stage.index;
        let n = micro.len();
        let warmup = (stages - stage - 1).min(n);
        let steady = n - warmup;
        let mut inflight: VecDeque<InFlight> = VecDeque::new();
        let mut loss = Parts::default();
        let mut next = 0usize;
        for _ in 0..warmup {
            let x = links.recv_forward()?;
            let (f, y, l) = self.forward(&micro[next], x)?;
            next += 1;
            loss += l;
            links.send_forward(y.as_ref())?;
            inflight.push_back(f);
        }
        let mut x = if steady > 0 {
            links.recv_forward()?
        } else {
            None
        };
        for i in 0..steady {
            let (f, y, l) = self.forward(&micro[next], x.take())?;
            next += 1;
            loss += l;
            inflight.push_back(f);
            let g = links.send_forward_recv_backward(y.as_ref())?;
            let Some(oldest) = inflight.pop_front() else {
                break;
            };
            let gin = self.backward(oldest, g)?;
            if i + 1 == steady {
                links.send_backward(&gin)?;
            } else {
                x = links.send_backward_recv_forward(&gin)?;
            }
        }
        while let Some(oldest) = inflight.pop_front() {
            let g = links.recv_backward()?;
            let gin = self.backward(oldest, g)?;
            links.send_backward(&gin)?;
        }
        Ok(loss)
    }

    /// Forward only (validation): the last stage's final hidden states of the student and
    /// the teacher (None with a cache) for `micro`, None on the other stages (which pass
    /// their activations on).
    ///
    /// # Errors
    /// Model and communication errors.
    pub fn forward_only(
        &self,
        pp: &ProcessGroup,
        micro: &Batch,
    ) -> Result<Option<(Tensor, Option<Tensor>)>, Error> {
        let links = self.links(pp, micro);
        let received = links.recv_forward()?;
        let parts = received.as_ref().map(|x| self.halves(x));
        let (s_in, t_in) = inputs(micro, &parts);
        let (sh, th) = tch::no_grad(|| -> Result<(Tensor, Option<Tensor>), Error> {
            Ok((self.student.stage_output(s_in)?, self.teacher_stage(t_in)?))
        })?;
        if self.student.stage.is_last() {
            return Ok(Some((sh, th)));
        }
        let out = self.to_send(&sh, th);
        links.send_forward(Some(&out))?;
        Ok(None)
    }
}

/// The student's and the teacher's input: the previous stage's halves, or the tokens.
fn inputs<'t>(
    micro: &'t Batch,
    halves: &'t Option<(Tensor, Option<Tensor>)>,
) -> (StageInput<'t>, StageInput<'t>) {
    match halves {
        Some((s, Some(t))) => (StageInput::Hidden(s), StageInput::Hidden(t)),
        Some((s, None)) => (StageInput::Hidden(s), StageInput::Tokens(&micro.tokens)),
        None => (
            StageInput::Tokens(&micro.tokens),
            StageInput::Tokens(&micro.tokens),
        ),
    }
}

/// Sums the gradients of tied word embeddings over the first and last stage (megatron-core's
/// embedding-group all-reduce), so both copies take the same update.
///
/// # Errors
/// Collective errors.
pub fn sync_tied_embeddings(student: &Gpt, grid: &Grid) -> Result<(), Error> {
    if grid.layout.pp < 2 || !student.spec.tied {
        return Ok(());
    }
    let p = student.word_embeddings().or_else(|| student.tied_copy());
    if let Some(p) = p {
        let mut g = p.tensor.grad();
        if g.defined() {
            grid.embedding.all_reduce(&mut g, ReduceOp::Sum)?;
        }
    }
    Ok(())
}
