//! `nemo-tool convert`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use nemo_tool::formats::torch::Dtype;
use nemo_tool::ops::convert::{self, FromHf, ToHf};

/// Convert between Hugging Face Llama-family folders and .nemo, and between
/// the per-rank and distributed (torch_dist) .nemo weight layouts. Tensors
/// stream from the memory-mapped input into the output (bounded memory);
/// dtypes are kept unless --dtype; tokenizer files travel byte for byte
/// (as `<32hex>_<name>` artifacts referenced with `nemo:` in the config).
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
nemo-tool convert --from hf Llama-3.1-8B/ llama.nemo --tp 2\n  \
nemo-tool convert llama.nemo --to hf Llama-hf/ --shard-size 2GB\n  \
nemo-tool convert llama.nemo --to dist llama_dist.nemo\n  \
nemo-tool convert mixtral.nemo --to dist --ep 4 mixtral_ep4.nemo\n  \
nemo-tool convert llama_dist.nemo --to per-rank --tp 4 llama_tp4.nemo\n\n\
HF -> .nemo writes the local-spec mcore keys (transformer_engine: false), QKV\n\
interleaved per query group, fc1 = [gate; up], the vocabulary padded as NeMo pads\n\
it. .nemo -> HF trims padded rows to the true vocabulary (override_vocab_size or\n\
the tokenizer artifact; kept whole, with a warning, when neither says).")]
pub struct Args {
    /// Input: an HF model folder (with --from hf) or a .nemo (tar, tar.gz or folder).
    pub input: PathBuf,
    /// Output: a .nemo file, or a folder with --to hf.
    pub output: PathBuf,
    /// The input format: `hf` for a Hugging Face folder (default: a .nemo).
    #[arg(long, value_name = "FORMAT", value_parser = ["hf", "nemo"], default_value = "nemo")]
    pub from: String,
    /// The output format: `nemo` (per-rank, with --from hf), `hf`, `dist` or `per-rank`;
    /// `nemo1` is `per-rank` (a NeMo 1 `.nemo`, e.g. from a NeMo 2 or Megatron-LM folder);
    /// `nemo2` writes a NeMo 2 folder (`context/` + `weights/`); `mlm` a Megatron-LM
    /// checkpoint folder (`iter_*/mp_rank_TT[_PPP]/model_optim_rng.pt`) at --tp x --pp.
    #[arg(long, value_name = "FORMAT", value_parser = ["nemo", "nemo1", "nemo2", "mlm", "hf", "dist", "per-rank"])]
    pub to: Option<String>,
    /// Output tensor-parallel size (.nemo outputs).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub tp: u64,
    /// Output pipeline-parallel size (.nemo outputs).
    #[arg(long, value_name = "M", default_value_t = 1)]
    pub pp: u64,
    /// With --to dist: the expert-parallel size written to the config
    /// (expert_model_parallel_size; the experts are stored whole either way).
    #[arg(long, value_name = "E")]
    pub ep: Option<u64>,
    /// Cast floating-point tensors (float32/fp32, float16/fp16, bfloat16/bf16).
    #[arg(long, value_name = "D", value_parser = super::parse_dtype)]
    pub dtype: Option<Dtype>,
    /// Largest safetensors shard with --to hf (bytes, or with KB/MB/GB/KiB/MiB/GiB).
    #[arg(long, value_name = "SIZE", default_value = "5GB", value_parser = parse_size)]
    pub shard_size: u64,
    /// make_vocab_size_divisible_by for --from hf (default: the largest power of two
    /// up to 128 dividing the vocabulary, as NeMo's converter picks it).
    #[arg(long, value_name = "M")]
    pub vocab_divisible_by: Option<u64>,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// With --from hf: do not fsync the output before renaming it into place: still
    /// atomic (never a partial file at OUTPUT), but not durable across a power loss.
    /// Faster like `cp`.
    #[arg(long)]
    pub no_sync: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `5GB` = 5·10⁹ (as transformers counts), `5GiB` = 5·2³⁰, plain bytes.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("bad size `{s}`"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024f64.powi(2),
        "GIB" => 1024f64.powi(3),
        "TIB" => 1024f64.powi(4),
        _ => return Err(format!("bad size unit in `{s}`")),
    };
    let v = n * mult;
    if !(1.0..1.8e19).contains(&v) {
        return Err(format!("size `{s}` out of range"));
    }
    Ok(v as u64)
}

/// Runs `convert`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let to = args.to.as_deref();
    if args.no_sync && args.from != "hf" {
        bail!("--no-sync is only for --from hf");
    }
    if args.ep.is_some() && to != Some("dist") {
        bail!(
            "--ep is for --to dist: NeMo keeps expert-parallel models as distributed checkpoints; per-rank and HF outputs hold every expert whole"
        );
    }
    if to == Some("nemo2") && (args.dtype.is_some() || args.tp != 1 || args.pp != 1) {
        bail!("--to nemo2 writes a distributed checkpoint (it loads at any TP); drop --tp/--pp/--dtype");
    }
    let from_hf = FromHf {
        tp: args.tp,
        pp: args.pp,
        dtype: args.dtype,
        vocab_divisor: args.vocab_divisible_by,
        force: args.force,
        no_sync: args.no_sync,
    };
    let summary = match (args.from.as_str(), to) {
        ("hf", None | Some("nemo") | Some("per-rank")) => {
            convert::hf_to_nemo(&args.input, &args.output, &from_hf)
        }
        ("hf", Some(to @ ("nemo2" | "mlm"))) => {
            let h = convert::hf_checkpoint(&args.input, &from_hf)?;
            let mut s = if to == "nemo2" {
                convert::write_nemo2(&h.ck, &args.output, args.force)
            } else {
                convert::write_mlm(
                    &h.ck,
                    &args.output,
                    &nemo_tool::model::plan::ReshardOptions {
                        tp: args.tp,
                        pp: args.pp,
                        dtype: args.dtype,
                        allow_partial_query_groups: false,
                        vocab_size: Some(h.vocab),
                    },
                    args.force,
                )
            }
            .with_context(|| format!("converting {}", args.input.display()))?;
            s.warnings.splice(0..0, h.warnings);
            Ok(s)
        }
        ("hf", Some(other)) => bail!("--from hf writes a .nemo, a NeMo 2 or a Megatron-LM folder; --to {other} is not possible"),
        (_, Some("hf")) => convert::nemo_to_hf(
            &args.input,
            &args.output,
            &ToHf {
                shard_size: args.shard_size,
                dtype: args.dtype,
                force: args.force,
            },
        ),
        (_, Some("dist")) => {
            if args.dtype.is_some() || args.tp != 1 || args.pp != 1 {
                bail!("--to dist keeps the model as it is (it loads at any TP); drop --tp/--pp/--dtype");
            }
            convert::nemo_to_dist(&args.input, &args.output, args.ep, args.force)
        }
        (_, Some("nemo2")) => convert::to_nemo2(&args.input, &args.output, args.force),
        (_, Some("mlm")) => convert::to_mlm(
            &args.input,
            &args.output,
            args.tp,
            args.pp,
            args.dtype,
            args.force,
        ),
        (_, Some("per-rank" | "nemo1")) => convert::nemo_to_per_rank(
            &args.input,
            &args.output,
            args.tp,
            args.pp,
            args.dtype,
            args.force,
        ),
        (_, _) => bail!(
            "say what to convert to: --to hf, dist, per-rank (nemo1), nemo2 or mlm (or --from hf)"
        ),
    }
    .with_context(|| format!("converting {}", args.input.display()))?;
    if args.json {
        super::print_json(&summary)?;
    } else {
        for w in &summary.warnings {
            eprintln!("warning: {w}");
        }
        eprintln!(
            "wrote {} ({}; TP={} PP={}; {} tensors in {} files; vocab {} in {} rows)",
            summary.output.display(),
            summary.direction,
            summary.tp,
            summary.pp,
            summary.tensors,
            summary.files,
            summary.vocab.0,
            summary.vocab.1
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse, Command};

    #[test]
    fn parses() {
        let args = [
            "convert", "--from", "hf", "in", "out.nemo", "--tp", "2", "--dtype", "bf16",
        ];
        let Ok(Command::Convert(a)) = parse(&args) else {
            panic!("not convert")
        };
        assert_eq!(
            (a.from.as_str(), a.tp, a.dtype),
            ("hf", 2, Some(Dtype::BF16))
        );
        assert_eq!(a.shard_size, 5_000_000_000);
        assert!(parse(&["convert", "in", "out", "--to", "x"]).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("1.5MB"), Ok(1_500_000));
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("0").is_err());
    }
}
