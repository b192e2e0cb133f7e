//! `nemo-tool pack`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use nemo_tool::model::checkpoint::write::{pack, PackOptions};
use nemo_tool::model::checkpoint::Checkpoint;

/// Re-write a checkpoint as an uncompressed `.nemo` tar in the same layout:
/// packs an extracted folder, decompresses a .tar.gz, and re-serializes every
/// weights file with nemo-tool's own writers (config and artifacts are copied
/// byte for byte). The output appears atomically.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  nemo-tool pack extracted_model/ model.nemo\n  nemo-tool pack old_gzipped.nemo model.nemo --force"
)]
pub struct Args {
    /// Input: a .nemo (tar or tar.gz) or an extracted folder.
    pub input: PathBuf,
    /// Output .nemo file.
    pub output: PathBuf,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `pack`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let ckpt = Checkpoint::open(&args.input)
        .with_context(|| format!("opening {}", args.input.display()))?;
    let opts = PackOptions {
        force: args.force,
        config_text: None,
    };
    let summary = pack(&ckpt, &args.output, &opts)
        .with_context(|| format!("writing {}", args.output.display()))?;
    if args.json {
        super::print_json(&summary)?;
    } else {
        eprintln!(
            "wrote {} ({} members, {} bytes)",
            summary.output.display(),
            summary.members,
            summary.bytes
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use crate::cli::{parse, Command};

    #[test]
    fn parses() {
        let Ok(Command::Pack(a)) = parse(&["pack", "in", "out.nemo", "--force"]) else {
            panic!("not pack")
        };
        assert!(a.force && !a.json);
        assert!(parse(&["pack", "in"]).is_err());
    }
}
