//! `nemo-tool checksum`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use nemo_tool::model::canonical::Canonical;
use nemo_tool::model::checkpoint::Checkpoint;
use nemo_tool::ops::checksum::CanonicalOptions;

/// Print layout-independent checksums: the sha256 of every logical tensor in
/// its canonical unsharded (TP=1) layout, vocab padding rows excluded, and one
/// model digest that is the same at any TP/PP and in any layout. `--json`
/// writes a manifest for `validate --manifest`. `--stored` prints the sha256
/// of every tensor as stored instead (per rank file). Reads every payload byte
/// once.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
nemo-tool checksum model.nemo\n  \
nemo-tool checksum model.nemo --json > manifest.json\n  \
nemo-tool validate resharded.nemo --manifest manifest.json\n  \
nemo-tool checksum model.nemo --stored")]
pub struct Args {
    /// A .nemo file (tar or tar.gz) or an extracted .nemo folder.
    pub path: PathBuf,
    /// Print JSON (a manifest; with --stored, a list) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Checksums of the tensors as stored (per rank file / global DCP tensor).
    #[arg(long)]
    pub stored: bool,
    /// The true (unpadded) vocabulary size, when no tokenizer artifact says it.
    #[arg(long, value_name = "N")]
    pub vocab_size: Option<u64>,
}

/// Runs `checksum`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let ckpt =
        Checkpoint::open(&args.path).with_context(|| format!("opening {}", args.path.display()))?;
    let reading = || format!("reading {}", args.path.display());
    if args.stored {
        let sums = nemo_tool::ops::checksum::stored(&ckpt).with_context(reading)?;
        if args.json {
            super::print_json(&sums)?;
        } else {
            let mut out = std::io::stdout().lock();
            for s in &sums {
                writeln!(out, "{}  {}:{}", s.sha256, s.member, s.key)?;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let canon = Canonical::new(&ckpt).with_context(reading)?;
    let opts = CanonicalOptions {
        vocab_size: args.vocab_size,
        count_special: false,
    };
    let manifest = nemo_tool::ops::checksum::canonical(&canon, &opts).with_context(reading)?;
    if args.json {
        super::print_json(&manifest)?;
    } else {
        let mut out = std::io::stdout().lock();
        for t in &manifest.tensors {
            writeln!(out, "{}  {}", t.sha256, t.name)?;
        }
        if let Some(v) = &manifest.vocab {
            writeln!(
                out,
                "vocab rows hashed: {} of {} ({})",
                v.hashed, v.stored, v.source
            )?;
        }
        writeln!(out, "model digest: {}", manifest.model_digest)?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use crate::cli::{parse, Command};

    #[test]
    fn parses() {
        let args = [
            "checksum",
            "m.nemo",
            "--json",
            "--stored",
            "--vocab-size",
            "100",
        ];
        let Ok(Command::Checksum(a)) = parse(&args) else {
            panic!("not checksum")
        };
        assert!(a.json && a.stored);
        assert_eq!(a.vocab_size, Some(100));
    }
}
