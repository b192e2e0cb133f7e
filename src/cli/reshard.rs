//! `nemo-tool reshard`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use nemo_tool::formats::torch::Dtype;
use nemo_tool::model::canonical::Canonical;
use nemo_tool::model::checkpoint::Checkpoint;
use nemo_tool::model::foreign::Format;
use nemo_tool::model::plan::{plan_reshard, ReshardOptions};
use nemo_tool::ops::reshard::{write, WriteOptions};

/// Change the tensor/pipeline parallel layout of a checkpoint, exactly and
/// without a GPU: reads any layout (single file, mp_rank_XX/,
/// tp_rank_XX_pp_rank_YYY/, torch_dist or zarr model_weights/) and writes the
/// per-rank layout NeMo loads at the target TP/PP, streaming every tensor from
/// the input with bounded memory. A Megatron-LM legacy folder (iter_*/mp_rank_TT[_PPP]/)
/// is written back as a Megatron-LM folder at the target TP/PP. Config keys tensor_model_parallel_size and
/// pipeline_model_parallel_size (and the others NeMo's script edits) are
/// rewritten; everything else, artifacts included, is kept byte for byte.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
nemo-tool reshard llama_tp1.nemo llama_tp2.nemo --tp 2\n  \
nemo-tool reshard llama_dist.nemo llama_tp4_pp2.nemo --tp 4 --pp 2\n  \
nemo-tool reshard model.nemo out.nemo --target_tensor_model_parallel_size 8 --dry-run\n  \
nemo-tool reshard megatron_ckpt/ megatron_tp4/ --tp 4   (Megatron-LM iter_*/mp_rank_*)\n\n\
Refuses a TP that does not divide the attention heads, the query groups (unless\n\
--allow-partial-query-groups) or the FFN size, and a PP that does not divide the layers.")]
pub struct Args {
    /// Input: a .nemo (tar or tar.gz) or an extracted folder.
    pub input: PathBuf,
    /// Output .nemo file.
    pub output: PathBuf,
    /// Target tensor-parallel size.
    #[arg(
        long = "tp",
        visible_alias = "target_tensor_model_parallel_size",
        alias = "target-tensor-model-parallel-size",
        value_name = "N"
    )]
    pub tp: u64,
    /// Target pipeline-parallel size.
    #[arg(
        long = "pp",
        visible_alias = "target_pipeline_model_parallel_size",
        alias = "target-pipeline-model-parallel-size",
        value_name = "M",
        default_value_t = 1
    )]
    pub pp: u64,
    /// Target expert-parallel size: only 1 for the per-rank layout reshard writes (every rank
    /// file holds every expert); for EP > 1 write a distributed checkpoint with
    /// `convert --to dist --ep E`.
    #[arg(long, value_name = "E", default_value_t = 1)]
    pub ep: u64,
    /// Print the plan (per output rank: tensors, source slices, bytes) and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the plan or the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// Do not fsync the output before renaming it into place: still atomic (never a
    /// partial file at OUTPUT), but not durable across a power loss. Faster like `cp`.
    #[arg(long)]
    pub no_sync: bool,
    /// Cast floating-point tensors (float32, float16, bfloat16); default keeps each dtype.
    #[arg(long, value_name = "D", value_parser = super::parse_dtype)]
    pub dtype: Option<Dtype>,
    /// Allow a TP that does not divide num_query_groups (loads in megatron-core >= 0.16 only).
    #[arg(long)]
    pub allow_partial_query_groups: bool,
    /// The true (unpadded) vocabulary size, when no tokenizer artifact in the archive says it.
    #[arg(long, value_name = "V")]
    pub vocab_size: Option<u64>,
}

/// Runs `reshard`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.ep != 1 {
        anyhow::bail!(
            "--ep {}: reshard writes per-rank files, which hold every expert on each rank (NeMo keeps expert-parallel models as distributed checkpoints); use `nemo-tool convert {} --to dist --ep {} OUT.nemo`",
            args.ep,
            args.input.display(),
            args.ep
        );
    }
    let ckpt = Checkpoint::open(&args.input)
        .with_context(|| format!("opening {}", args.input.display()))?;
    let canon =
        Canonical::new(&ckpt).with_context(|| format!("reading {}", args.input.display()))?;
    let opts = ReshardOptions {
        tp: args.tp,
        pp: args.pp,
        dtype: args.dtype,
        allow_partial_query_groups: args.allow_partial_query_groups,
        vocab_size: args.vocab_size,
    };
    let plan = plan_reshard(&canon, &opts).with_context(|| {
        format!(
            "cannot reshard {} to TP={} PP={}",
            args.input.display(),
            args.tp,
            args.pp
        )
    })?;
    if args.dry_run {
        if args.json {
            super::print_json(&plan)?;
        } else {
            print!("{}", plan.describe());
        }
        return Ok(ExitCode::SUCCESS);
    }
    // a Megatron-LM legacy folder reshards into a Megatron-LM folder
    if ckpt
        .source
        .as_ref()
        .is_some_and(|s| s.format == Format::MegatronLm && s.weights == "legacy")
    {
        drop(canon);
        drop(ckpt);
        let s = nemo_tool::ops::convert::to_mlm_with(&args.input, &args.output, &opts, args.force)
            .with_context(|| format!("resharding {}", args.input.display()))?;
        if args.json {
            super::print_json(&s)?;
        } else {
            for w in &s.warnings {
                eprintln!("warning: {w}");
            }
            eprintln!(
                "wrote {} (Megatron-LM, TP={} PP={}; {} tensors in {} files)",
                s.output.display(),
                s.tp,
                s.pp,
                s.tensors,
                s.files
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !args.json {
        for w in ckpt.warnings.iter().chain(&plan.warnings) {
            eprintln!("warning: {w}");
        }
    }
    let tty = std::io::stderr().is_terminal();
    let mut last = std::time::Instant::now();
    let mut bar = |done: u64, total: u64| {
        if last.elapsed().as_millis() < 100 && done < total {
            return;
        }
        last = std::time::Instant::now();
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        eprint!(
            "\rresharding: {:5.1}% ({} / {} MiB)",
            pct,
            done >> 20,
            total >> 20
        );
    };
    let wopts = WriteOptions {
        force: args.force,
        progress: if tty { Some(&mut bar) } else { None },
        no_sync: args.no_sync,
    };
    let summary = write(&canon, &plan, &args.output, wopts)
        .with_context(|| format!("writing {}", args.output.display()))?;
    if tty {
        eprintln!();
    }
    if args.json {
        super::print_json(&summary)?;
    } else {
        eprintln!(
            "wrote {} (TP={} PP={}: {} rank files, {} tensors, {} bytes in {:.2}s)",
            summary.output.display(),
            summary.tp,
            summary.pp,
            summary.rank_files,
            summary.tensors,
            summary.bytes,
            summary.seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use crate::cli::Command;

    fn parse(args: &[&str]) -> super::Args {
        let argv = [&["reshard"], args].concat();
        let Ok(Command::Reshard(a)) = crate::cli::parse(&argv) else {
            panic!("not reshard")
        };
        a
    }

    #[test]
    fn nemo_spellings_are_accepted() {
        let a = parse(&["in", "out", "--tp", "2"]);
        assert_eq!((a.tp, a.pp), (2, 1));
        let a = parse(&[
            "in",
            "out",
            "--target_tensor_model_parallel_size",
            "4",
            "--target_pipeline_model_parallel_size",
            "2",
        ]);
        assert_eq!((a.tp, a.pp), (4, 2));
        let a = parse(&[
            "in",
            "out",
            "--target-tensor-model-parallel-size",
            "8",
            "--target-pipeline-model-parallel-size",
            "1",
            "--dtype",
            "bf16",
        ]);
        assert_eq!((a.tp, a.pp), (8, 1));
        assert_eq!(a.dtype, Some(nemo_tool::formats::torch::Dtype::BF16));
        let bad = |args: &[&str]| crate::cli::parse(&[&["reshard"], args].concat()).is_err();
        assert!(bad(&["in", "out"]));
        assert!(bad(&["in", "out", "--tp", "2", "--dtype", "int8"]));
    }
}
