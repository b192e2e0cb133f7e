//! Evaluation of a model (and optionally a teacher) on token windows: the language-model loss
//! (vocab-parallel next-token cross-entropy, as Megatron's `vocab_parallel_cross_entropy`),
//! perplexity, and the KD loss of every [`LossKind`] against a teacher. Also the token-input
//! helpers of `nemo-tool eval` (JSON / `.npy` token files, id range checks).
//!
//! Windows are `seq + 1` tokens: inputs are the first `seq`, targets the last `seq`. Every
//! target position counts (the loss mask is all ones, as with NeMo's default
//! `eod_mask_loss: false`). By default the softmax runs over the padded vocabulary, padded
//! columns included, as NeMo computes it; `true_vocab` restricts it to the first columns (the
//! tokenizer's vocabulary, what Hugging Face models compute).

use std::collections::BTreeMap;
use std::io::Write;

use tch::{Kind, Tensor};

use super::loss::{self, log_softmax_tp, KdLoss, LossKind};
use super::model::{self, Gpt};
use super::parallel::{self, ProcessGroup, ReduceOp};
use crate::io::output::OutputFile;

/// Errors of evaluation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model's forward failed.
    #[error(transparent)]
    Model(#[from] model::Error),
    /// A loss failed.
    #[error(transparent)]
    Loss(#[from] loss::Error),
    /// A collective failed.
    #[error(transparent)]
    Parallel(#[from] parallel::Error),
    /// A token id outside the vocabulary.
    #[error("eval: {what}: sequence {seq} position {pos}: token id {id} is outside the vocabulary [0, {vocab})")]
    TokenRange {
        /// Where the tokens came from.
        what: String,
        /// Sequence (window) index.
        seq: usize,
        /// Position in it.
        pos: usize,
        /// The id.
        id: i64,
        /// The vocabulary size checked against.
        vocab: i64,
    },
    /// Writing an output file.
    #[error(transparent)]
    Output(#[from] crate::io::output::Error),
    /// Malformed token input or options.
    #[error("eval: {what}: {why}")]
    Input {
        /// What was read.
        what: String,
        /// What is wrong.
        why: String,
    },
}

fn input(what: &str, why: impl Into<String>) -> Error {
    Error::Input {
        what: what.to_string(),
        why: why.into(),
    }
}

/// Token sequences of equal length from a file: a JSON list of lists of ids, or a 2-D (or 1-D:
/// one sequence) `.npy` integer array (by the `.npy` magic, not the name).
///
/// # Errors
/// [`Error::Input`] for malformed content, ragged or empty sequences.
pub fn parse_tokens(what: &str, bytes: &[u8]) -> Result<Vec<Vec<i64>>, Error> {
    let rows: Vec<Vec<i64>> = if bytes.starts_with(b"\x93NUMPY") {
        let crate::formats::npy::IntArray { shape, data } =
            crate::formats::npy::read_ints(bytes).map_err(|e| input(what, e.to_string()))?;
        match shape[..] {
            [_] => vec![data],
            [b, s] if b > 0 && s > 0 => data.chunks(s).map(<[i64]>::to_vec).collect(),
            _ => return Err(input(what, format!("shape {shape:?} is not [batch, seq]"))),
        }
    } else {
        serde_json::from_slice(bytes)
            .map_err(|e| input(what, format!("not a JSON list of lists of token ids: {e}")))?
    };
    let len = rows.first().map_or(0, Vec::len);
    if rows.is_empty() || len == 0 {
        return Err(input(what, "no tokens"));
    }
    if let Some(i) = rows.iter().position(|r| r.len() != len) {
        return Err(input(
            what,
            format!(
                "sequence {i} has {} tokens, sequence 0 has {len}: all must have the same length",
                rows.get(i).map_or(0, Vec::len)
            ),
        ));
    }
    Ok(rows)
}

/// Every id in `0..vocab`.
///
/// # Errors
/// [`Error::TokenRange`] naming the first bad id.
pub fn check_ids(what: &str, rows: &[Vec<i64>], vocab: i64) -> Result<(), Error> {
    for (seq, r) in rows.iter().enumerate() {
        if let Some((pos, &id)) = r.iter().enumerate().find(|(_, &t)| t < 0 || t >= vocab) {
            return Err(Error::TokenRange {
                what: what.to_string(),
                seq,
                pos,
                id,
                vocab,
            });
        }
    }
    Ok(())
}

/// `[rows, len]` int64 tensor of equal-length rows.
pub fn to_tensor(rows: &[Vec<i64>]) -> Tensor {
    let len = rows.first().map_or(0, Vec::len) as i64;
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([rows.len() as i64, len])
}

/// Sum over tokens of `-log p(target)` (over the full vocabulary, summed over TP ranks) for
/// this rank's vocab-parallel logits `[b, s, V/TP]` and `targets` `[b, s]`, equal on every rank.
/// With `true_vocab`, columns at or beyond it are excluded from the softmax.
///
/// # Errors
/// Collective errors; a target outside `0..vocab`.
pub fn nll_sum(
    pg: &ProcessGroup,
    logits: &Tensor,
    targets: &Tensor,
    true_vocab: Option<i64>,
) -> Result<f64, Error> {
    let x = logits.to_kind(Kind::Float);
    let vl = *x.size().last().unwrap_or(&0);
    let lo = i64::from(pg.rank()) * vl;
    let x = match true_vocab {
        Some(n) if n < lo + vl => {
            let col = Tensor::arange_start(lo, lo + vl, (Kind::Int64, x.device()));
            x.masked_fill(&col.ge(n), f64::NEG_INFINITY)
        }
        _ => x,
    };
    let lp = log_softmax_tp(pg, &x)?;
    let local = targets.to_device(x.device()) - lo;
    let mine = local.ge(0).logical_and(&local.lt(vl));
    let picked = lp
        .gather(-1, &local.clamp(0, (vl - 1).max(0)).unsqueeze(-1), false)
        .squeeze_dim(-1)
        .masked_fill(&mine.logical_not(), 0.0);
    // f64 sum; each rank holds a disjoint set of targets, so the TP sum is the total
    let mut sd = picked
        .to_kind(Kind::Double)
        .sum(Kind::Double)
        .neg()
        .reshape([1]);
    if pg.world() > 1 {
        pg.all_reduce(&mut sd, ReduceOp::Sum)?;
    }
    Ok(sd.double_value(&[0]))
}

/// The KD losses reported: every kind the engine has, at one temperature.
///
/// # Errors
/// [`loss::Error::Input`] for bad options.
pub fn kd_losses(
    temperature: f64,
    jsd_beta: f64,
    top_k: i64,
) -> Result<Vec<(String, KdLoss)>, Error> {
    Ok(vec![
        (
            "forward_kl".to_string(),
            KdLoss::new(LossKind::ForwardKl, temperature)?,
        ),
        (
            "reverse_kl".to_string(),
            KdLoss::new(LossKind::ReverseKl, temperature)?,
        ),
        (
            "jsd".to_string(),
            KdLoss::new(LossKind::Jsd { beta: jsd_beta }, temperature)?,
        ),
        (
            "topk".to_string(),
            KdLoss::new(LossKind::TopK { k: top_k }, temperature)?,
        ),
    ])
}

/// Options of [`evaluate`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Windows per forward pass.
    pub micro_batch: usize,
    /// Sequence positions per output-layer chunk (0: the whole sequence).
    pub chunk: usize,
    /// Restrict the LM-loss softmax to the first columns.
    pub true_vocab: Option<i64>,
    /// KD losses to compute when there is a teacher.
    pub kd: Vec<(String, KdLoss)>,
}

/// The numbers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Windows evaluated.
    pub sequences: usize,
    /// Target tokens counted.
    pub tokens: u64,
    /// Mean next-token cross-entropy of the model (nats).
    pub lm_loss: f64,
    /// `exp(lm_loss)`.
    pub perplexity: f64,
    /// The teacher's LM loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_lm_loss: Option<f64>,
    /// The teacher's perplexity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_perplexity: Option<f64>,
    /// KD loss of the model against the teacher, per kind (token mean).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub kd_loss: BTreeMap<String, f64>,
}

/// LM loss (and, with a teacher, its LM loss and the KD losses) over `windows` of `seq + 1`
/// tokens, `micro_batch` at a time, under `no_grad`. `progress(done, total)` runs after each
/// batch. Every rank must call it with the same windows.
///
/// # Errors
/// [`Error::Input`] for windows shorter than 2 or of different lengths, or a zero micro
/// batch; model, loss and collective errors.
pub fn evaluate(
    model: &Gpt,
    teacher: Option<&Gpt>,
    windows: &[Vec<i64>],
    opts: &Options,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Report, Error> {
    let len = windows.first().map_or(0, Vec::len);
    if len < 2 || windows.iter().any(|w| w.len() != len) {
        return Err(input(
            "windows",
            "need equal-length sequences of at least 2 tokens",
        ));
    }
    if opts.micro_batch == 0 {
        return Err(input("micro batch", "must be at least 1"));
    }
    let pg = model.group();
    let dev = model.device();
    let (mut nll, mut tnll, mut count) = (0.0, 0.0, 0u64);
    let mut kd: Vec<f64> = vec![0.0; opts.kd.len()];
    let total = windows.len();
    for (i, batch) in windows.chunks(opts.micro_batch).enumerate() {
        let all = to_tensor(batch).to_device(dev);
        let s = len as i64 - 1;
        let (inputs, targets) = (all.narrow(1, 0, s), all.narrow(1, 1, s));
        let n = (batch.len() as u64) * (s as u64);
        tch::no_grad(|| -> Result<(), Error> {
            // final hidden states once, then the output layer `chunk` positions at a time:
            // only [b, chunk, V/TP] logits of each model exist at once
            let sh = model.hidden(&inputs)?;
            let th = teacher.map(|t| t.hidden(&inputs)).transpose()?;
            let chunk = if opts.chunk == 0 {
                s
            } else {
                opts.chunk as i64
            };
            let mut start = 0;
            while start < s {
                let c = chunk.min(s - start);
                let tg = targets.narrow(1, start, c);
                let sl = model.logits_from_hidden(&sh.narrow(1, start, c))?;
                nll += nll_sum(pg, &sl, &tg, opts.true_vocab)?;
                if let (Some(t), Some(th)) = (teacher, &th) {
                    let tl = t.logits_from_hidden(&th.narrow(1, start, c))?;
                    tnll += nll_sum(pg, &tl, &tg, opts.true_vocab)?;
                    let mask = Tensor::ones([batch.len() as i64, c], (Kind::Float, dev));
                    let nc = (batch.len() as i64 * c) as f64;
                    for ((_, k), acc) in opts.kd.iter().zip(kd.iter_mut()) {
                        *acc += k.masked_mean(pg, &sl, &tl, &mask)?.double_value(&[]) * nc;
                    }
                }
                start += c;
            }
            Ok(())
        })?;
        count += n;
        progress(((i + 1) * opts.micro_batch).min(total), total);
    }
    let c = count as f64;
    let lm = nll / c;
    let tlm = teacher.map(|_| tnll / c);
    Ok(Report {
        sequences: total,
        tokens: count,
        lm_loss: lm,
        perplexity: lm.exp(),
        teacher_lm_loss: tlm,
        teacher_perplexity: tlm.map(f64::exp),
        kd_loss: if teacher.is_some() {
            opts.kd
                .iter()
                .zip(kd)
                .map(|((name, _), v)| (name.clone(), v / c))
                .collect()
        } else {
            BTreeMap::new()
        },
    })
}

/// Computes the gathered padded-vocab logits of `windows` (`micro_batch` rows per forward) and
/// streams them as float32 `[batch, seq, vocab]` `.npy` into `out`, committed at the end. Every
/// rank computes (the forward is collective); the rank holding `out` writes.
///
/// # Errors
/// The forward, or writing/committing `out` (named).
pub fn write_logits(
    out: Option<OutputFile>,
    model: &Gpt,
    windows: &[Vec<i64>],
    micro_batch: usize,
) -> Result<(), Error> {
    let (b, s) = (windows.len(), windows.first().map_or(0, Vec::len));
    let vocab = usize::try_from(model.spec.padded_vocab)
        .map_err(|_| input("logits", "negative vocabulary"))?;
    let io = |f: &OutputFile, e: std::io::Error| {
        Error::Output(crate::io::output::Error::Io {
            path: f.target().to_path_buf(),
            op: "writing",
            source: e,
        })
    };
    let mut out = out.map(std::io::BufWriter::new);
    if let Some(w) = out.as_mut() {
        w.write_all(&crate::formats::npy::f32_header(&[b, s, vocab]))
            .map_err(|e| io(w.get_ref(), e))?;
    }
    for batch in windows.chunks(micro_batch.max(1)) {
        let t = to_tensor(batch).to_device(model.device());
        let l = tch::no_grad(|| model.forward_gathered(&t))?;
        if let Some(w) = out.as_mut() {
            let l = l
                .to_device(tch::Device::Cpu)
                .to_kind(Kind::Float)
                .contiguous();
            let n = l.numel();
            let mut v = vec![0f32; n];
            l.copy_data(&mut v, n);
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            w.write_all(&bytes).map_err(|e| io(w.get_ref(), e))?;
        }
    }
    if let Some(w) = out {
        let f = w.into_inner().map_err(|e| {
            let (e, w) = e.into_parts();
            io(w.get_ref(), e)
        })?;
        f.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_json_and_npy_tokens() {
        assert_eq!(
            parse_tokens("t", b"[[1,2,3],[4,5,6]]").unwrap(),
            vec![vec![1, 2, 3], vec![4, 5, 6]]
        );
        let npy = {
            let h = "{'descr': '<i8', 'fortran_order': False, 'shape': (1, 2), }\n";
            let mut v = b"\x93NUMPY\x01\x00".to_vec();
            v.extend_from_slice(&(h.len() as u16).to_le_bytes());
            v.extend_from_slice(h.as_bytes());
            v.extend_from_slice(&[9i64, 8].map(i64::to_le_bytes).concat());
            v
        };
        assert_eq!(parse_tokens("t", &npy).unwrap(), vec![vec![9, 8]]);
    }

    #[test]
    fn input_errors() {
        assert!(
            matches!(parse_tokens("t", b"[[1,2],[3]]"), Err(Error::Input { why, .. }) if why.contains("sequence 1"))
        );
        assert!(matches!(parse_tokens("t", b"{}"), Err(Error::Input { .. })));
        assert!(matches!(parse_tokens("t", b"[]"), Err(Error::Input { .. })));
    }

    #[test]
    fn token_range_names_the_place() {
        let e = check_ids("data", &[vec![1, 2], vec![3, 130]], 128).unwrap_err();
        assert!(matches!(
            e,
            Error::TokenRange {
                seq: 1,
                pos: 1,
                id: 130,
                vocab: 128,
                ..
            }
        ));
        assert!(check_ids("data", &[vec![0, 127]], 128).is_ok());
    }

    #[test]
    fn nll_matches_cross_entropy_and_true_vocab() {
        let x = Tensor::from_slice(&[1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0, 1.0, 1.0]).view([1, 2, 4]);
        let t = Tensor::from_slice(&[1i64, 0]).view([1, 2]);
        let pg = ProcessGroup::single();
        let got = nll_sum(&pg, &x, &t, None).unwrap();
        let lp = x.log_softmax(-1, Kind::Double);
        let want = -(lp.double_value(&[0, 0, 1]) + lp.double_value(&[0, 1, 0]));
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // restricted to the first 2 columns
        let lp2 = x.narrow(-1, 0, 2).log_softmax(-1, Kind::Double);
        let want2 = -(lp2.double_value(&[0, 0, 1]) + lp2.double_value(&[0, 1, 0]));
        let got2 = nll_sum(&pg, &x, &t, Some(2)).unwrap();
        assert!((got2 - want2).abs() < 1e-6, "{got2} vs {want2}");
    }
}
