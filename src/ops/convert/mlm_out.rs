//! `convert --to mlm`: any checkpoint as a Megatron-LM legacy checkpoint folder at `--tp` x
//! `--pp` (what Megatron-LM's own converter writes, `--ckpt-format torch`):
//!
//! ```text
//! OUT/latest_checkpointed_iteration.txt     the iteration, or `release`
//! OUT/iter_NNNNNNN/ (or release/)
//!     mp_rank_TT[_PPP]/model_optim_rng.pt   {args, checkpoint_version: 3.0, iteration, model}
//!     tokenizer/                            the tokenizer files (Megatron-Bridge's place)
//! ```
//!
//! Ranks come from the one planner (`model::plan`) and stream through `reshard`'s rank
//! emitter; each state dict is wrapped in Megatron-LM's dict, keys without NeMo's `model.`
//! prefix, layers numbered per stage. `args` is an `argparse.Namespace`
//! ([`crate::model::foreign::config::mlm_args`]). Optimizer and RNG state are not written:
//! load it with `--no-load-optim --no-load-rng` (or `--finetune`). The folder appears only
//! when complete.

use std::io::Write;
use std::path::Path;

use crate::formats::torch::value::{Construct, Global, Object};
use crate::formats::torch::{Dtype, Value};
use crate::io::output::OutputDir;
use crate::model::canonical::Canonical;
use crate::model::checkpoint::Checkpoint;
use crate::model::config::ModelConfig;
use crate::model::foreign::{LEGACY_FILE, TRACKER};
use crate::model::plan::{plan_reshard, ReshardOptions};

use super::ops::{io_err, write_artifacts, Error, Summary};

/// Megatron-LM's per-rank dict around a NeMo state dict (`model.` keys).
fn wrap(state: Value, args: &Value, iteration: u64) -> Value {
    let items: Vec<(Value, Value)> = state
        .dict_items()
        .unwrap_or(&[])
        .iter()
        .map(|(k, v)| {
            let k = match k.as_str() {
                Some(s) => Value::Str(s.strip_prefix("model.").unwrap_or(s).to_string()),
                None => k.clone(),
            };
            (k, v.clone())
        })
        .collect();
    let mut model = Object::new(
        Global::new("collections", "OrderedDict"),
        Construct::Reduce,
        vec![],
    );
    model.items = items;
    Value::Dict(vec![
        (Value::Str("args".into()), args.clone()),
        (Value::Str("checkpoint_version".into()), Value::Float(3.0)),
        (
            Value::Str("iteration".into()),
            Value::Int(i64::try_from(iteration).unwrap_or(0)),
        ),
        (Value::Str("model".into()), Value::Object(Box::new(model))),
    ])
}

/// `input` -> a Megatron-LM legacy folder at `out`, `tp` x `pp`.
///
/// # Errors
/// [`Error`]; the folder appears only on success.
pub fn to_mlm(
    input: &Path,
    out: &Path,
    tp: u64,
    pp: u64,
    dtype: Option<Dtype>,
    force: bool,
) -> Result<Summary, Error> {
    let opts = ReshardOptions {
        tp,
        pp,
        dtype,
        allow_partial_query_groups: false,
        vocab_size: None,
    };
    to_mlm_with(input, out, &opts, force)
}

/// [`to_mlm`] with every reshard option (`reshard` of a Megatron-LM folder).
///
/// # Errors
/// [`Error`]; the folder appears only on success.
pub fn to_mlm_with(
    input: &Path,
    out: &Path,
    opts: &ReshardOptions,
    force: bool,
) -> Result<Summary, Error> {
    write_mlm(&Checkpoint::open(input)?, out, opts, force)
}

/// An opened checkpoint (any source, an HF folder's included) -> a Megatron-LM legacy folder.
///
/// # Errors
/// [`Error`]; the folder appears only on success.
pub fn write_mlm(
    ck: &Checkpoint,
    out: &Path,
    opts: &ReshardOptions,
    force: bool,
) -> Result<Summary, Error> {
    let (tp, pp) = (opts.tp, opts.pp);
    let canon =
        Canonical::new(ck).map_err(|e| Error::Invalid(format!("{}: {e}", ck.path().display())))?;
    let plan = plan_reshard(&canon, opts).map_err(|e| Error::Plan(Box::new(e)))?;
    let cfg = match &plan.config_text {
        Some(t) => ModelConfig::parse(t).map_err(|e| Error::Invalid(e.to_string()))?,
        None => ck.config.clone(),
    };
    let rows = plan.vocab.as_ref().map_or(0, |v| v.target_rows);
    let attrs =
        crate::model::foreign::config::mlm_args(&cfg, tp, pp, rows).map_err(Error::Invalid)?;
    let mut ns = Object::new(
        Global::new("argparse", "Namespace"),
        Construct::NewObj,
        vec![],
    );
    ns.state = Some(Value::Dict(attrs));
    let args = Value::Object(Box::new(ns));
    let iteration = ck.source.as_ref().and_then(|s| s.iteration);
    let (sub, tracker) = match iteration {
        Some(n) => (format!("iter_{n:07}"), n.to_string()),
        None => ("release".to_string(), "release".to_string()),
    };
    let dir = OutputDir::create(out, force)?;
    let iter_dir = dir.path().join(&sub);
    let wrap_fn = |sd: Value| wrap(sd, &args, iteration.unwrap_or(0));
    let (mut progress, mut done, mut tensors) = (None, 0u64, 0usize);
    for (i, r) in plan.ranks.iter().enumerate() {
        let name = if pp > 1 {
            format!("mp_rank_{:02}_{:03}", r.tp, r.pp)
        } else {
            format!("mp_rank_{:02}", r.tp)
        };
        let rank_dir = iter_dir.join(&name);
        std::fs::create_dir_all(&rank_dir).map_err(io_err(&rank_dir))?;
        let path = rank_dir.join(LEGACY_FILE);
        let file = std::fs::File::create(&path).map_err(io_err(&path))?;
        let mut w = crate::io::sink::BlockWriter::new(file);
        tensors += crate::ops::reshard::emit_rank(
            &canon,
            &plan,
            i,
            "model_optim_rng",
            Some(&wrap_fn),
            &mut progress,
            &mut done,
            &mut |f| {
                f(&mut w).map_err(|source| {
                    crate::ops::reshard::Error::Write(
                        crate::formats::tar_write::WriteError::Member {
                            member: format!("{sub}/{name}/{LEGACY_FILE}"),
                            source,
                        },
                    )
                })
            },
        )
        .map_err(|e| Error::Reshard(Box::new(e)))?;
        w.flush().map_err(io_err(&path))?;
    }
    let mut artifacts = Vec::new();
    if !ck.artifacts.is_empty() {
        for name in write_artifacts(ck, &iter_dir.join("tokenizer"))? {
            artifacts.push(format!("{sub}/tokenizer/{name}"));
        }
    }
    let t = dir.path().join(TRACKER);
    std::fs::write(&t, &tracker).map_err(io_err(&t))?;
    let output = dir.commit()?;
    let mut warnings = plan.warnings.clone();
    if ck.source.as_ref().is_some_and(|s| s.optimizer) {
        warnings.push("optimizer state dropped (weights only)".into());
    }
    let true_rows = plan
        .vocab
        .as_ref()
        .map_or(0, |v| v.true_vocab.unwrap_or(v.source_rows));
    Ok(Summary {
        output,
        direction: format!("{} -> megatron-lm", super::ops::source_name(ck)),
        tp,
        pp,
        tensors,
        files: plan.ranks.len(),
        artifacts,
        vocab: (true_rows, rows),
        warnings,
    })
}
