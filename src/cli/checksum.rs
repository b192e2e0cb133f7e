//! `nemo-tool checksum`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use nemo_tool::checkpoint::Checkpoint;

/// Print the sha256 of every stored tensor: its logical row-major bytes as
/// stored (per rank file; global tensors for distributed checkpoints). Reads
/// every payload byte once.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  nemo-tool checksum model.nemo\n  nemo-tool checksum model.nemo --json > sums.json"
)]
pub struct Args {
    /// A .nemo file (tar or tar.gz) or an extracted .nemo folder.
    pub path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `checksum`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let ckpt =
        Checkpoint::open(&args.path).with_context(|| format!("opening {}", args.path.display()))?;
    let sums = nemo_tool::checksum::stored(&ckpt)
        .with_context(|| format!("reading {}", args.path.display()))?;
    if args.json {
        super::print_json(&sums)?;
    } else {
        let mut out = std::io::stdout().lock();
        for s in &sums {
            writeln!(out, "{}  {}:{}", s.sha256, s.member, s.key)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[test]
    fn parses() {
        let cli =
            crate::cli::Cli::try_parse_from(["nemo-tool", "checksum", "m.nemo", "--json"]).unwrap();
        let crate::cli::Command::Checksum(a) = cli.command else {
            panic!("not checksum")
        };
        assert!(a.json);
    }
}
