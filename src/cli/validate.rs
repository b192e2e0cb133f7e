//! `nemo-tool validate`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use nemo_tool::ops::checksum::Manifest;
use nemo_tool::ops::validate::{validate_path, Options};

/// Check a checkpoint for CI: every expected rank file present, key sets
/// consistent across ranks and with the config's architecture, local shapes
/// consistent with the config, T, P and the partition rules, vocab padding,
/// referenced artifacts present, config T/P vs the layout on disk; dtypes
/// reported. `--deep` also reads every byte: zip record CRCs, NaN/Inf counts
/// per tensor and the canonical checksums. Every finding is listed with a
/// code and its place. Exit status: 0 valid, 1 invalid, 2 unreadable.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
nemo-tool validate model.nemo\n  \
nemo-tool validate model.nemo --deep --json > report.json\n  \
nemo-tool checksum model.nemo --json > manifest.json\n  \
nemo-tool validate copy.nemo --manifest manifest.json\n\n\
Exit status: 0 valid, 1 invalid (findings listed), 2 unreadable.")]
pub struct Args {
    /// A .nemo file (tar or tar.gz) or an extracted .nemo folder.
    pub path: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Read every byte: record CRCs, NaN/Inf counts, checksums.
    #[arg(long)]
    pub deep: bool,
    /// A manifest from `nemo-tool checksum --json`: every canonical tensor
    /// checksum and the model digest must match (reads every tensor).
    #[arg(long, value_name = "M")]
    pub manifest: Option<PathBuf>,
    /// The true (unpadded) vocabulary size, when no tokenizer artifact says it.
    #[arg(long, value_name = "N")]
    pub vocab_size: Option<u64>,
}

/// Runs `validate`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let manifest = match &args.manifest {
        Some(p) => {
            let text = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let m: Manifest = serde_json::from_slice(&text)
                .with_context(|| format!("{}: not a checksum manifest", p.display()))?;
            if m.format != nemo_tool::ops::checksum::MANIFEST_FORMAT {
                anyhow::bail!(
                    "{}: manifest format `{}`, expected `{}`",
                    p.display(),
                    m.format,
                    nemo_tool::ops::checksum::MANIFEST_FORMAT
                );
            }
            Some(m)
        }
        None => None,
    };
    let report = validate_path(
        &args.path,
        &Options {
            deep: args.deep,
            manifest,
            vocab_size: args.vocab_size,
        },
    );
    super::print_report(args.json, &report, |r| r.render())?;
    Ok(ExitCode::from(report.exit_code()))
}

#[cfg(test)]
mod tests {
    use crate::cli::{parse, Command};

    #[test]
    fn parses() {
        let args = ["validate", "m.nemo", "--deep", "--manifest", "m.json"];
        let Ok(Command::Validate(a)) = parse(&args) else {
            panic!("not validate")
        };
        assert!(a.deep && !a.json);
        assert_eq!(a.manifest.unwrap().to_str(), Some("m.json"));
    }
}
