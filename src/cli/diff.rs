//! `nemo-tool diff`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use nemo_tool::model::canonical::Canonical;
use nemo_tool::model::checkpoint::Checkpoint;
use nemo_tool::ops::diff::{diff, Options};

/// Compare two checkpoints logically, whatever their layouts (TP, PP,
/// per-rank files or distributed): tensors only in one, shape and dtype
/// differences, the max abs difference per tensor, and key-level config
/// differences (layout keys such as tensor_model_parallel_size are listed but
/// do not count). Vocab padding rows are not compared. Exit status: 0 same,
/// 1 different, 2 error.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
nemo-tool diff tp1.nemo tp8.nemo\n  \
nemo-tool diff a.nemo b_folder/ --atol 1e-3\n  \
nemo-tool diff a.nemo b.nemo --json | jq '.tensors[].name'")]
pub struct Args {
    /// First checkpoint (.nemo file or folder).
    pub a: PathBuf,
    /// Second checkpoint.
    pub b: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Tensors whose max abs difference is at most X count as equal.
    #[arg(long, value_name = "X", default_value_t = 0.0)]
    pub atol: f64,
    /// The true (unpadded) vocabulary size, when no tokenizer artifact says it.
    #[arg(long, value_name = "N")]
    pub vocab_size: Option<u64>,
}

/// Runs `diff`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let a = Checkpoint::open(&args.a).with_context(|| format!("opening {}", args.a.display()))?;
    let b = Checkpoint::open(&args.b).with_context(|| format!("opening {}", args.b.display()))?;
    let ca = Canonical::new(&a).with_context(|| format!("reading {}", args.a.display()))?;
    let cb = Canonical::new(&b).with_context(|| format!("reading {}", args.b.display()))?;
    let opts = Options {
        atol: args.atol,
        vocab_size: args.vocab_size,
    };
    let report = diff(&ca, &cb, &opts).context("comparing")?;
    super::print_report(args.json, &report, |r| r.render())?;
    Ok(if report.same {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use crate::cli::{parse, Command};

    #[test]
    fn parses() {
        let Ok(Command::Diff(a)) = parse(&["diff", "a.nemo", "b", "--atol", "1e-3", "--json"])
        else {
            panic!("not diff")
        };
        assert!(a.json);
        assert_eq!(a.atol, 1e-3);
    }
}
