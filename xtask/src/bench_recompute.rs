//! `cargo xtask bench recompute [--steps N] [--threads N]`: the same distillation job with and
//! without activation recompute (`model.activations_checkpoint_granularity=full`, method
//! `uniform`, one layer per group), in the same run, on a student of about 44M parameters
//! (14 layers, hidden 512, FFN 1536, seq 512, micro-batch 4): peak RSS of each (the activation
//! memory recompute drops), tokens/s of each (its cost), and that the losses agree.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::bench::kv_number;

pub fn recompute(args: &[String]) -> Result<()> {
    let mut steps = 3u32;
    let mut threads = 2u32;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |what: &str| -> Result<u32> {
            it.next()
                .and_then(|t| t.parse().ok())
                .with_context(|| format!("{what} needs a number"))
        };
        match a.as_str() {
            "--steps" => steps = num("--steps")?,
            "--threads" => threads = num("--threads")?,
            other => bail!("bench recompute: unknown option {other:?}"),
        }
    }
    let root = crate::util::root();
    let venv = root.join(".venv");
    let tool = crate::test::build_distill_tool(&venv, true)?;
    let dir = crate::util::target_dir().join("bench/recompute");
    std::fs::create_dir_all(&dir)?;
    let prefix = crate::bench::bench_data(&tool, &dir)?;
    let teacher = root.join("fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo");
    let (layers, hidden, ffn, seq, micro) = (14u64, 512u64, 1536u64, 512u64, 4u64);
    let (heads, groups, vocab) = (8u64, 4u64, 128u64);
    // per layer: fused QKV ((heads + 2 groups) x head_dim rows), proj, gated fc1 and fc2, two
    // norms; then the embedding, the untied output layer (padded vocab 128) and the final norm
    let d = hidden / heads;
    let params = layers
        * (hidden * (heads + 2 * groups) * d + hidden * heads * d + 3 * hidden * ffn + 2 * hidden)
        + 2 * vocab * hidden
        + hidden;
    let run = |recompute: bool| -> Result<String> {
        let mut a = vec![
            "distill".to_string(),
            format!("model.kd_teacher_restore_from_path={}", teacher.display()),
            format!("model.data.data_prefix=[1.0,{}]", prefix.display()),
            format!("model.nemo_path={}", dir.join("student.nemo").display()),
            format!("exp_manager.explicit_log_dir={}", dir.join("exp").display()),
            "exp_manager.resume_if_exists=false".into(),
            "exp_manager.create_checkpoint_callback=false".into(),
            "model.data.splits_string=100,0,0".into(),
            format!("model.data.seq_length={seq}"),
            format!("model.num_layers={layers}"),
            format!("model.hidden_size={hidden}"),
            format!("model.ffn_hidden_size={ffn}"),
            format!("model.num_attention_heads={heads}"),
            format!("model.num_query_groups={groups}"),
            "model.make_vocab_size_divisible_by=32".into(),
            format!("model.micro_batch_size={micro}"),
            format!("model.global_batch_size={micro}"),
            format!("trainer.max_steps={steps}"),
            "trainer.limit_val_batches=0".into(),
            "model.optim.sched.warmup_steps=1".into(),
        ];
        if recompute {
            a.push("model.activations_checkpoint_granularity=full".into());
            a.push("model.activations_checkpoint_method=uniform".into());
            a.push("model.activations_checkpoint_num_layers=1".into());
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
    crate::util::step("without recompute");
    let plain = run(false)?;
    println!("{plain}");
    crate::util::step("with full recompute (uniform, 1 layer per group)");
    let rc = run(true)?;
    println!("{rc}");
    let n = |l: &str, k: &str| kv_number(l, k).unwrap_or(f64::NAN);
    let (r0, r1) = (n(&plain, "peak_rss_kib"), n(&rc, "peak_rss_kib"));
    let (t0, t1) = (n(&plain, "tokens_per_s"), n(&rc, "tokens_per_s"));
    let (l0, l1) = (n(&plain, "final_kd_loss"), n(&rc, "final_kd_loss"));
    crate::util::step("bench recompute");
    println!(
        "student            {layers} layers, hidden {hidden}, ffn {ffn}: {:.1}M parameters; seq {seq}, micro-batch {micro}, {steps} steps, {threads} thread(s)",
        params as f64 / 1e6
    );
    println!(
        "no recompute       peak RSS {:>8.1} MiB   {t0:>8.0} tokens/s   final kd_loss {l0:.6}",
        r0 / 1024.0
    );
    println!(
        "full recompute     peak RSS {:>8.1} MiB   {t1:>8.0} tokens/s   final kd_loss {l1:.6}",
        r1 / 1024.0
    );
    println!(
        "memory drop        {:.1} MiB ({:.0}% of the peak); speed {:.2}x",
        (r0 - r1) / 1024.0,
        100.0 * (r0 - r1) / r0,
        t1 / t0
    );
    if (l0 - l1).abs() > 1e-5 {
        bail!("bench recompute: the losses differ ({l0} vs {l1})");
    }
    if r1 >= r0 {
        bail!("bench recompute: no memory drop");
    }
    Ok(())
}
