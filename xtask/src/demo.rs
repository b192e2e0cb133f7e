//! `cargo xtask demo`: runs nemo-tool's main job on the built-in tiny fixtures, step by step.
//!
//! To add a step, add a `(title, args)` line to [`STEPS`]; arguments are passed to
//! `nemo-tool` as-is and paths are relative to the repository root.

use anyhow::{Context, Result};

use crate::util::{self, step};

/// The demo, in order: a title and the `nemo-tool` arguments.
const STEPS: &[(&str, &[&str])] = &[(
    "inspect a TP=2 .nemo (megatron-core 0.16.1 tiny Llama)",
    &["inspect", "fixtures/mcore/llama/nemo/tiny_llama_tp2.nemo"],
)];

/// Entry point for `cargo xtask demo`.
pub fn run(args: &[String]) -> Result<()> {
    if let Some(a) = args.first() {
        anyhow::bail!("demo: unexpected argument {a:?}");
    }
    for (i, (title, tool_args)) in STEPS.iter().enumerate() {
        step(&format!("[{}/{}] {title}", i + 1, STEPS.len()));
        println!("$ nemo-tool {}", tool_args.join(" "));
        let code = util::status_quiet(
            util::cargo()
                .args(["run", "--quiet", "--bin", "nemo-tool", "--"])
                .args(*tool_args),
        )
        .with_context(|| format!("demo step {title:?}"))?;
        if code != 0 {
            anyhow::bail!("demo step {title:?}: nemo-tool exited with code {code}");
        }
    }
    println!("\ndemo: all {} steps ran", STEPS.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::STEPS;

    #[test]
    fn step_inputs_exist() {
        let root = crate::util::root();
        for (title, args) in STEPS {
            for a in args.iter().filter(|a| a.starts_with("fixtures/")) {
                assert!(root.join(a).exists(), "{title}: missing {a}");
            }
        }
    }
}
