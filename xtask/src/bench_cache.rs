//! `cargo xtask bench teacher-cache [--threads N] [--topk K]`: the `bench distill` job (teacher
//! fixture, student shape, batch shapes, 40 steps) with ModelOpt's top-k logits loss
//! (`model.kd.logit_kl_topk`), trained from the live teacher and from an offline teacher cache
//! written by `nemo-tool eval --teacher-cache` in the same run: tokens/s of both (alternating
//! rounds, each side's best), the time to write the cache, its size per token (fp32 and bf16),
//! and that the two runs end with the same loss (an fp32 cache stands in for the teacher
//! exactly).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::bench::{kv_number, ROUNDS, SHAPE};

pub fn teacher_cache(args: &[String]) -> Result<()> {
    let mut threads = 1u32;
    let mut topk = 32u32;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |what: &str| -> Result<u32> {
            it.next()
                .and_then(|t| t.parse().ok())
                .with_context(|| format!("{what} needs a number"))
        };
        match a.as_str() {
            "--threads" => threads = num("--threads")?,
            "--topk" => topk = num("--topk")?,
            other => bail!("bench teacher-cache: unknown option {other:?}"),
        }
    }
    let root = crate::util::root();
    let venv = root.join(".venv");
    let tool = crate::test::build_distill_tool(&venv, true)?;
    let dir = crate::util::target_dir().join("bench/teacher-cache");
    std::fs::create_dir_all(&dir)?;
    let prefix = crate::bench::bench_data(&tool, &dir)?;
    let teacher = root.join("fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo");
    let s = &SHAPE;
    let samples = s.global * s.steps;
    // the caches: every training window of the job, exact (fp32) and compressed (bf16)
    let mut written = Vec::new();
    for dtype in ["fp32", "bf16"] {
        crate::util::step(&format!("nemo-tool eval --teacher-cache ({dtype})"));
        let out = dir.join(format!("cache_{dtype}"));
        let o = Command::new(&tool)
            .env("OMP_NUM_THREADS", threads.to_string())
            .arg("eval")
            .arg(&teacher)
            .arg("--data")
            .arg(&prefix)
            .args([
                "--splits-string".to_string(),
                "100,0,0".into(),
                "--split".into(),
                "train".into(),
                "--samples".into(),
                samples.to_string(),
                "--seq-length".into(),
                s.seq.to_string(),
                "--micro-batch".into(),
                s.micro.to_string(),
                "--chunk".into(),
                "0".into(),
                "--topk".into(),
                topk.to_string(),
                "--cache-dtype".into(),
                dtype.into(),
                "--force".into(),
                "--json".into(),
                "--teacher-cache".into(),
            ])
            .arg(&out)
            .output()?;
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        if !o.status.success() {
            bail!(
                "nemo-tool eval --teacher-cache failed: {text}{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let f = |k: &str| crate::bench::json_number(&text, k).unwrap_or(f64::NAN);
        written.push((
            dtype,
            out,
            f("seconds"),
            f("bytes"),
            f("bytes_per_token"),
            f("records"),
        ));
    }
    let fp32 = written[0].1.clone();
    let run = |cache: Option<&Path>| -> Result<String> {
        let mut a = crate::bench::distill_job(&teacher, &prefix, &dir, s);
        a.push(format!("model.kd.logit_kl_topk={topk}"));
        if let Some(c) = cache {
            a.push(format!("model.kd.teacher_cache={}", c.display()));
        }
        let o = Command::new(&tool)
            .env("OMP_NUM_THREADS", threads.to_string())
            .args(&a)
            .output()?;
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        if !o.status.success() {
            bail!(
                "nemo-tool distill failed: {text}{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        text.lines()
            .find(|l| l.starts_with("distill: done"))
            .map(str::to_string)
            .context("no summary line from nemo-tool distill")
    };
    let t = |l: &str| kv_number(l, "tokens_per_s").unwrap_or(0.0);
    let (mut live, mut cached) = (String::new(), String::new());
    for round in 1..=ROUNDS {
        crate::util::step(&format!("round {round}: live teacher"));
        let l = run(None)?;
        println!("{l}");
        crate::util::step(&format!("round {round}: teacher cache (fp32)"));
        let c = run(Some(&fp32))?;
        println!("{c}");
        if t(&l) > t(&live) {
            live = l;
        }
        if t(&c) > t(&cached) {
            cached = c;
        }
    }
    let n = |l: &str, k: &str| kv_number(l, k).unwrap_or(f64::NAN);
    let (tl, tc) = (n(&live, "tokens_per_s"), n(&cached, "tokens_per_s"));
    let (ll, lc) = (n(&live, "final_kd_loss"), n(&cached, "final_kd_loss"));
    crate::util::step("bench teacher-cache");
    println!(
        "job                teacher {} (2 layers, hidden 64), student {} layer(s) hidden {}, seq {}, micro {} global {}, {} steps, logit_kl_topk {topk}, {threads} thread(s)",
        teacher.display(), s.layers, s.hidden, s.seq, s.micro, s.global, s.steps
    );
    for (dtype, _, secs, bytes, per_token, records) in &written {
        println!(
            "cache {dtype:<5}        {records:.0} windows, {:.2} MiB, {per_token:.1} bytes/token (bound k*6+16 = {}), written in {secs:.2}s",
            bytes / 1048576.0,
            topk * 6 + 16
        );
    }
    println!("live teacher       {tl:>10.0} tokens/s   final kd_loss {ll:.6}");
    println!("teacher cache      {tc:>10.0} tokens/s   final kd_loss {lc:.6}");
    println!("speed-up           {:.2}x", tc / tl);
    println!("best of {ROUNDS} alternating rounds each");
    if ll.to_bits() != lc.to_bits() {
        bail!("bench teacher-cache: the final losses differ ({ll} vs {lc})");
    }
    let bf16 = written[1].4;
    if bf16 > f64::from(topk * 6 + 16) {
        bail!("bench teacher-cache: the bf16 cache takes {bf16:.1} bytes/token");
    }
    Ok(())
}
