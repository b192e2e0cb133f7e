//! Writes a synthetic Megatron-Core GPT `.nemo` (see `nemo_tool::testkit::synth`).
//!
//! ```text
//! cargo run --release --example synth -- --shape llama-70b --tp 8 --fill sparse --out big.nemo
//! cargo run --release --example synth -- --shape tiny --tp 2 --pp 2 --fill random:7 --out t.nemo
//! ```

use std::path::PathBuf;

use nemo_tool::testkit::synth::{write_nemo, Fill, Spec};

fn main() -> anyhow::Result<()> {
    let mut spec = Spec::tiny();
    let (mut tp, mut pp, mut fill, mut out) = (1, 1, Fill::Random(1), None);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--shape" => {
                spec = match val()?.as_str() {
                    "llama-70b" => Spec::llama_70b(),
                    "tiny" => Spec::tiny(),
                    other => anyhow::bail!("unknown shape {other} (llama-70b, tiny)"),
                }
            }
            "--layers" => spec.layers = val()?.parse()?,
            "--hidden" => spec.hidden = val()?.parse()?,
            "--ffn" => spec.ffn = val()?.parse()?,
            "--heads" => spec.heads = val()?.parse()?,
            "--groups" => spec.groups = val()?.parse()?,
            "--kv-channels" => spec.kv_channels = val()?.parse()?,
            "--vocab" => spec.vocab = val()?.parse()?,
            "--dtype" => {
                let v = val()?;
                spec.dtype = nemo_tool::formats::torch::Dtype::from_torch_name(&v)
                    .ok_or_else(|| anyhow::anyhow!("unknown dtype {v}"))?
            }
            "--tp" => tp = val()?.parse()?,
            "--pp" => pp = val()?.parse()?,
            "--fill" => {
                let v = val()?;
                fill = match v.split_once(':') {
                    _ if v == "sparse" => Fill::Sparse,
                    Some(("random", seed)) => Fill::Random(seed.parse()?),
                    _ => anyhow::bail!("--fill sparse | random:SEED"),
                }
            }
            "--out" => out = Some(PathBuf::from(val()?)),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let out = out.ok_or_else(|| anyhow::anyhow!("--out is required"))?;
    write_nemo(&spec, tp, pp, fill, &out)?;
    println!("{}", out.display());
    Ok(())
}
