//! The command-line surface: clap definitions, one file per subcommand. Each
//! subcommand turns its arguments into library options, calls the library and
//! prints the result (human text or `--json`). The library never sees clap.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nemo_tool::formats::torch::Dtype;

mod checksum;
mod convert;
mod data;
mod diff;
mod distill;
#[cfg(feature = "distill")]
mod eval;
mod inspect;
mod pack;
mod reshard;
mod validate;

/// Fast, exact, safe tools for NVIDIA NeMo / Megatron checkpoints.
#[derive(Debug, Parser)]
#[command(name = "nemo-tool", version, about, long_about = None)]
#[command(
    after_help = "Exit codes: 0 success, 1 differences or problems found, 2 error.\n\
Docs: https://github.com/ (see docs/ in the repository)"
)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a checkpoint's layout, architecture, tensors and artifacts (reads metadata only).
    Inspect(inspect::Args),
    /// Re-write a checkpoint as a .nemo tar in the same layout (pack a folder, un-gzip, re-serialize).
    Pack(pack::Args),
    /// Print layout-independent tensor checksums and a model digest (--stored: as stored).
    Checksum(checksum::Args),
    /// Write or describe Megatron indexed datasets (.bin/.idx).
    Data(data::Args),
    /// Distill a teacher into a student: a drop-in for NeMo's distillation script (needs --features distill).
    Distill(distill::Args),
    /// Check a checkpoint for CI (exit 0 valid, 1 invalid, 2 unreadable).
    Validate(validate::Args),
    /// Compare two checkpoints of any layouts logically (exit 0 same, 1 different).
    Diff(diff::Args),
    /// Change TP/PP exactly, streaming with bounded memory (any input layout -> NeMo's per-rank layout).
    Reshard(reshard::Args),
    /// Convert Hugging Face <-> .nemo, and per-rank <-> torch_dist layouts.
    Convert(convert::Args),
    /// LM loss / perplexity of a checkpoint, KD losses against a teacher, raw logits (libtorch).
    #[cfg(feature = "distill")]
    Eval(Box<eval::Args>),
}

impl Cli {
    /// Runs the parsed command.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Inspect(args) => inspect::run(args),
            Command::Pack(args) => pack::run(args),
            Command::Checksum(args) => checksum::run(args),
            Command::Data(args) => data::run(args),
            Command::Validate(args) => validate::run(args),
            Command::Diff(args) => diff::run(args),
            Command::Reshard(args) => reshard::run(args),
            Command::Convert(args) => convert::run(args),
            Command::Distill(args) => distill::run(args),
            #[cfg(feature = "distill")]
            Command::Eval(args) => eval::run(*args),
        }
    }
}

/// `--dtype` values: the torch names and the short spellings NeMo's scripts accept.
pub(crate) fn parse_dtype(s: &str) -> Result<Dtype, String> {
    let name = match s {
        "fp32" | "f32" | "32" => "float32",
        "fp16" | "f16" | "16" => "float16",
        "bf16" => "bfloat16",
        other => other,
    };
    match Dtype::from_torch_name(name) {
        Some(d @ (Dtype::F32 | Dtype::F16 | Dtype::BF16)) => Ok(d),
        _ => Err(format!(
            "unknown dtype `{s}` (use float32/fp32, float16/fp16 or bfloat16/bf16)"
        )),
    }
}

/// Prints a value as pretty JSON on stdout.
pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // As an io::Error, so a closed pipe (`| head`) is recognised in main.
    serde_json::to_writer_pretty(&mut out, value).map_err(std::io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

/// Prints a report: as JSON with `--json`, else its human rendering.
pub(crate) fn print_report<T: serde::Serialize>(
    json: bool,
    report: &T,
    render: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        return print_json(report);
    }
    use std::io::Write;
    write!(std::io::stdout().lock(), "{}", render(report))?;
    Ok(())
}

/// `nemo-tool ARGS` parsed to its subcommand, for the commands' parse tests.
#[cfg(test)]
pub(crate) fn parse(args: &[&str]) -> Result<Command, clap::Error> {
    let argv = std::iter::once("nemo-tool").chain(args.iter().copied());
    Cli::try_parse_from(argv).map(|cli| cli.command)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definitions_are_consistent() {
        Cli::command().debug_assert();
    }
}
