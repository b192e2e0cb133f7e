//! `nemo-tool inspect`.

use std::path::PathBuf;
use std::process::ExitCode;

/// Show a checkpoint's layout, architecture, tensors and artifacts. Reads
/// metadata only: tensor payloads are never touched.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  nemo-tool inspect llama3-8b.nemo --tensors\n  nemo-tool inspect extracted_dir/ --json | jq .params"
)]
pub struct Args {
    /// A .nemo file (tar or tar.gz) or an extracted .nemo folder.
    pub path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// List every tensor (text output; JSON always lists them).
    #[arg(long)]
    pub tensors: bool,
}

/// Runs `inspect`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("inspect {}: not wired yet", args.path.display())
}
