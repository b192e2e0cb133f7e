//! `nemo-tool inspect`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use nemo_tool::model::checkpoint::Checkpoint;
use nemo_tool::ops::inspect;

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
    let ckpt = Checkpoint::open_metadata(&args.path)
        .with_context(|| format!("opening {}", args.path.display()))?;
    let report =
        inspect::report(&ckpt).with_context(|| format!("inspecting {}", args.path.display()))?;
    if args.json {
        super::print_json(&report)?;
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(report.render(args.tensors).as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse, Command};

    #[test]
    fn parses_flags() {
        let Ok(Command::Inspect(a)) = parse(&["inspect", "a.nemo", "--json", "--tensors"]) else {
            panic!("not inspect")
        };
        assert!(a.json && a.tensors);
        assert_eq!(a.path, PathBuf::from("a.nemo"));
        assert!(parse(&["inspect"]).is_err());
    }
}
