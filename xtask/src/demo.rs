//! `cargo xtask demo`: runs nemo-tool's main job on the built-in tiny fixtures, step by step.
//!
//! Steps are data ([`STEPS`]): `nemo-tool` arguments, where `{out}` stands for the demo's output
//! folder (`<target>/demo`), a check that two checksum listings are identical, or a file the
//! demo writes. The demo first sets up the pinned `.venv` exactly as `cargo xtask test` does
//! ([`crate::test::pinned_venv`]), then builds nemo-tool once with `--features distill` against
//! the venv's libtorch, so every step runs: none is skipped, so none can depend on a skipped one.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::util::{self, step};

/// One demo step.
enum Step {
    /// Run `nemo-tool` with these arguments.
    Run(&'static [&'static str]),
    /// `nemo-tool checksum` both paths; every tensor must have the same sum.
    SameTensors(&'static str, &'static str),
    /// Write [`text_docs`] (JSON Lines of raw text) to this path.
    WriteText(&'static str),
    /// Remove a folder left by an earlier demo (so the distillation starts afresh).
    Clean(&'static str),
    /// A file the previous steps must have written; its path is printed.
    Show(&'static str, &'static str),
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
    (
        "write 400 documents of raw text (JSON Lines)",
        Step::WriteText("{out}/corpus.jsonl"),
    ),
    (
        "tokenize them with the tiny model's SentencePiece tokenizer into a Megatron dataset (EOD = its EOS)",
        Step::Run(&[
            "data",
            "make",
            "--input",
            "{out}/corpus.jsonl",
            "--tokenizer",
            "fixtures/mcore/tokenizer/tokenizer.model",
            "--append-eod",
            "--output-prefix",
            "{out}/corpus",
            "--force",
        ]),
    ),
    ("start the distillation afresh", Step::Clean("{out}/distill_exp")),
    (
        "distill a 1-layer student (from the config) from the 2-layer tiny teacher: 300 steps on CPU",
        Step::Run(&[
            "distill",
            "model.restore_from_path=None",
            "model.kd_teacher_restore_from_path=fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo",
            "model.data.data_prefix=[1.0,{out}/corpus_text_document]",
            "model.data.splits_string=90,10,0",
            "model.data.seq_length=64",
            "model.nemo_path={out}/student_tp1.nemo",
            "model.num_layers=1",
            "model.hidden_size=32",
            "model.ffn_hidden_size=64",
            "model.num_attention_heads=4",
            "model.num_query_groups=2",
            "model.make_vocab_size_divisible_by=32",
            "model.micro_batch_size=4",
            "model.global_batch_size=8",
            "model.optim.lr=1e-2",
            "model.optim.sched.warmup_steps=10",
            "model.optim.sched.min_lr=1e-3",
            "trainer.max_steps=300",
            "trainer.val_check_interval=50",
            "trainer.limit_val_batches=4",
            "trainer.log_every_n_steps=25",
            "exp_manager.explicit_log_dir={out}/distill_exp",
        ]),
    ),
    (
        "reshard the distilled student to TP=2",
        Step::Run(&[
            "reshard",
            "{out}/student_tp1.nemo",
            "{out}/student_tp2.nemo",
            "--tp",
            "2",
            "--force",
        ]),
    ),
    (
        "inspect it",
        Step::Run(&["inspect", "{out}/student_tp2.nemo"]),
    ),
    (
        "the train and validation KD loss curves",
        Step::Show("plot", "{out}/distill_exp/kd_loss.png"),
    ),
];

/// `n` deterministic documents of token ids in 3..100 (a noisy recurrence, so a student has
/// something to learn), one JSON list per line.
pub fn token_docs(n: usize) -> String {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut out = String::new();
    for d in 0..n {
        let len = 20 + (d * 37) % 100;
        let mut t = (d as u64 * 13) % 97 + 3;
        let mut ids = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            t = (t * 7 + (x >> 62) + 1) % 97 + 3;
            ids.push(t.to_string());
        }
        out.push('[');
        out.push_str(&ids.join(","));
        out.push_str("]\n");
    }
    out
}

/// `n` deterministic documents of English-like text (sentences from a small grammar, so a
/// student has something to learn), one JSON object `{"text": ...}` per line.
pub fn text_docs(n: usize) -> String {
    const WHO: &[&str] = &[
        "the teacher",
        "a student",
        "the model",
        "every layer",
        "the optimizer",
    ];
    const DOES: &[&str] = &["learns", "reads", "writes", "shards", "checks", "trains"];
    const WHAT: &[&str] = &[
        "the weights",
        "a tensor",
        "the data",
        "its gradients",
        "one checkpoint",
    ];
    const HOW: &[&str] = &[
        "quickly",
        "on the cpu",
        "at every step",
        "in order",
        "again",
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut pick = |m: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % m as u64) as usize
    };
    let mut out = String::new();
    for d in 0..n {
        let mut text = String::new();
        for s in 0..(2 + d % 6) {
            if s > 0 {
                text.push(' ');
            }
            let who = pick(WHO.len());
            // the verb and object follow from the subject most of the time: learnable
            let does = if pick(4) == 0 {
                pick(DOES.len())
            } else {
                who % DOES.len()
            };
            let what = if pick(4) == 0 {
                pick(WHAT.len())
            } else {
                (who + does) % WHAT.len()
            };
            text.push_str(&format!(
                "{} {} {} {}.",
                WHO[who],
                DOES[does],
                WHAT[what],
                HOW[pick(HOW.len())]
            ));
        }
        out.push_str(&format!("{{\"text\": \"{text}\"}}\n"));
    }
    out
}

/// `tool ARGS`, run from the repository root (the steps name fixtures relative to it), one
/// thread per process: the demo shares small machines well.
fn nemo_tool(tool: &Path, args: &[String]) -> Command {
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .current_dir(util::root())
        .env("OMP_NUM_THREADS", "1");
    cmd
}

/// Runs `cmd`, passing its stderr on line by line, and returns its exit code (-1 if killed by a
/// signal). Through a pipe, `distill` logs its loss every `trainer.log_every_n_steps` steps as
/// lines, where on a terminal it would redraw one progress line.
fn run_logged(cmd: &mut Command) -> Result<i32> {
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{}`", util::show(cmd)))?;
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines() {
            eprintln!("{}", line.context("reading nemo-tool's stderr")?);
        }
    }
    let st = child.wait().context("waiting for nemo-tool")?;
    Ok(st.code().unwrap_or(-1))
}

fn checksums(tool: &Path, path: &str) -> Result<String> {
    let out = nemo_tool(tool, &["checksum".into(), "--stored".into(), path.into()])
        .output()
        .with_context(|| format!("running nemo-tool checksum --stored {path}"))?;
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
    let venv = crate::test::pinned_venv()?;
    step("build nemo-tool with --features distill (libtorch from the venv)");
    let tool = crate::test::build_distill_tool(&venv, false)?;
    let out_dir = util::target_dir().join("demo");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out = |s: &str| s.replace("{out}", &out_dir.display().to_string());
    for (i, (title, what)) in STEPS.iter().enumerate() {
        step(&format!("[{}/{}] {title}", i + 1, STEPS.len()));
        match what {
            Step::Run(tool_args) => {
                let tool_args: Vec<String> = tool_args.iter().map(|a| out(a)).collect();
                println!("$ OMP_NUM_THREADS=1 nemo-tool {}", tool_args.join(" "));
                let code = run_logged(&mut nemo_tool(&tool, &tool_args))
                    .with_context(|| format!("demo step {title:?}"))?;
                if code != 0 {
                    bail!("demo step {title:?}: nemo-tool exited with code {code}");
                }
            }
            Step::SameTensors(a, b) => {
                let (a, b) = (out(a), out(b));
                println!("$ nemo-tool checksum --stored {a}\n$ nemo-tool checksum --stored {b}");
                let (sa, sb) = (checksums(&tool, &a)?, checksums(&tool, &b)?);
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
            Step::WriteText(path) => {
                let p = out(path);
                std::fs::write(&p, text_docs(400)).with_context(|| format!("writing {p}"))?;
                println!("wrote {p}");
            }
            Step::Clean(path) => {
                let p = out(path);
                if Path::new(&p).exists() {
                    std::fs::remove_dir_all(&p).with_context(|| format!("removing {p}"))?;
                    println!("removed {p}");
                }
            }
            Step::Show(what, path) => {
                let p = out(path);
                if !Path::new(&p).is_file() {
                    bail!("demo step {title:?}: {p} was not written");
                }
                println!("{what}: {p}");
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
                Step::WriteText(_) | Step::Clean(_) | Step::Show(..) => vec![],
            };
            let paths = paths
                .iter()
                .map(|a| a.split_once('=').map_or(*a, |kv| kv.1));
            for a in paths.filter(|a| a.starts_with("fixtures/")) {
                assert!(
                    super::Path::new(&root.join(a)).exists(),
                    "{title}: missing {a}"
                );
            }
        }
    }
}
