//! `cargo xtask demo`: runs nemo-tool's main job on the built-in tiny fixtures, step by step.
//!
//! Steps are data ([`STEPS`]): `nemo-tool` arguments, where `{out}` stands for the demo's output
//! folder (`<target>/demo`), or a check that two checksum listings are identical.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::util::{self, step};

/// One demo step.
enum Step {
    /// Run `nemo-tool` with these arguments.
    Run(&'static [&'static str]),
    /// `nemo-tool checksum` both paths; every tensor must have the same sum.
    SameTensors(&'static str, &'static str),
}

/// The demo, in order.
const STEPS: &[(&str, Step)] = &[
    (
        "layout-independent checksums: the model digest of the TP=2 .nemo ...",
        Step::Run(&["checksum", "fixtures/mcore/llama/nemo/tiny_llama_tp2.nemo"]),
    ),
    (
        "... equals the torch_dist one's, and diff finds no difference across layouts",
        Step::Run(&[
            "diff",
            "fixtures/mcore/llama/nemo/tiny_llama_tp2.nemo",
            "fixtures/mcore/llama/nemo/tiny_llama_dist_tp1.nemo",
        ]),
    ),
    (
        "validate it, reading every byte (CRCs, NaN/Inf, checksums)",
        Step::Run(&[
            "validate",
            "fixtures/mcore/llama/nemo/tiny_llama_dist_tp1.nemo",
            "--deep",
        ]),
    ),
    (
        "inspect a TP=2 .nemo written by megatron-core 0.16.1 (tiny Llama, GQA, SwiGLU)",
        Step::Run(&["inspect", "fixtures/mcore/llama/nemo/tiny_llama_tp2.nemo"]),
    ),
    (
        "inspect a distributed (torch_dist) .nemo, listing every tensor and its chunks",
        Step::Run(&[
            "inspect",
            "fixtures/mcore/llama/nemo/tiny_llama_dist_tp1.nemo",
            "--tensors",
        ]),
    ),
    (
        "write it back with our own torch_dist writer",
        Step::Run(&[
            "pack",
            "fixtures/mcore/llama/nemo/tiny_llama_dist_tp1.nemo",
            "{out}/tiny_llama_dist_repacked.nemo",
            "--force",
        ]),
    ),
    (
        "read both and compare every tensor's sha256",
        Step::SameTensors(
            "fixtures/mcore/llama/nemo/tiny_llama_dist_tp1.nemo",
            "{out}/tiny_llama_dist_repacked.nemo",
        ),
    ),
    (
        "pack the TP=2 fixture's extracted rank folders (no config: architecture unknown)",
        Step::Run(&[
            "pack",
            "fixtures/mcore/llama/tp2",
            "{out}/tp2_weights_only.nemo",
            "--force",
        ]),
    ),
    (
        "and compare it with megatron-core's own TP=2 shards",
        Step::SameTensors("fixtures/mcore/llama/tp2", "{out}/tp2_weights_only.nemo"),
    ),
];

fn nemo_tool(args: &[String]) -> std::process::Command {
    let mut cmd = util::cargo();
    cmd.args(["run", "--quiet", "--bin", "nemo-tool", "--"])
        .args(args);
    cmd
}

fn checksums(path: &str) -> Result<String> {
    let out = nemo_tool(&[
        "checksum".to_string(),
        "--stored".to_string(),
        path.to_string(),
    ])
    .output()?;
    if !out.status.success() {
        bail!("checksum {path}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Entry point for `cargo xtask demo`.
pub fn run(args: &[String]) -> Result<()> {
    if let Some(a) = args.first() {
        bail!("demo: unexpected argument {a:?}");
    }
    let out_dir = util::target_dir().join("demo");
    std::fs::create_dir_all(&out_dir)?;
    let out = |s: &str| s.replace("{out}", &out_dir.display().to_string());
    for (i, (title, what)) in STEPS.iter().enumerate() {
        step(&format!("[{}/{}] {title}", i + 1, STEPS.len()));
        match what {
            Step::Run(tool_args) => {
                let tool_args: Vec<String> = tool_args.iter().map(|a| out(a)).collect();
                println!("$ nemo-tool {}", tool_args.join(" "));
                let code = util::status_quiet(&mut nemo_tool(&tool_args))
                    .with_context(|| format!("demo step {title:?}"))?;
                if code != 0 {
                    bail!("demo step {title:?}: nemo-tool exited with code {code}");
                }
            }
            Step::SameTensors(a, b) => {
                let (a, b) = (out(a), out(b));
                println!("$ nemo-tool checksum --stored {a}\n$ nemo-tool checksum --stored {b}");
                let (sa, sb) = (checksums(&a)?, checksums(&b)?);
                // Members differ between layouts of the same weights; compare per key.
                let key = |s: &str| -> Vec<String> {
                    let mut v: Vec<String> = s
                        .lines()
                        .map(|l| {
                            let (sum, name) = l.split_once("  ").unwrap_or((l, ""));
                            format!(
                                "{} {sum}",
                                name.rsplit_once(':').map(|x| x.1).unwrap_or(name)
                            )
                        })
                        .collect();
                    v.sort();
                    v
                };
                if key(&sa) != key(&sb) {
                    bail!("demo step {title:?}: tensors differ between {a} and {b}");
                }
                println!("identical: {} tensors, bit for bit", sa.lines().count());
            }
        }
    }
    println!(
        "\ndemo: all {} steps ran; outputs in {}",
        STEPS.len(),
        out_dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Step, STEPS};

    #[test]
    fn step_inputs_exist() {
        let root = crate::util::root();
        for (title, what) in STEPS {
            let paths: Vec<&str> = match what {
                Step::Run(args) => args.to_vec(),
                Step::SameTensors(a, b) => vec![a, b],
            };
            for a in paths.iter().filter(|a| a.starts_with("fixtures/")) {
                assert!(
                    super::Path::new(&root.join(a)).exists(),
                    "{title}: missing {a}"
                );
            }
        }
    }
}
