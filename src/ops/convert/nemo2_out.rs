//! `convert --to nemo2`: any checkpoint as a NeMo 2 folder.
//!
//! - `weights/` is the torch_dist folder [`super::dist_out`] plans (megatron-core's stacking,
//!   TE names, `_extra_state` objects) under NeMo 2's `module.` keys; its `common.pt` is the
//!   source's when it had one (NeMo 2 keeps Lightning's loop state there), else `{}`.
//! - `context/` is copied byte for byte from a NeMo 2 source. Otherwise `model.yaml` is
//!   generated from the config ([`crate::model::foreign::config::nemo2_model_yaml`]) and the
//!   tokenizer files go to `context/nemo_tokenizer/` under their own names. `io.json` (the
//!   fiddle graph NeMo's `load_context` rebuilds the model from) is not generated: it names
//!   NeMo's Python classes and their arguments, which only NeMo itself can vouch for.
//!
//! The folder appears only when complete (written beside the target, then renamed).

use std::path::Path;

use crate::io::outdir::FsDir;
use crate::io::output::OutputDir;
use crate::model::checkpoint::{Checkpoint, Weights};
use crate::model::foreign::Format;

use super::named::NamedModel;
use super::ops::{io_err, source_name, true_vocab, write_artifacts, Error, Summary};

/// NeMo 2's key prefix in `weights/`.
const PREFIX: &str = "module.";

/// `input` (any checkpoint nemo-tool reads) -> a NeMo 2 folder at `out`.
///
/// # Errors
/// [`Error`]; the folder appears only on success.
pub fn to_nemo2(input: &Path, out: &Path, force: bool) -> Result<Summary, Error> {
    write_nemo2(&Checkpoint::open(input)?, out, force)
}

/// An opened checkpoint (any source, an HF folder's included) -> a NeMo 2 folder at `out`.
///
/// # Errors
/// [`Error`]; the folder appears only on success.
pub fn write_nemo2(ck: &Checkpoint, out: &Path, force: bool) -> Result<Summary, Error> {
    let canon = NamedModel::from_checkpoint(ck)?;
    let (mut tensors, pieces, mut objects, mut warnings) =
        super::dist_out::plan(&canon, ck.config.is_gated())?;
    let rename = |k: &str| match k.strip_prefix("model.") {
        Some(rest) => format!("{PREFIX}{rest}"),
        None => k.to_string(),
    };
    for t in &mut tensors {
        t.key = rename(&t.key);
    }
    for (k, _) in &mut objects {
        *k = rename(k);
    }
    // NeMo 2 keeps Lightning's loop state in common.pt: the source's, when it had one
    let common = match &ck.weights {
        Weights::Dist(d) => d.common_bytes.clone(),
        _ => None,
    };
    let dir = OutputDir::create(out, force)?;
    let n_tensors = tensors.len();
    super::dist_out::write_planned(
        &tensors,
        &pieces,
        &objects,
        common,
        &mut FsDir::new(dir.path().join("weights")),
    )
    .map_err(|e| Error::Invalid(format!("weights/: {e}")))?;

    let context = dir.path().join("context");
    let mut artifacts = Vec::new();
    match &ck.source {
        Some(s) if s.format == Format::Nemo2 => {
            // the source's context/, byte for byte
            let from = s.root.join("context");
            for (rel, path) in crate::model::foreign::files_under(&from, &[])
                .map_err(|e| Error::Invalid(e.to_string()))?
            {
                let to = context.join(&rel);
                if let Some(p) = to.parent() {
                    std::fs::create_dir_all(p).map_err(io_err(p))?;
                }
                std::fs::copy(&path, &to).map_err(io_err(&to))?;
                artifacts.push(format!("context/{rel}"));
            }
        }
        _ => {
            let names = write_artifacts(ck, &context.join("nemo_tokenizer"))?;
            let spm = names.contains(&"tokenizer.model");
            for name in names {
                artifacts.push(format!("context/nemo_tokenizer/{name}"));
            }
            let tok = match (artifacts.is_empty(), spm) {
                (true, _) => None,
                (false, true) => Some(("sentencepiece", "nemo_tokenizer/tokenizer.model")),
                (false, false) => Some(("huggingface", "nemo_tokenizer")),
            };
            let yaml = crate::model::foreign::config::nemo2_model_yaml(&ck.config, tok)
                .map_err(Error::Invalid)?;
            let path = context.join("model.yaml");
            std::fs::write(&path, yaml).map_err(io_err(&path))?;
            warnings.push(
                "context/io.json not written (NeMo's load_context needs it; megatron-core and NeMo's exporters read model.yaml and weights/)".into(),
            );
        }
    }
    if ck.source.as_ref().is_some_and(|s| s.optimizer) {
        warnings.push("optimizer state dropped (weights only)".into());
    }
    let output = dir.commit()?;
    let rows = canon
        .tensor("model.embedding.word_embeddings.weight")
        .and_then(|t| t.shape.first().copied())
        .unwrap_or(0);
    Ok(Summary {
        output,
        direction: format!("{} -> nemo2", source_name(ck)),
        tp: 1,
        pp: 1,
        tensors: n_tensors,
        files: 4,
        artifacts,
        vocab: (true_vocab(ck).unwrap_or(rows), rows),
        warnings,
    })
}
