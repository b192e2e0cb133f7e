//! `cargo xtask bench <name>`: benchmarks that time nemo-tool against its baseline in the same
//! run (see docs/ and style.md "Benchmarks"). Each bench is one entry of [`BENCHES`].

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};

/// A bench: its name, a one-line description, and its entry point (gets the remaining args).
type Bench = (&'static str, &'static str, fn(&[String]) -> Result<()>);

/// Registered benches.
const BENCHES: &[Bench] = &[
    (
        "inspect",
        "inspect a sparse Llama-70B-shaped TP8 .nemo (>100 GiB): time and bytes read",
        inspect,
    ),
    (
        "convert",
        "HF -> .nemo of a 2.2 GB bf16 model: time against cp, peak RSS",
        crate::bench_convert::convert,
    ),
    (
        "reshard",
        "reshard a 2.2 GB bf16 Llama-shaped TP2 .nemo to TP4: time vs cp and a PyTorch baseline, peak RSS",
        crate::bench_reshard::reshard,
    ),
    (
        "data",
        "data make --tokenizer vs Megatron's preprocessing in Python on a generated corpus: tokens/s at 2 workers, peak RSS",
        crate::bench_data::data,
    ),
    (
        "distill",
        "nemo-tool distill vs a PyTorch eager reference (tests/bench/distill_reference.py): tokens/s, peak RSS",
        distill,
    ),
    (
        "teacher-cache",
        "the bench distill job with ModelOpt's top-k loss from the live teacher and from an offline teacher cache: tokens/s, cache size",
        crate::bench_cache::teacher_cache,
    ),
    (
        "recompute",
        "nemo-tool distill of a ~44M student with and without full activation recompute: peak RSS, tokens/s",
        crate::bench_recompute::recompute,
    ),
];

/// Builds the release binary and the bench examples.
pub(crate) fn build_release() -> Result<PathBuf> {
    crate::util::run(crate::util::cargo().args([
        "build",
        "--release",
        "--bin",
        "nemo-tool",
        "--example",
        "synth",
        "--example",
        "inspect_io",
    ]))?;
    Ok(crate::util::target_dir().join("release"))
}

/// The number after `"key": ` in a one-line JSON object.
pub(crate) fn json_number(json: &str, key: &str) -> Option<f64> {
    let k = format!("\"{key}\": ");
    let rest = &json[json.find(&k)? + k.len()..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

/// `cargo xtask bench inspect [--regen]`: generates (once) a Llama-70B-shaped
/// TP8 checkpoint as a sparse file, then measures `nemo-tool inspect` on it:
/// wall time of the CLI (median of 5 warm runs) and, with the archive evicted
/// from the page cache first, the bytes the kernel had to read for it, split
/// into tensor payload and metadata (mincore after the run).
fn inspect(args: &[String]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    use std::time::Instant;
    let release = build_release()?;
    let dir = crate::util::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("llama70b_tp8.nemo");
    if !path.exists() || args.iter().any(|a| a == "--regen") {
        crate::util::step("generating a sparse Llama-70B-shaped TP8 .nemo (once; about a minute)");
        crate::util::run(Command::new(release.join("examples/synth")).args([
            "--shape".as_ref(),
            "llama-70b".as_ref(),
            "--tp".as_ref(),
            "8".as_ref(),
            "--fill".as_ref(),
            "sparse".as_ref(),
            "--out".as_ref(),
            path.as_os_str(),
        ]))?;
    }
    let md = std::fs::metadata(&path)?;
    let apparent = md.len();
    let on_disk = md.blocks() * 512;
    let tool = release.join("nemo-tool");
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let out = Command::new(&tool)
            .arg("inspect")
            .arg(&path)
            .arg("--json")
            .output()?;
        times.push(t.elapsed().as_secs_f64());
        if !out.status.success() {
            bail!("inspect failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let io = Command::new(release.join("examples/inspect_io"))
        .arg(&path)
        .output()?;
    if !io.status.success() {
        bail!("inspect_io failed: {}", String::from_utf8_lossy(&io.stderr));
    }
    let line = String::from_utf8_lossy(&io.stdout).trim().to_string();
    let num = |k: &str| json_number(&line, k).unwrap_or(f64::NAN);
    let (cold, read, payload, tensors) = (
        num("seconds"),
        num("bytes_read"),
        num("payload_bytes_read"),
        num("tensors"),
    );
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let mib = |b: f64| b / (1u64 << 20) as f64;
    crate::util::step("bench inspect");
    println!(
        "archive            {} ({:.1} GiB apparent, {:.1} MiB on disk, {tensors} tensors, TP8)",
        path.display(),
        gib(apparent as f64),
        mib(on_disk as f64)
    );
    println!(
        "inspect, warm      median {median:.3} s over 5 runs (min {:.3} s)   target < 1 s: {}",
        times[0],
        verdict(median < 1.0)
    );
    println!(
        "inspect, cold      {cold:.3} s in-process after evicting the archive from the page cache"
    );
    println!("bytes read, cold   {:.2} MiB in all; tensor payload {:.1} KiB of {:.1} GiB ({:.2e} of it)   target < 1 MiB: {}",
        mib(read), payload / 1024.0, gib(num("payload_bytes_total")), payload / num("payload_bytes_total"), verdict(payload < (1u64 << 20) as f64));
    println!("raw: {line}");
    if median >= 1.0 || payload >= (1u64 << 20) as f64 {
        bail!("bench inspect: a target was missed");
    }
    Ok(())
}

/// The number after `key=` in a `key=value ...` line.
pub(crate) fn kv_number(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?
        .parse()
        .ok()
}

/// Alternating rounds of `bench distill` (each side keeps its best).
pub(crate) const ROUNDS: u32 = 3;

/// The bench job: the tiny teacher fixture, a smaller student from the config.
pub(crate) struct DistillShape {
    pub(crate) layers: u32,
    pub(crate) hidden: u32,
    pub(crate) ffn: u32,
    pub(crate) heads: u32,
    pub(crate) groups: u32,
    pub(crate) seq: u32,
    pub(crate) micro: u32,
    pub(crate) global: u32,
    pub(crate) steps: u32,
}

pub(crate) const SHAPE: DistillShape = DistillShape {
    layers: 1,
    hidden: 32,
    ffn: 64,
    heads: 4,
    groups: 2,
    seq: 128,
    micro: 4,
    global: 8,
    steps: 40,
};

/// `cargo xtask bench distill [--threads N] [--seq N] [--dp N] [--debug]`: the same distillation
/// job (teacher fixture, student shape, KL loss, AdamW, clipping, cosine schedule, batch shapes,
/// threads) through `nemo-tool distill` (release build, `--features distill`) and through the
/// PyTorch eager reference, in the same run; prints tokens/s and peak RSS of both. `--dp N`
/// runs both data-parallel over N processes (ours: `trainer.devices=N`; the reference: torch
/// DDP over Gloo), each process on `--threads` threads; rank 0's figures are reported.
fn distill(args: &[String]) -> Result<()> {
    use anyhow::Context;
    let mut threads = 1u32;
    let mut release = true;
    let mut seq = SHAPE.seq;
    let mut dp = 1u32;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--threads" => {
                threads = it
                    .next()
                    .and_then(|t| t.parse().ok())
                    .context("--threads needs a number")?
            }
            "--debug" => release = false,
            "--seq" => {
                seq = it
                    .next()
                    .and_then(|t| t.parse().ok())
                    .context("--seq needs a number")?
            }
            "--dp" => {
                dp = it
                    .next()
                    .and_then(|t| t.parse().ok())
                    .filter(|d| *d >= 1)
                    .context("--dp needs a number >= 1")?
            }
            other => bail!("bench distill: unknown option {other:?}"),
        }
    }
    let root = crate::util::root();
    let venv = root.join(".venv");
    let python = crate::test::venv_python(&venv);
    let tool = crate::test::build_distill_tool(&venv, release)?;
    let dir = crate::util::target_dir().join("bench/distill");
    std::fs::create_dir_all(&dir)?;
    let prefix = bench_data(&tool, &dir)?;
    let teacher = root.join("fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo");
    let s = &DistillShape { seq, ..SHAPE };
    // alternate the two, ROUNDS times, and keep each one's best round: a shared machine's
    // load drifts, and alternating exposes both to the same drift
    let mut best_ours: Option<(f64, String)> = None;
    let mut best_ref: Option<(f64, String)> = None;
    for round in 1..=ROUNDS {
        crate::util::step(&format!("nemo-tool distill ({threads} thread(s))"));
        let mut ours_cmd = Command::new(&tool);
        ours_cmd
            .env("OMP_NUM_THREADS", threads.to_string())
            .args(distill_job(&teacher, &prefix, &dir, s))
            .arg(format!("trainer.devices={dp}"));
        let ours = run_ranks(&mut ours_cmd, dp)?;
        let ours_text = String::from_utf8_lossy(&ours.stdout).into_owned();
        if !ours.status.success() {
            bail!(
                "nemo-tool distill failed: {}{}",
                ours_text,
                String::from_utf8_lossy(&ours.stderr)
            );
        }
        let ours_line = ours_text
            .lines()
            .find(|l| l.starts_with("distill: done"))
            .context("no summary line from nemo-tool distill")?
            .to_string();
        crate::util::step(&format!("PyTorch eager reference ({threads} thread(s))"));
        let mut ref_cmd = Command::new(&python);
        ref_cmd
            .env("OMP_NUM_THREADS", threads.to_string())
            .arg(root.join("tests/bench/distill_reference.py"))
            .arg("--teacher")
            .arg(&teacher)
            .args([
                "--layers".to_string(),
                s.layers.to_string(),
                "--hidden".into(),
                s.hidden.to_string(),
                "--ffn".into(),
                s.ffn.to_string(),
                "--heads".into(),
                s.heads.to_string(),
                "--groups".into(),
                s.groups.to_string(),
                "--seq".into(),
                s.seq.to_string(),
                "--micro-batch".into(),
                s.micro.to_string(),
                "--global-batch".into(),
                s.global.to_string(),
                "--steps".into(),
                s.steps.to_string(),
                "--threads".into(),
                threads.to_string(),
            ])
            .args(["--dp".to_string(), dp.to_string()]);
        let reference = run_ranks(&mut ref_cmd, dp)?;
        let ref_text = String::from_utf8_lossy(&reference.stdout).into_owned();
        if !reference.status.success() {
            bail!(
                "reference failed: {ref_text}{}",
                String::from_utf8_lossy(&reference.stderr)
            );
        }
        let ref_line = ref_text
            .lines()
            .find(|l| l.starts_with("reference:"))
            .context("no summary line from the reference")?
            .to_string();
        let t = |l: &str| kv_number(l, "tokens_per_s").unwrap_or(0.0);
        if best_ours.as_ref().is_none_or(|b| t(&ours_line) > b.0) {
            best_ours = Some((t(&ours_line), ours_line.clone()));
        }
        if best_ref.as_ref().is_none_or(|b| t(&ref_line) > b.0) {
            best_ref = Some((t(&ref_line), ref_line.clone()));
        }
        println!("round {round}: {ours_line}\nround {round}: {ref_line}");
    }
    let ours_line = best_ours.map(|b| b.1).unwrap_or_default();
    let ref_line = best_ref.map(|b| b.1).unwrap_or_default();
    let num = |l: &str, k: &str| kv_number(l, k).unwrap_or(f64::NAN);
    let (ot, or) = (
        num(&ours_line, "tokens_per_s"),
        num(&ours_line, "peak_rss_kib"),
    );
    let (rt, rr) = (
        num(&ref_line, "tokens_per_s"),
        num(&ref_line, "peak_rss_kib"),
    );
    let ratio = ot / rt;
    crate::util::step("bench distill");
    println!(
        "job                teacher {} (2 layers, hidden 64), student {} layer(s) hidden {}, seq {}, micro {} global {}, {} steps, DP {dp} x {threads} thread(s), {}",
        teacher.display(), s.layers, s.hidden, s.seq, s.micro, s.global, s.steps,
        if release { "release" } else { "debug" }
    );
    println!(
        "nemo-tool distill  {ot:>10.0} tokens/s   peak RSS {:>7.1} MiB",
        or / 1024.0
    );
    println!(
        "PyTorch eager      {rt:>10.0} tokens/s   peak RSS {:>7.1} MiB",
        rr / 1024.0
    );
    println!(
        "speed-up           {ratio:.2}x   target >= 1.1x: {}",
        verdict(ratio >= 1.1)
    );
    println!("best of {ROUNDS} alternating rounds each");
    if ratio < 1.1 {
        bail!("bench distill: below the 1.1x target");
    }
    Ok(())
}

/// `nemo-tool distill` and the overrides of the bench job: `teacher` distilled into a student of
/// shape `s` on the data at `prefix`, outputs in `dir`, no validation or checkpoints.
pub(crate) fn distill_job(
    teacher: &std::path::Path,
    prefix: &std::path::Path,
    dir: &std::path::Path,
    s: &DistillShape,
) -> Vec<String> {
    vec![
        "distill".to_string(),
        format!("model.kd_teacher_restore_from_path={}", teacher.display()),
        format!("model.data.data_prefix=[1.0,{}]", prefix.display()),
        format!("model.nemo_path={}", dir.join("student.nemo").display()),
        format!("exp_manager.explicit_log_dir={}", dir.join("exp").display()),
        "exp_manager.resume_if_exists=false".into(),
        "exp_manager.create_checkpoint_callback=false".into(),
        "model.data.splits_string=100,0,0".into(),
        format!("model.data.seq_length={}", s.seq),
        format!("model.num_layers={}", s.layers),
        format!("model.hidden_size={}", s.hidden),
        format!("model.ffn_hidden_size={}", s.ffn),
        format!("model.num_attention_heads={}", s.heads),
        format!("model.num_query_groups={}", s.groups),
        "model.make_vocab_size_divisible_by=32".into(),
        format!("model.micro_batch_size={}", s.micro),
        format!("model.global_batch_size={}", s.global),
        format!("trainer.max_steps={}", s.steps),
        "trainer.limit_val_batches=0".into(),
        "trainer.log_every_n_steps=1000".into(),
        "model.optim.lr=1e-3".into(),
        "model.optim.sched.warmup_steps=5".into(),
        "model.optim.sched.min_lr=1e-4".into(),
    ]
}

/// The bench's token data (400 documents, vocabulary 100) as an indexed dataset in `dir`,
/// made by `tool data make`; returns its prefix.
pub(crate) fn bench_data(tool: &std::path::Path, dir: &std::path::Path) -> Result<PathBuf> {
    let docs = dir.join("docs.jsonl");
    std::fs::write(&docs, crate::demo::token_docs(400))?;
    let prefix = dir.join("data");
    crate::util::run(
        Command::new(tool)
            .args(["data", "make", "--vocab-size", "100", "--force", "--input"])
            .arg(&docs)
            .arg("--output-prefix")
            .arg(&prefix),
    )?;
    Ok(prefix)
}

/// Runs `cmd` as `n` ranks with torchrun's variables (one process when `n` is 1) and returns
/// rank 0's output (a failing rank's output when one fails).
fn run_ranks(cmd: &mut Command, n: u32) -> Result<std::process::Output> {
    if n == 1 {
        return Ok(cmd.output()?);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut children = Vec::new();
    for rank in 0..n {
        cmd.env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        children.push(cmd.spawn()?);
    }
    let mut outs = Vec::new();
    for c in children {
        outs.push(c.wait_with_output()?);
    }
    if let Some(i) = outs.iter().position(|o| !o.status.success()) {
        return Ok(outs.swap_remove(i));
    }
    Ok(outs.swap_remove(0))
}

pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

/// Entry point for `cargo xtask bench`.
pub fn run(args: &[String]) -> Result<()> {
    let Some(name) = args.first() else {
        list();
        bail!("bench: no bench name given");
    };
    if name == "list" {
        list();
        return Ok(());
    }
    match BENCHES.iter().find(|(n, _, _)| n == name) {
        Some((_, _, f)) => f(args.get(1..).unwrap_or_default()),
        None => {
            list();
            bail!("unknown bench {name:?}")
        }
    }
}

fn list() {
    if BENCHES.is_empty() {
        println!("no benches yet");
    }
    for (name, about, _) in BENCHES {
        println!("  {name:<20} {about}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unknown_bench_fails() {
        let err = super::run(&["nope".to_string()]).unwrap_err();
        assert!(err.to_string().contains("unknown bench"), "{err}");
        assert!(super::run(&["list".to_string()]).is_ok());
    }
}
