//! Acceptance tests of `nemo-tool distill` (feature `distill`, CPU, Gloo), through the binary:
//! the issue's seed command line under torchrun at TP2 (output read by `inspect` and by real
//! torch), TP2 = TP1 per-step losses and final weights, learning plus reload of the saved
//! student, exact resume after SIGKILL, and clear refusals.
#![cfg(feature = "distill")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nemo_tool::distill::model::{Gpt, InitFrom};
use nemo_tool::distill::parallel::ProcessGroup;
use nemo_tool::distill::spec::GptSpec;
use nemo_tool::distill::weights::Source;
use nemo_tool::formats::indexed::{Builder, TokenType};
use nemo_tool::model::checkpoint::Checkpoint;
use tch::{Device, Kind};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn teacher() -> PathBuf {
    root().join("fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo")
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nemo-tool"))
}

fn show(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A dataset of `docs` documents with token ids in the fixture tokenizer's range (3..100),
/// each a little recurrence so there is something to learn; plus the tokenizer file.
fn dataset(dir: &Path, docs: usize) -> (PathBuf, PathBuf) {
    let prefix = dir.join("data");
    let mut b =
        Builder::create(&prefix, TokenType::for_vocab(100), true).unwrap_or_else(|e| panic!("{e}"));
    let mut x: u64 = 12345;
    for d in 0..docs {
        let n = 20 + (d * 37) % 60;
        let mut t = (d as i64 * 13) % 97 + 3;
        let mut doc = Vec::with_capacity(n + 1);
        for _ in 0..n {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            t = (t * 7 + (x >> 62) as i64 + 1) % 97 + 3;
            doc.push(t);
        }
        doc.push(2); // EOD
        b.add_document(&doc).unwrap_or_else(|e| panic!("{e}"));
    }
    b.finish().unwrap_or_else(|e| panic!("{e}"));
    let ck = Checkpoint::open(teacher()).unwrap_or_else(|e| panic!("{e}"));
    let tok = ck
        .artifacts
        .iter()
        .find(|a| a.ends_with("tokenizer.model"))
        .cloned()
        .unwrap_or_else(|| panic!("fixture has no tokenizer"));
    let bytes = ck.read_member(&tok).unwrap_or_else(|e| panic!("{e}"));
    let tok_path = dir.join("tokenizer.model");
    std::fs::write(&tok_path, bytes.as_slice()).unwrap_or_else(|e| panic!("{e}"));
    (prefix, tok_path)
}

/// Overrides shared by every run: a student smaller than the tiny teacher, tiny batches.
/// The first four are the paths.
fn common(prefix: &Path, exp: &Path, out: &Path) -> Vec<String> {
    vec![
        format!("model.kd_teacher_restore_from_path={}", teacher().display()),
        format!("model.data.data_prefix=[1.0,{}]", prefix.display()),
        format!("model.nemo_path={}", out.display()),
        format!("exp_manager.explicit_log_dir={}", exp.display()),
        "model.data.splits_string=90,10,0".into(),
        "model.data.seq_length=32".into(),
        "model.num_layers=1".into(),
        "model.hidden_size=32".into(),
        "model.ffn_hidden_size=64".into(),
        "model.num_attention_heads=4".into(),
        "model.num_query_groups=2".into(),
        "model.make_vocab_size_divisible_by=32".into(),
        "model.optim.sched.warmup_steps=3".into(),
        "trainer.log_every_n_steps=1".into(),
    ]
}

fn distill_cmd(program: &Path) -> Command {
    let mut c = Command::new(program);
    c.env("OMP_NUM_THREADS", "1")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("LOCAL_RANK")
        .env_remove("MASTER_ADDR")
        .env_remove("MASTER_PORT")
        .env_remove("TORCHELASTIC_USE_AGENT_STORE");
    for (k, _) in std::env::vars() {
        if k.starts_with("SLURM_") {
            c.env_remove(k);
        }
    }
    c
}

fn run_tp1(args: &[String]) -> Output {
    let o = distill_cmd(&bin())
        .arg("distill")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "distill failed: {}", show(&o));
    o
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    l.local_addr()
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Two ranks launched by hand with torchrun's variables (no python needed).
fn run_tp2(args: &[String]) -> String {
    run_world(2, args)
}

/// `world` ranks launched by hand with torchrun's variables.
fn run_world(world: usize, args: &[String]) -> String {
    let port = free_port().to_string();
    launch(world, args, torchrun_vars(world, &port))
}

/// `world` ranks launched as `srun` starts tasks: only Slurm's variables.
fn run_srun(world: usize, args: &[String]) -> String {
    // MASTER_PORT = 15000 + the job id's last four digits
    let port = free_port();
    let job = (port.checked_sub(15000).filter(|p| *p < 10000))
        .map_or_else(|| "0".to_string(), |p| format!("77{p:04}"));
    launch(world, args, |rank| {
        let mut v = vec![
            ("SLURM_PROCID", rank.to_string()),
            ("SLURM_LOCALID", rank.to_string()),
            ("SLURM_NTASKS", world.to_string()),
            ("SLURM_NODELIST", "localhost".to_string()),
            ("SLURM_JOB_ID", job.clone()),
        ];
        if job == "0" {
            // the free port is outside Lightning's 15000-24999 window: name it
            v.push(("MASTER_PORT", port.to_string()));
        }
        v
    })
}

fn launch(
    world: usize,
    args: &[String],
    vars: impl Fn(usize) -> Vec<(&'static str, String)>,
) -> String {
    let mut text = String::new();
    for (rank, o) in wait_all(spawn_ranks(world, args, vars))
        .into_iter()
        .enumerate()
    {
        assert!(o.status.success(), "rank {rank}: {}", show(&o));
        text += &show(&o);
    }
    text
}

/// `world` ranks of `nemo-tool distill args` started with `vars(rank)`, output piped.
fn spawn_ranks(
    world: usize,
    args: &[String],
    vars: impl Fn(usize) -> Vec<(&'static str, String)>,
) -> Vec<std::process::Child> {
    spawn_sub("distill", world, args, vars)
}

/// `world` ranks of `nemo-tool <sub> args` started with `vars(rank)`, output piped.
fn spawn_sub(
    sub: &str,
    world: usize,
    args: &[String],
    vars: impl Fn(usize) -> Vec<(&'static str, String)>,
) -> Vec<std::process::Child> {
    (0..world)
        .map(|rank| {
            let mut c = distill_cmd(&bin());
            c.arg(sub).args(args);
            for (k, v) in vars(rank) {
                c.env(k, v);
            }
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

fn wait_all(children: Vec<std::process::Child>) -> Vec<Output> {
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// torchrun's variables for `rank` of `world` at `port`.
fn torchrun_vars(world: usize, port: &str) -> impl Fn(usize) -> Vec<(&'static str, String)> + '_ {
    move |rank| {
        vec![
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("WORLD_SIZE", world.to_string()),
            ("MASTER_ADDR", "127.0.0.1".to_string()),
            ("MASTER_PORT", port.to_string()),
        ]
    }
}

fn metrics(exp: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(exp.join("metrics.jsonl"))
        .unwrap_or_else(|e| panic!("{}: {e}", exp.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// `(step, kd_loss)` of every training step in `metrics.jsonl`.
fn step_losses(exp: &Path) -> Vec<(u64, f64)> {
    metrics(exp)
        .iter()
        .filter(|v| v.get("kd_loss").is_some())
        .map(|v| {
            (
                v["step"].as_u64().unwrap_or(0),
                v["kd_loss"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

/// Every parameter of a saved student, as canonical (TP1) tensors.
fn weights(path: &Path) -> Vec<(String, tch::Tensor)> {
    let ck = Checkpoint::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let src = Source::new(&ck).unwrap_or_else(|e| panic!("{e}"));
    let v = src
        .padded_vocab(ck.config.make_vocab_size_divisible_by(), 1)
        .unwrap_or_else(|e| panic!("{e}"));
    let spec = GptSpec::from_config(&ck.config, 1, v).unwrap_or_else(|e| panic!("{e}"));
    let m = Gpt::new(
        spec,
        &InitFrom::Checkpoint(&src),
        &ProcessGroup::single(),
        Kind::Float,
        Device::Cpu,
        false,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    m.params()
        .iter()
        .map(|p| (p.name.clone(), p.tensor.copy()))
        .collect()
}

fn python() -> Option<PathBuf> {
    let p = std::env::var_os("NEMO_TOOL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var_os("NEMO_TOOL_STRICT").is_none(),
        "NEMO_TOOL_STRICT is set but no python was found"
    );
    eprintln!("skipped: no python with torch (set NEMO_TOOL_PYTHON)");
    None
}

#[test]
fn seed_command_under_torchrun_tp2() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (prefix, tok) = dataset(dir.path(), 120);
    let out = dir.path().join("final.nemo");
    let exp = dir.path().join("exp");
    let torchrun = py.with_file_name("torchrun");
    let mut c = if torchrun.exists() {
        distill_cmd(&torchrun)
    } else {
        let mut c = distill_cmd(&py);
        c.args(["-m", "torch.distributed.run"]);
        c
    };
    // the issue's command line, then the small-shape overrides
    let o = c
        .args([
            "--no-python",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
        ])
        .arg(format!("--master_port={}", free_port()))
        .arg(bin())
        .arg("distill")
        .arg("model.restore_from_path=None")
        .arg(format!(
            "model.kd_teacher_restore_from_path={}",
            teacher().display()
        ))
        .arg("model.tensor_model_parallel_size=2")
        .arg(format!("model.tokenizer.model={}", tok.display()))
        .arg(format!("model.data.data_prefix=[1.0,{}]", prefix.display()))
        .arg(format!("model.nemo_path={}", out.display()))
        .arg("trainer.precision=bf16")
        .arg("trainer.devices=2")
        .args(&common(&prefix, &exp, &out)[3..])
        .args([
            "model.global_batch_size=4",
            "model.micro_batch_size=2",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "trainer.limit_val_batches=1",
        ])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let text = show(&o);
    assert!(o.status.success(), "torchrun distill failed: {text}");
    assert!(text.contains("distill: done steps=6"), "{text}");
    // our inspect
    let i = Command::new(bin())
        .args(["inspect", "--json"])
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(i.status.success(), "inspect: {}", show(&i));
    let ck = Checkpoint::open(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ck.rank_files().len(), 2);
    assert_eq!(ck.config.tensor_model_parallel_size(), 2);
    assert_eq!(ck.artifacts.len(), 1, "{:?}", ck.artifacts);
    // real torch, each rank with weights_only=True
    let script = r#"
import io, sys, tarfile, torch
t = tarfile.open(sys.argv[1])
names = {m.name.lstrip("./"): m for m in t.getmembers()}
for r in (0, 1):
    m = t.extractfile(names[f"mp_rank_{r:02d}/model_weights.ckpt"])
    sd = torch.load(io.BytesIO(m.read()), weights_only=True)
    w = sd["model.embedding.word_embeddings.weight"]
    assert w.shape == (64, 32) and w.dtype == torch.float32, (w.shape, w.dtype)
    assert torch.isfinite(w).all()
    print("rank", r, len(sd), "entries")
"#;
    let p = Command::new(&py)
        .args(["-c", script])
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(p.status.success(), "torch.load: {}", show(&p));
    assert!(show(&p).contains("rank 1"), "{}", show(&p));
}

/// Largest |a - b| over the per-step losses and over the saved weights of two runs.
fn compare_runs(dir: &Path, a: (&str, &str), b: (&str, &str), what: &str) -> (f64, f64) {
    let la = step_losses(&dir.join(a.0));
    let lb = step_losses(&dir.join(b.0));
    assert_eq!(la.len(), 20, "{what}");
    assert_eq!(la.len(), lb.len(), "{what}");
    let mut loss_diff = 0.0f64;
    for ((s1, x), (s2, y)) in la.iter().zip(&lb) {
        assert_eq!(s1, s2);
        loss_diff = loss_diff.max((x - y).abs());
        assert!((x - y).abs() <= 1e-5, "{what}, step {s1}: {x} vs {y}");
    }
    let wa = weights(&dir.join(a.1));
    let wb = weights(&dir.join(b.1));
    assert_eq!(wa.len(), wb.len());
    let mut worst = 0.0f64;
    for ((n1, x), (n2, y)) in wa.iter().zip(&wb) {
        assert_eq!(n1, n2);
        let d = (x - y).abs().max().double_value(&[]);
        worst = worst.max(d);
        assert!(d <= 1e-5, "{what}, {n1}: max abs diff {d}");
    }
    (loss_diff, worst)
}

#[test]
fn tensor_and_data_parallel_runs_match_tp1_for_20_steps() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (prefix, _) = dataset(dir.path(), 120);
    // global batch 4 of micro-batches of 1: 4 micro-steps at DP1, 2 per replica at DP2
    let extra = [
        "model.global_batch_size=4",
        "model.micro_batch_size=1",
        "trainer.max_steps=20",
        "trainer.val_check_interval=10",
        "trainer.limit_val_batches=1",
        "model.optim.lr=1e-2",
        // 8 positions per chunk of the 32-token sequence: the chunked loss is exercised
        "model.kd.chunk_tokens=8",
    ];
    let with = |exp: &str, out: &str, tp: u32, world: u32| {
        let mut a = common(&prefix, &dir.path().join(exp), &dir.path().join(out));
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(format!("model.tensor_model_parallel_size={tp}"));
        a.push(format!("trainer.devices={world}"));
        a
    };
    run_tp1(&with("tp1", "tp1.nemo", 1, 1));
    // DP2 started the way srun starts tasks (Slurm's variables only)
    let text = run_srun(2, &with("dp2", "dp2.nemo", 1, 2));
    assert!(text.contains("TP 1 x PP 1 x DP 2"), "{text}");
    run_tp2(&with("tp2", "tp2.nemo", 2, 2));
    let text = run_world(4, &with("dp2tp2", "dp2tp2.nemo", 2, 4));
    assert!(text.contains("TP 2 x PP 1 x DP 2"), "{text}");
    let t = compare_runs(
        dir.path(),
        ("tp1", "tp1.nemo"),
        ("tp2", "tp2.nemo"),
        "TP2 vs TP1",
    );
    let a = compare_runs(
        dir.path(),
        ("tp1", "tp1.nemo"),
        ("dp2", "dp2.nemo"),
        "DP2xTP1 vs TP1",
    );
    let b = compare_runs(
        dir.path(),
        ("tp2", "tp2.nemo"),
        ("dp2tp2", "dp2tp2.nemo"),
        "DP2xTP2 vs TP2",
    );
    // only replica 0 writes checkpoints, one file per TP rank
    let ck = std::fs::read_dir(dir.path().join("dp2tp2/checkpoints"))
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("state.json").is_file())
        .unwrap_or_else(|| panic!("no checkpoint"));
    let mut files: Vec<String> = std::fs::read_dir(&ck)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["rank_0.pt", "rank_1.pt", "state.json"]);
    println!(
        "TP2 vs TP1: loss diff {:.2e}, weights {:.2e}; DP2xTP1 vs TP1: loss diff {:.2e}, weights {:.2e}; DP2xTP2 vs TP2: loss diff {:.2e}, weights {:.2e}",
        t.0, t.1, a.0, a.1, b.0, b.1
    );
}

/// ModelOpt's distillation YAML (`model.kd.config`): the LM loss balanced in
/// (`skip_lm_loss: false`) with ModelOpt's top-k logits loss and two intermediate-layer pairs
/// (cosine and MSE, through the trained projection: student hidden 32, teacher 64); TP2 equals
/// TP1 over 20 steps and every term is logged.
#[test]
fn modelopt_config_with_the_lm_loss_matches_at_tp2() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (prefix, _) = dataset(dir.path(), 120);
    let yaml = dir.path().join("distill.yaml");
    std::fs::write(
        &yaml,
        "logit_layers: [\"output_layer\", \"output_layer\"]\n\
         intermediate_layer_pairs:\n\
         \x20 - [\"decoder.final_layernorm\", \"decoder.final_layernorm\"]\n\
         \x20 - [\"decoder.layers.0.input_layernorm\", \"decoder.layers.1.input_layernorm\", \"mse\"]\n\
         skip_lm_loss: false\nkd_loss_scale: 2.0\nlogit_kl_temperature: 1.5\nlogit_kl_topk: 16\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let with = |name: &str, tp: u32| {
        let mut a = common(
            &prefix,
            &dir.path().join(name),
            &dir.path().join(format!("{name}.nemo")),
        );
        a.extend(
            [
                "model.global_batch_size=4",
                "model.micro_batch_size=2",
                "trainer.max_steps=20",
                "trainer.limit_val_batches=0",
                "model.optim.lr=2e-3",
                "model.kd.chunk_tokens=8",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        a.push(format!("model.kd.config={}", yaml.display()));
        a.push(format!("model.tensor_model_parallel_size={tp}"));
        a.push(format!("trainer.devices={tp}"));
        a
    };
    let text = show(&run_tp1(&with("tp1", 1)));
    assert!(
        text.contains("logits_loss")
            && text.contains("lm_loss")
            && text.contains("intermediate_loss"),
        "{text}"
    );
    run_tp2(&with("tp2", 2));
    let (l, w) = compare_runs(
        dir.path(),
        ("tp1", "tp1.nemo"),
        ("tp2", "tp2.nemo"),
        "balanced TP2 vs TP1",
    );
    // the logged terms: total = lm + scale * lm (f = lm / kd) while both are positive, and
    // the intermediate loss (rescaled to the logits loss inside kd) falls as the student learns
    for v in metrics(&dir.path().join("tp2"))
        .iter()
        .filter(|v| v.get("kd_loss").is_some())
    {
        let (t, lm) = (v["kd_loss"].as_f64(), v["lm_loss"].as_f64());
        let (Some(t), Some(lm)) = (t, lm) else {
            panic!("no kd_loss/lm_loss in {v}");
        };
        assert!((t - 3.0 * lm).abs() <= 1e-4 * t, "{v}");
        assert!(v["logits_loss"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    }
    let inter: Vec<f64> = metrics(&dir.path().join("tp1"))
        .iter()
        .filter_map(|v| v.get("intermediate_loss").and_then(|x| x.as_f64()))
        .collect();
    assert_eq!(inter.len(), 20);
    assert!(inter[19] < inter[0], "intermediate loss {inter:?}");
    println!("balanced (LM + ModelOpt top-k + 2 intermediate pairs) TP2 vs TP1: loss diff {l:.2e}, weights {w:.2e}");
}

/// Intermediate-layer pairs under pipeline parallelism: on the last stage, as in ModelOpt.
/// Overrides of a 20-step run of `name` at `tp` (global batch 4 of micro-batches of 1, a
/// validation at steps 10 and 20) with the student's architecture `features`.
fn twenty_steps(prefix: &Path, dir: &Path, name: &str, tp: u32, features: &[&str]) -> Vec<String> {
    let mut a = common(prefix, &dir.join(name), &dir.join(format!("{name}.nemo")));
    a.extend(
        [
            "model.global_batch_size=4",
            "model.micro_batch_size=1",
            "trainer.max_steps=20",
            "trainer.val_check_interval=10",
            "trainer.limit_val_batches=1",
            "model.optim.lr=1e-2",
        ]
        .iter()
        .chain(features)
        .map(|s| s.to_string()),
    );
    a.push(format!("model.tensor_model_parallel_size={tp}"));
    a.push(format!("trainer.devices={tp}"));
    a
}

/// Runs [`twenty_steps`] with `features` at TP1 and TP2, checks they agree (within 1e-5), and
/// returns the loss and weight differences and the saved TP2 student's parameter names.
fn tp1_vs_tp2(dir: &Path, prefix: &Path, features: &[&str], what: &str) -> (f64, f64, Vec<String>) {
    run_tp1(&twenty_steps(prefix, dir, "tp1", 1, features));
    run_tp2(&twenty_steps(prefix, dir, "tp2", 2, features));
    let (l, w) = compare_runs(dir, ("tp1", "tp1.nemo"), ("tp2", "tp2.nemo"), what);
    let names = weights(&dir.join("tp2.nemo"))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    (l, w, names)
}

/// A student with the Qwen2/Qwen3/Mistral features (Q/K/V biases, per-head Q/K norms, a
/// sliding window of 8 positions over the 32-token sequences) distils at TP2 as at TP1 over 20
/// steps, and its saved config keeps the features.
#[test]
fn qwen_mistral_features_match_tp1_for_20_steps() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (prefix, _) = dataset(dir.path(), 120);
    let features = [
        "model.qkv_bias=true",
        "model.qk_layernorm=true",
        "model.window_size=[7,0]",
    ];
    let (l, w, names) = tp1_vs_tp2(dir.path(), &prefix, &features, "TP2 vs TP1");
    for n in [
        "decoder.layers.0.self_attention.linear_qkv.bias",
        "decoder.layers.0.self_attention.q_layernorm.weight",
        "decoder.layers.0.self_attention.k_layernorm.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} not in {names:?}");
    }
    let ck = Checkpoint::open(dir.path().join("tp2.nemo")).unwrap_or_else(|e| panic!("{e}"));
    let spec = GptSpec::from_config(&ck.config, 1, 128).unwrap_or_else(|e| panic!("{e}"));
    assert!(spec.qkv_bias && spec.qk_layernorm && spec.window == Some((7, 0)));
    println!("qwen/mistral features, TP2 vs TP1: loss diff {l:.2e}, weights {w:.2e}");
}

/// A Gemma-shaped student (GeGLU with the tanh GELU, zero-centred RMSNorm, post-norms,
/// scaled embeddings, a query scale of its own, soft-capped scores and logits, Gemma 3's Q/K
/// norms and local RoPE base, a window of 8 on layer 1 of 2) distils at TP2 as at TP1 over 20
/// steps, and the saved student carries the post-norms.
#[test]
fn gemma_features_match_tp1_for_20_steps() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (prefix, _) = dataset(dir.path(), 120);
    let features = [
        "model.num_layers=2",
        "++model.activation=fast-geglu",
        "++model.openai_gelu=true",
        "++model.layernorm_zero_centered_gamma=true",
        "++model.post_layernorm=true",
        "++model.scale_embedding=true",
        "++model.query_pre_attn_scalar=24",
        "++model.attn_logit_softcapping=5.0",
        "++model.final_logit_softcapping=10.0",
        "++model.qk_layernorm=true",
        "++model.window_size=[7,0]",
        "++model.window_attn_skip_freq=2",
        "++model.rope_local_base_freq=1000.0",
    ];
    let (l, w, names) = tp1_vs_tp2(dir.path(), &prefix, &features, "TP2 vs TP1");
    for n in [
        "decoder.layers.1.self_attention.linear_proj.post_layernorm.weight",
        "decoder.layers.1.mlp.linear_fc2.post_layernorm.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} not in {names:?}");
    }
    let ck = Checkpoint::open(dir.path().join("tp2.nemo")).unwrap_or_else(|e| panic!("{e}"));
    let spec = GptSpec::from_config(&ck.config, 1, 128).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spec.window_layers, vec![true, false]);
    assert!(spec.gemma.post_norms && spec.gemma.final_softcap == Some(10.0));
    println!("gemma features, TP2 vs TP1: loss diff {l:.2e}, weights {w:.2e}");
}

/// A Qwen3-MoE-shaped student (4 experts per layer, top-2 after a softmax over all of them,
/// per-head Q/K norms) distils from the dense teacher at TP2 as at TP1 over 20 steps; the saved
/// student has every expert, and a load-balancing loss coefficient is refused, not dropped.
#[test]
fn moe_student_matches_tp1_for_20_steps() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (prefix, _) = dataset(dir.path(), 120);
    let features = [
        "model.qk_layernorm=true",
        "model.num_moe_experts=4",
        "model.moe_router_topk=2",
        "model.moe_ffn_hidden_size=32",
        "model.moe_router_pre_softmax=true",
    ];
    let (l, w, names) = tp1_vs_tp2(dir.path(), &prefix, &features, "MoE TP2 vs TP1");
    for n in [
        "decoder.layers.0.mlp.router.weight",
        "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight",
        "decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} not in {names:?}");
    }
    assert!(!names.iter().any(|x| x.contains("layers.0.mlp.linear_fc1")));
    // the load-balancing loss is logged every step, the same at both TPs (1 when perfectly
    // balanced)
    let lb = |run: &str| -> Vec<f64> {
        metrics(&dir.path().join(run))
            .iter()
            .filter(|v| v.get("kd_loss").is_some())
            .map(|v| v["moe_load_balancing_loss"].as_f64().unwrap_or(f64::NAN))
            .collect()
    };
    let (a, b) = (lb("tp1"), lb("tp2"));
    assert_eq!(a.len(), 20);
    for (x, y) in a.iter().zip(&b) {
        assert!(
            *x > 0.0 && x.is_finite() && (x - y).abs() <= 1e-5,
            "{x} vs {y}"
        );
    }
    let mut a = twenty_steps(&prefix, dir.path(), "aux", 1, &features);
    a.push("model.moe_aux_loss_coeff=0.01".into());
    let o = distill_cmd(&bin())
        .arg("distill")
        .args(&a)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !o.status.success() && show(&o).contains("moe_aux_loss_coeff"),
        "{}",
        show(&o)
    );
    println!("MoE student, TP2 vs TP1: loss diff {l:.2e}, weights {w:.2e}");
}

/// TP1xPP2 equals TP1 over 20 steps (pairs + LM loss); a pair on another stage is refused by
/// every rank before the first step.
#[test]
fn pipeline_with_intermediate_pairs_matches_tp1() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (prefix, _) = dataset(dir.path(), 120);
    let with = |name: &str, pp: u32, pairs: &str| {
        let mut a = common(
            &prefix,
            &dir.path().join(name),
            &dir.path().join(format!("{name}.nemo")),
        );
        a.extend(
            [
                "model.num_layers=2",
                "model.global_batch_size=4",
                "model.micro_batch_size=1",
                "trainer.max_steps=20",
                "trainer.limit_val_batches=0",
                "model.optim.lr=2e-3",
                "model.kd.skip_lm_loss=false",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        a.push(format!("model.kd.intermediate_layer_pairs={pairs}"));
        a.push(format!("model.pipeline_model_parallel_size={pp}"));
        a.push(format!("trainer.devices={pp}"));
        a
    };
    let pairs = "[[decoder.final_layernorm,decoder.final_layernorm],[decoder.layers.1.input_layernorm,decoder.layers.1.input_layernorm,mse]]";
    run_tp1(&with("tp1", 1, pairs));
    let text = run_world(2, &with("pp2", 2, pairs));
    assert!(text.contains("intermediate_loss"), "{text}");
    let (l, w) = compare_runs(
        dir.path(),
        ("tp1", "tp1.nemo"),
        ("pp2", "pp2.nemo"),
        "pairs PP2 vs TP1",
    );
    println!("intermediate pairs + LM loss, TP1xPP2 vs TP1: loss diff {l:.2e}, weights {w:.2e}");
    let args = with("bad", 2, "[[decoder.layers.0,decoder.layers.1]]");
    let port = free_port().to_string();
    for o in wait_all(spawn_ranks(2, &args, torchrun_vars(2, &port))) {
        assert!(!o.status.success());
        assert!(
            show(&o).contains("the student's Layer(0) is not on the last pipeline stage"),
            "{}",
            show(&o)
        );
    }
}

#[test]
fn learns_and_the_saved_student_reproduces_the_last_validation() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (prefix, _) = dataset(dir.path(), 200);
    let out = dir.path().join("student.nemo");
    let exp = dir.path().join("exp");
    let mut a = common(&prefix, &exp, &out);
    a.extend(
        [
            "model.global_batch_size=8",
            "model.micro_batch_size=4",
            "trainer.max_steps=60",
            "trainer.val_check_interval=30",
            "trainer.limit_val_batches=2",
            "model.optim.lr=1e-2",
            "model.optim.sched.min_lr=1e-3",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    run_tp1(&a);
    let vals: Vec<f64> = metrics(&exp)
        .iter()
        .filter_map(|v| v.get("val_kd_loss").and_then(|x| x.as_f64()))
        .collect();
    assert!(vals.len() >= 3, "{vals:?}");
    let (first, last) = (vals[0], vals[vals.len() - 1]);
    println!("validation KD loss: {vals:?}");
    assert!(
        last <= 0.5 * first,
        "val KD loss fell from {first} to {last}: less than 50%"
    );
    // reload the saved student and validate it alone
    let mut b = a.clone();
    b.push(format!("model.restore_from_path={}", out.display()));
    let o = distill_cmd(&bin())
        .args(["distill", "--validate-only"])
        .args(&b)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "{}", show(&o));
    let text = show(&o);
    let got: f64 = text
        .split("val_kd_loss ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no val_kd_loss in {text}"));
    assert!(
        (got - last).abs() <= 1e-6 * (1.0 + last.abs()),
        "reloaded student: {got}, last logged {last}"
    );
    assert!(exp.join("kd_loss.png").is_file());
    assert!(std::fs::read_dir(&exp)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
        .any(|e| e
            .file_name()
            .to_string_lossy()
            .starts_with("events.out.tfevents")));
}

/// Megatron's distributed optimizer (ZeRO-1: masters and moments sharded over DP) at DP2
/// equals plain AdamW at DP2 over 20 steps; each replica saves its own shards; a run killed
/// with SIGKILL resumes to the bit-identical result, resumes at DP1 with plain AdamW too
/// (within 1e-5 of the uninterrupted run), and refuses another TP.
#[test]
fn distributed_optimizer_matches_plain_adamw_and_resumes_at_any_dp() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (prefix, _) = dataset(dir.path(), 120);
    let extra = [
        "model.global_batch_size=4",
        "model.micro_batch_size=1",
        "model.data.seq_length=64",
        "trainer.max_steps=20",
        "trainer.val_check_interval=5",
        "trainer.limit_val_batches=1",
        "model.optim.lr=1e-2",
        "model.optim.weight_decay=0.1",
        "trainer.devices=2",
    ];
    let with = |exp: &str, out: &str, dist: bool| {
        let mut a = common(&prefix, &dir.path().join(exp), &dir.path().join(out));
        a.extend(extra.iter().map(|s| s.to_string()));
        if dist {
            a.push("model.optim.name=distributed_fused_adam".into());
        }
        a
    };
    run_world(2, &with("plain", "plain.nemo", false));
    let text = run_world(2, &with("zero1", "zero1.nemo", true));
    assert!(text.contains("TP 1 x PP 1 x DP 2"), "{text}");
    let (loss, w) = compare_runs(
        dir.path(),
        ("plain", "plain.nemo"),
        ("zero1", "zero1.nemo"),
        "distributed optimizer vs AdamW at DP2",
    );
    let ck = dir.path().join("zero1/checkpoints/step_00000020");
    for f in ["rank_0_dp0.pt", "rank_0_dp1.pt", "state.json"] {
        assert!(ck.join(f).is_file(), "{f} missing in {}", ck.display());
    }
    // each replica holds half of the masters and moments
    let size = |p: PathBuf| std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0) as f64;
    let whole = size(dir.path().join("plain/checkpoints/step_00000020/rank_0.pt"));
    let half = size(ck.join("rank_0_dp0.pt"));
    assert!(
        half > 0.4 * whole && half < 0.6 * whole,
        "shard file {half} bytes vs whole {whole}"
    );
    println!("ZeRO-1 vs AdamW at DP2: loss diff {loss:.2e}, weights {w:.2e}");

    // killed after the step-10 checkpoint, then the same command again
    let args = with("killed", "resumed.nemo", true);
    let port = free_port().to_string();
    let mut children = spawn_ranks(2, &args, torchrun_vars(2, &port));
    wait_for(
        &dir.path()
            .join("killed/checkpoints/step_00000010/state.json"),
    );
    for c in &mut children {
        c.kill().unwrap_or_else(|e| panic!("{e}")); // SIGKILL
        let _ = c.wait();
    }
    assert!(
        !dir.path().join("resumed.nemo").exists(),
        "the run finished before it was killed: the test proves nothing"
    );
    // the same checkpoint, twice more: for a DP1 plain-AdamW resume and a refused TP2 one
    for copy in ["killed_dp1", "killed_tp2"] {
        copy_dir(&dir.path().join("killed"), &dir.path().join(copy));
    }
    let text = run_world(2, &args);
    assert!(text.contains("resumed from"), "{text}");
    let a = weights(&dir.path().join("zero1.nemo"));
    let b = weights(&dir.path().join("resumed.nemo"));
    assert_eq!(a.len(), b.len());
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        assert!(x.equal(y), "{n} differs after resume");
    }
    assert_eq!(
        step_losses(&dir.path().join("zero1")),
        step_losses(&dir.path().join("killed"))
    );

    // another DP size and optimizer: the shards are joined and cut again (one process,
    // plain AdamW); the result follows the uninterrupted DP2 run
    let mut dp1 = with("killed_dp1", "dp1.nemo", false);
    dp1.push("trainer.devices=1".into());
    let text = show(&run_tp1(&dp1));
    assert!(
        text.contains("written by 2 ranks, distributed optimizer"),
        "{text}"
    );
    let (loss, w) = compare_runs(
        dir.path(),
        ("zero1", "zero1.nemo"),
        ("killed_dp1", "dp1.nemo"),
        "DP2 ZeRO-1 resumed at DP1 AdamW vs uninterrupted",
    );
    println!("resumed at DP1 with AdamW vs DP2 ZeRO-1: loss diff {loss:.2e}, weights {w:.2e}");

    // another TP is refused, naming both
    let mut tp2 = with("killed_tp2", "tp2.nemo", true);
    tp2.push("model.tensor_model_parallel_size=2".into());
    let port = free_port().to_string();
    let mut outs = wait_all(spawn_ranks(2, &tp2, torchrun_vars(2, &port)));
    let o = outs.remove(0);
    assert!(!o.status.success());
    assert!(
        show(&o).contains("written at TP 1 (by 2 ranks), this launch has TP 2"),
        "{}",
        show(&o)
    );
}

/// Waits (up to 5 minutes) until `marker` exists: a running job's checkpoint.
fn wait_for(marker: &Path) {
    let t0 = Instant::now();
    while !marker.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{e}"));
    for e in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{e}")) {
        let p = e.unwrap_or_else(|e| panic!("{e}")).path();
        let dst = to.join(p.file_name().unwrap_or_default());
        if p.is_dir() {
            copy_dir(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn resume_after_sigkill_is_exact() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (prefix, _) = dataset(dir.path(), 200);
    let extra = [
        "model.global_batch_size=8",
        "model.micro_batch_size=4",
        "model.data.seq_length=64",
        "trainer.max_steps=40",
        "trainer.val_check_interval=5",
        "trainer.limit_val_batches=1",
        "model.optim.lr=1e-2",
    ];
    let with = |exp: &str, out: &str| {
        let mut a = common(&prefix, &dir.path().join(exp), &dir.path().join(out));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    run_tp1(&with("straight", "straight.nemo"));

    let args = with("killed", "resumed.nemo");
    let mut child = distill_cmd(&bin())
        .arg("distill")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for(
        &dir.path()
            .join("killed/checkpoints/step_00000010/state.json"),
    );
    child.kill().unwrap_or_else(|e| panic!("{e}")); // SIGKILL
    let _ = child.wait();
    assert!(
        !dir.path().join("resumed.nemo").exists(),
        "the run finished before it was killed: the test proves nothing"
    );
    let o = run_tp1(&args);
    let text = show(&o);
    assert!(text.contains("resumed from"), "{text}");
    let a = weights(&dir.path().join("straight.nemo"));
    let b = weights(&dir.path().join("resumed.nemo"));
    assert_eq!(a.len(), b.len());
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        assert!(x.equal(y), "{n} differs after resume");
    }
    // the resumed log has every step once, with the same losses
    assert_eq!(
        step_losses(&dir.path().join("straight")),
        step_losses(&dir.path().join("killed"))
    );
}

#[test]
fn refuses_layouts_that_do_not_fit() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (prefix, _) = dataset(dir.path(), 60);
    let a = common(&prefix, dir.path(), &dir.path().join("x.nemo"));
    let run = |extra: &[&str]| {
        let o = distill_cmd(&bin())
            .arg("distill")
            .args(&a)
            .args(extra)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.status.code(), Some(2), "{}", show(&o));
        show(&o)
    };
    let t = run(&["model.pipeline_model_parallel_size=2"]);
    assert!(
        t.contains("tensor x pipeline parallel size (1 x 2) must divide the world size 1"),
        "{t}"
    );
    assert!(run(&["trainer.devices=2"]).contains("torchrun --nproc_per_node=2"));
    assert!(run(&["model.bogus=1"]).contains("not in the config"));
    let t = run(&["model.global_batch_size=3", "model.micro_batch_size=2"]);
    assert!(
        t.contains("must be a positive multiple of micro_batch_size (2) x data parallel size (1)"),
        "{t}"
    );
    // found once the models are read: every rank stops with the reason
    let ranks = |world: usize, extra: &[&str]| {
        let mut args = a.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(format!("trainer.devices={world}"));
        let port = free_port().to_string();
        let outs = wait_all(spawn_ranks(world, &args, torchrun_vars(world, &port)));
        for o in &outs {
            assert!(!o.status.success(), "{}", show(o));
        }
        show(&outs[0])
    };
    let t = ranks(
        2,
        &["model.num_layers=3", "model.pipeline_model_parallel_size=2"],
    );
    assert!(
        t.contains("student's num_layers 3 is not divisible by pipeline_model_parallel_size 2"),
        "{t}"
    );
    // the student's 4 layers split into 4 stages, the 2-layer teacher's do not
    let t = ranks(
        4,
        &["model.num_layers=4", "model.pipeline_model_parallel_size=4"],
    );
    assert!(
        t.contains("pipeline mismatch: the teacher's 2 layers do not split into 4 stages"),
        "{t}"
    );
}

/// Pipeline parallelism: TP1xPP2 and TP2xPP2 (1F1B over 4 micro-batches per step) equal TP1
/// over 20 steps, with tied embeddings (a copy on the last stage) and without; the saved PP2
/// student is in the `tp_rank_XX_pp_rank_YYY` layout, equals `nemo-tool reshard --pp 2` of
/// the TP1 result, and loads per stage into megatron-core with strict=True.
#[test]
fn pipeline_runs_match_tp1_for_20_steps() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (prefix, _) = dataset(dir.path(), 120);
    let extra = [
        "model.num_layers=2",
        "model.global_batch_size=4",
        "model.micro_batch_size=1",
        "trainer.max_steps=20",
        "trainer.val_check_interval=10",
        "trainer.limit_val_batches=1",
        "model.optim.lr=5e-3",
        "model.kd.chunk_tokens=8",
    ];
    let with = |name: &str, tied: bool, tp: u32, pp: u32| {
        let mut a = common(
            &prefix,
            &dir.path().join(name),
            &dir.path().join(format!("{name}.nemo")),
        );
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(format!("model.share_embeddings_and_output_weights={tied}"));
        a.push(format!("model.tensor_model_parallel_size={tp}"));
        a.push(format!("model.pipeline_model_parallel_size={pp}"));
        a.push(format!("trainer.devices={}", tp * pp));
        a
    };
    let mut report = Vec::new();
    for tied in [true, false] {
        let t = if tied { "tied" } else { "untied" };
        let base = format!("{t}_tp1");
        run_tp1(&with(&base, tied, 1, 1));
        let mut layouts = vec![(1, 2)];
        if tied {
            layouts.push((2, 2));
        }
        for (tp, pp) in layouts {
            let name = format!("{t}_tp{tp}pp{pp}");
            let text = run_world((tp * pp) as usize, &with(&name, tied, tp, pp));
            assert!(
                text.contains(&format!("TP {tp} x PP {pp} x DP 1")),
                "{text}"
            );
            let (l, w) = compare_runs(
                dir.path(),
                (&base, &format!("{base}.nemo")),
                (&name, &format!("{name}.nemo")),
                &format!("{name} vs TP1"),
            );
            report.push(format!("{name} vs TP1: loss diff {l:.2e}, weights {w:.2e}"));
            let out = dir.path().join(format!("{name}.nemo"));
            let ck = Checkpoint::open(&out).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(ck.config.pipeline_model_parallel_size(), u64::from(pp));
            let mut members: Vec<String> =
                ck.rank_files().iter().map(|r| r.member.clone()).collect();
            members.sort();
            let want: Vec<String> = (0..pp)
                .flat_map(|p| (0..tp).map(move |t| (t, p)))
                .map(|(t, p)| format!("tp_rank_{t:02}_pp_rank_{p:03}/model_weights.ckpt"))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            assert_eq!(members, want);
            if tp == 1 {
                // the TP1 run resharded to PP2 by the core: same members and keys, same
                // values within the runs' float tolerance
                let resharded = dir.path().join(format!("{base}_as_pp2.nemo"));
                let o = Command::new(bin())
                    .args(["reshard", "--tp", "1", "--pp", "2"])
                    .arg(dir.path().join(format!("{base}.nemo")))
                    .arg(&resharded)
                    .output()
                    .unwrap_or_else(|e| panic!("{e}"));
                assert!(o.status.success(), "reshard: {}", show(&o));
                let rc = Checkpoint::open(&resharded).unwrap_or_else(|e| panic!("{e}"));
                for (r, q) in ck.rank_files().iter().zip(rc.rank_files()) {
                    assert_eq!(r.member, q.member);
                    let keys = |f: &nemo_tool::model::checkpoint::RankFile| -> Vec<String> {
                        f.entries().map(|(k, _)| k.to_string()).collect()
                    };
                    assert_eq!(keys(r), keys(q), "{}", r.member);
                }
                let o = Command::new(bin())
                    .args(["diff", "--atol", "1e-5"])
                    .arg(&out)
                    .arg(&resharded)
                    .output()
                    .unwrap_or_else(|e| panic!("{e}"));
                // configs differ in nemo_path only; every tensor agrees
                let t = show(&o);
                assert!(
                    t.contains("0 differ, 0 only in A, 0 only in B"),
                    "diff vs reshard: {t}"
                );
            }
            // inspect and reshard read it: back to TP1 x PP1 it is the TP1 run's student
            let o = Command::new(bin())
                .args(["inspect", "--json"])
                .arg(&out)
                .output()
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(o.status.success(), "inspect: {}", show(&o));
            let flat = dir.path().join(format!("{name}_as_tp1.nemo"));
            let o = Command::new(bin())
                .args(["reshard", "--tp", "1", "--pp", "1"])
                .arg(&out)
                .arg(&flat)
                .output()
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(o.status.success(), "reshard: {}", show(&o));
            let o = Command::new(bin())
                .args(["diff", "--atol", "1e-5"])
                .arg(dir.path().join(format!("{base}.nemo")))
                .arg(&flat)
                .output()
                .unwrap_or_else(|e| panic!("{e}"));
            let t = show(&o);
            assert!(
                t.contains("0 differ, 0 only in A, 0 only in B"),
                "{name} resharded to TP1 vs the TP1 run: {t}"
            );
            if let Some(py) = python() {
                mcore_loads_stages(&py, &out, tp, pp, tied);
            }
        }
    }
    println!("{}", report.join("; "));
}

/// Every rank file of a PP student loads into megatron-core's GPTModel stage with
/// strict=True (tests/interop/helpers/mcore_load_pp.py under torchrun).
fn mcore_loads_stages(py: &Path, nemo: &Path, tp: u32, pp: u32, tied: bool) {
    let torchrun = py.with_file_name("torchrun");
    let o = distill_cmd(&torchrun)
        .arg(format!("--nproc_per_node={}", tp * pp))
        .arg("--master_addr=127.0.0.1")
        .arg(format!("--master_port={}", free_port()))
        .arg(root().join("tests/interop/helpers/mcore_load_pp.py"))
        .arg(nemo)
        .args([tp.to_string(), pp.to_string(), u8::from(tied).to_string()])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let text = show(&o);
    assert!(o.status.success(), "megatron-core load: {text}");
    for p in 0..pp {
        for t in 0..tp {
            assert!(
                text.contains(&format!("stage {p} tp {t}: ")),
                "stage {p} tp {t} did not load: {text}"
            );
        }
    }
}

/// DP2 x TP1 x PP2 (4 processes) killed with SIGKILL after a checkpoint resumes to the
/// bit-identical result; resuming at another PP is refused.
#[test]
fn pipeline_resume_after_sigkill_is_exact() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (prefix, _) = dataset(dir.path(), 120);
    let extra = [
        "model.num_layers=2",
        "model.share_embeddings_and_output_weights=true",
        "model.global_batch_size=4",
        "model.micro_batch_size=1",
        "trainer.max_steps=20",
        "trainer.val_check_interval=5",
        "trainer.limit_val_batches=1",
        "model.optim.lr=1e-2",
        "model.pipeline_model_parallel_size=2",
        "trainer.devices=4",
    ];
    let with = |exp: &str, out: &str| {
        let mut a = common(&prefix, &dir.path().join(exp), &dir.path().join(out));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let text = run_world(4, &with("straight", "straight.nemo"));
    assert!(text.contains("TP 1 x PP 2 x DP 2"), "{text}");
    let args = with("killed", "resumed.nemo");
    let port = free_port().to_string();
    let mut children = spawn_ranks(4, &args, torchrun_vars(4, &port));
    wait_for(
        &dir.path()
            .join("killed/checkpoints/step_00000010/state.json"),
    );
    for c in &mut children {
        c.kill().unwrap_or_else(|e| panic!("{e}")); // SIGKILL
        let _ = c.wait();
    }
    assert!(
        !dir.path().join("resumed.nemo").exists(),
        "the run finished before it was killed: the test proves nothing"
    );
    let ck = dir.path().join("killed/checkpoints/step_00000010");
    for f in ["rank_0_pp0.pt", "rank_0_pp1.pt", "state.json"] {
        assert!(ck.join(f).is_file(), "{f} missing in {}", ck.display());
    }
    copy_dir(&dir.path().join("killed"), &dir.path().join("killed_pp1"));
    let text = run_world(4, &args);
    assert!(text.contains("resumed from"), "{text}");
    let a = weights(&dir.path().join("straight.nemo"));
    let b = weights(&dir.path().join("resumed.nemo"));
    assert_eq!(a.len(), b.len());
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        assert!(x.equal(y), "{n} differs after resume");
    }
    assert_eq!(
        step_losses(&dir.path().join("straight")),
        step_losses(&dir.path().join("killed"))
    );
    // another PP is refused, naming both
    let mut pp1 = with("killed_pp1", "pp1.nemo");
    pp1.push("model.pipeline_model_parallel_size=1".into());
    let port = free_port().to_string();
    let mut outs = wait_all(spawn_ranks(4, &pp1, torchrun_vars(4, &port)));
    let o = outs.remove(0);
    assert!(!o.status.success());
    assert!(
        show(&o).contains("written at PP 2 (by 4 ranks), this launch has PP 1"),
        "{}",
        show(&o)
    );
}

/// MFU: with the device peak given (NEMO_TOOL_PEAK_TFLOPS; on a GPU the peak comes from its
/// name) every step logs `mfu` = tokens/s × FLOPs per token / peak, the FLOPs counted by hand
/// here for the fixture teacher and the test student; without a known peak (a CPU) there is
/// no `mfu`; a bad value is refused.
#[test]
fn mfu_is_logged_when_the_peak_is_known() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (prefix, _) = dataset(dir.path(), 60);
    let steps = ["trainer.max_steps=3", "trainer.limit_val_batches=0"];
    let run = |name: &str, peak: Option<&str>| {
        let exp = dir.path().join(name);
        let mut a = common(&prefix, &exp, &dir.path().join(format!("{name}.nemo")));
        a.extend(steps.iter().map(|s| s.to_string()));
        let mut c = distill_cmd(&bin());
        c.env_remove("NEMO_TOOL_PEAK_TFLOPS");
        if let Some(p) = peak {
            c.env("NEMO_TOOL_PEAK_TFLOPS", p);
        }
        let o = c
            .arg("distill")
            .args(&a)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        (o, exp)
    };
    // multiply-adds per token at seq 32, then 2 FLOPs each; the student's is trained (x3)
    let layer = |h: f64, q: f64, kv: f64, fc1: f64, ffn: f64| {
        h * (q + 2.0 * kv) + q * h + h * fc1 + ffn * h + q * 33.0
    };
    let teacher = 2.0 * (2.0 * layer(64.0, 64.0, 16.0, 192.0, 96.0) + 64.0 * 128.0);
    let student = 2.0 * (layer(32.0, 32.0, 16.0, 128.0, 64.0) + 32.0 * 128.0);
    let per_token = 3.0 * student + teacher;
    let (o, exp) = run("with_peak", Some("0.002"));
    assert!(o.status.success(), "{}", show(&o));
    let steps: Vec<_> = metrics(&exp)
        .into_iter()
        .filter(|v| v.get("kd_loss").is_some())
        .collect();
    assert_eq!(steps.len(), 3);
    for v in &steps {
        let (mfu, tps) = (v["mfu"].as_f64(), v["tokens_per_s"].as_f64());
        let (Some(mfu), Some(tps)) = (mfu, tps) else {
            panic!("no mfu/tokens_per_s in {v}");
        };
        let want = tps * per_token / 0.002e12;
        assert!(
            (mfu - want).abs() <= 1e-9 * want.max(1.0),
            "mfu {mfu}, want {want}"
        );
    }
    assert!(show(&o).contains(" mfu "), "{}", show(&o));
    let (o, exp) = run("no_peak", None);
    assert!(o.status.success(), "{}", show(&o));
    assert!(metrics(&exp).iter().all(|v| v.get("mfu").is_none()));
    let (o, _) = run("bad_peak", Some("fast"));
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(show(&o).contains("NEMO_TOOL_PEAK_TFLOPS"), "{}", show(&o));
}

/// `nemo-tool eval args` as `world` ranks (torchrun's variables); rank 0's output.
fn eval_world(world: usize, args: &[String]) -> String {
    let port = free_port().to_string();
    let outs = wait_all(spawn_sub("eval", world, args, torchrun_vars(world, &port)));
    for (rank, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "eval rank {rank}: {}", show(o));
    }
    show(&outs[0])
}

/// The teacher fixture with the output weights of every residual branch (attention
/// `linear_proj`, MLP `linear_fc2`) zeroed: its logits come from the embedding, the final norm
/// and the output layer only, whose TP shards compute every logit whole, so its TP1 and TP2
/// forwards give the same bits (the real fixture's differ in the last bits: row-parallel
/// layers sum partial products in another order), and a TP1 cache must then equal the live
/// teacher at TP2 exactly.
fn tp_invariant_teacher(dir: &Path) -> PathBuf {
    use nemo_tool::distill::save::{self, StudentArchive};
    let ck = Checkpoint::open(teacher()).unwrap_or_else(|e| panic!("{e}"));
    let config = ck
        .read_member("model_config.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    let artifacts = ck
        .artifacts
        .iter()
        .map(|a| {
            (
                a.clone(),
                ck.read_member(a).unwrap_or_else(|e| panic!("{e}")),
            )
        })
        .collect();
    let params: Vec<(String, tch::Tensor)> = weights(&teacher())
        .into_iter()
        .map(|(n, t)| {
            let t = if n.ends_with("linear_proj.weight") || n.ends_with("linear_fc2.weight") {
                t.zeros_like()
            } else {
                t
            };
            (n, t)
        })
        .collect();
    assert_eq!(
        params
            .iter()
            .filter(|(_, t)| t.abs().max().double_value(&[]) == 0.0)
            .count(),
        4,
        "2 layers x (linear_proj, linear_fc2)"
    );
    let out = dir.join("teacher_tp_invariant.nemo");
    save::write(
        &StudentArchive {
            config: String::from_utf8_lossy(config.as_slice()).into_owned(),
            artifacts,
            ranks: vec![params],
            te_norm_names: false,
        },
        &out,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    out
}

/// `eval TEACHER --teacher-cache OUT` args for the runs of [`cache_run`]: the train split's
/// first `train` samples and the validation split's first `val`, written `micro` windows per
/// forward and 8 positions per logits chunk (as the runs compute the teacher: its logits are
/// then the same bits).
fn cache_args(
    teacher: &Path,
    prefix: &Path,
    out: &Path,
    train: usize,
    val: usize,
    dtype: &str,
) -> Vec<String> {
    vec![
        teacher.display().to_string(),
        "--data".into(),
        prefix.display().to_string(),
        "--splits-string".into(),
        "90,10,0".into(),
        "--seq-length".into(),
        "32".into(),
        "--split".into(),
        "train,validation".into(),
        "--samples".into(),
        format!("{train},{val}"),
        "--topk".into(),
        "8".into(),
        "--micro-batch".into(),
        "1".into(),
        "--chunk".into(),
        "8".into(),
        "--cache-dtype".into(),
        dtype.into(),
        "--json".into(),
        "--teacher-cache".into(),
        out.display().to_string(),
    ]
}

/// Overrides of a 10-step run with ModelOpt's top-k loss (k 8) against `teacher`, from
/// `cache` when given, at `tp` x `pp` over `world` ranks.
#[allow(clippy::too_many_arguments)]
fn cache_run(
    dir: &Path,
    prefix: &Path,
    teacher: &Path,
    name: &str,
    cache: Option<&Path>,
    tp: u32,
    pp: u32,
    world: u32,
) -> Vec<String> {
    let mut a = common(prefix, &dir.join(name), &dir.join(format!("{name}.nemo")));
    a[0] = format!("model.kd_teacher_restore_from_path={}", teacher.display());
    a.extend(
        [
            "model.num_layers=2",
            "model.global_batch_size=4",
            "model.micro_batch_size=1",
            "trainer.max_steps=10",
            "trainer.val_check_interval=5",
            "trainer.limit_val_batches=1",
            "model.optim.lr=1e-2",
            "model.kd.chunk_tokens=8",
            "model.kd.logit_kl_topk=8",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    a.push(format!("model.tensor_model_parallel_size={tp}"));
    a.push(format!("model.pipeline_model_parallel_size={pp}"));
    a.push(format!("trainer.devices={world}"));
    if let Some(c) = cache {
        a.push(format!("model.kd.teacher_cache={}", c.display()));
    }
    a
}

/// Every training and validation loss of a run, as logged (full f64).
fn all_losses(exp: &Path) -> Vec<(String, f64)> {
    metrics(exp)
        .iter()
        .flat_map(|v| {
            let step = v["step"].as_u64().unwrap_or(0);
            ["kd_loss", "val_kd_loss", "val_loss"]
                .into_iter()
                .filter_map(move |k| v.get(k)?.as_f64().map(|x| (format!("{k}@{step}"), x)))
        })
        .collect()
}

/// Two runs gave the same bits: every logged loss and every weight of the saved student.
fn assert_identical(dir: &Path, a: &str, b: &str) {
    let (la, lb) = (all_losses(&dir.join(a)), all_losses(&dir.join(b)));
    assert_eq!(la.len(), 16, "{a}: 10 steps, 3 validations of 2 losses");
    assert_eq!(la.len(), lb.len());
    for ((ka, x), (kb, y)) in la.iter().zip(&lb) {
        assert_eq!(ka, kb);
        assert_eq!(x.to_bits(), y.to_bits(), "{a} vs {b}, {ka}: {x} vs {y}");
    }
    let wa = weights(&dir.join(format!("{a}.nemo")));
    let wb = weights(&dir.join(format!("{b}.nemo")));
    assert_eq!(wa.len(), wb.len());
    for ((n1, x), (n2, y)) in wa.iter().zip(&wb) {
        assert_eq!(n1, n2);
        assert!(x.equal(y), "{a} vs {b}: {n1} differs");
    }
}

/// The offline teacher cache stands in for the teacher exactly: training from an fp32 cache of
/// the teacher's top-8 logits equals training with the live teacher's ModelOpt top-k loss bit
/// for bit (every loss, every weight) at TP1, and at TP2 x DP2 and TP1 x PP2 from the same
/// cache written at TP1 (TP-invariant teacher, see [`tp_invariant_teacher`]; the premise, equal
/// caches written at TP1 and TP2, is checked). With the real fixture, whose TP2 forward
/// differs from its TP1 forward in the last bits, a TP2 cache gives the live TP2 x DP2 run
/// exactly, and the TP1 cache stays within 1e-5 of it. A bf16 cache takes at most
/// k·6 + 16 bytes per token.
#[test]
fn teacher_cache_stands_in_for_the_teacher_exactly() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path();
    let (prefix, _) = dataset(d, 120);
    let inv = tp_invariant_teacher(d);
    // 10 steps x global batch 4; one validation batch of 4
    let (c1, c2) = (d.join("cache_tp1"), d.join("cache_tp2"));
    let text = eval_world(1, &cache_args(&inv, &prefix, &c1, 40, 4, "fp32"));
    assert!(text.contains("\"records\": 46"), "{text}");
    eval_world(2, &cache_args(&inv, &prefix, &c2, 40, 4, "fp32"));
    // the key, the logits and the ids of each record (the log-normaliser after them is summed
    // over TP ranks in another order: it is not what the loss reads)
    let logits_and_ids = |c: &Path| -> Vec<Vec<u8>> {
        let b = std::fs::read(c.join("shard_00000.bin")).unwrap_or_else(|e| panic!("{e}"));
        let (rec, used) = (16 + 32 * 8 * 8 + 32 * 4, 16 + 32 * 8 * 8);
        assert_eq!(b.len(), 46 * rec);
        b.chunks(rec).map(|r| r[..used].to_vec()).collect()
    };
    assert!(
        logits_and_ids(&c1) == logits_and_ids(&c2),
        "the TP-invariant teacher's TP1 and TP2 caches differ"
    );

    let run = |name: &str, cache: Option<&Path>, tp: u32, pp: u32, world: u32| {
        let a = cache_run(d, &prefix, &inv, name, cache, tp, pp, world);
        let text = if world == 1 {
            show(&run_tp1(&a))
        } else {
            run_world(world as usize, &a)
        };
        if cache.is_some() {
            assert!(text.contains("the teacher is not run"), "{text}");
        }
    };
    run("live_tp1", None, 1, 1, 1);
    run("cache_tp1", Some(&c1), 1, 1, 1);
    assert_identical(d, "live_tp1", "cache_tp1");
    run("live_tp2dp2", None, 2, 1, 4);
    run("cache_tp2dp2", Some(&c1), 2, 1, 4);
    assert_identical(d, "live_tp2dp2", "cache_tp2dp2");
    run("live_pp2", None, 1, 2, 2);
    run("cache_pp2", Some(&c1), 1, 2, 2);
    assert_identical(d, "live_pp2", "cache_pp2");

    // the real fixture: exact from a cache of the same layout, close from another's
    let real = teacher();
    let (r1, r2) = (d.join("real_tp1"), d.join("real_tp2"));
    eval_world(1, &cache_args(&real, &prefix, &r1, 40, 4, "fp32"));
    eval_world(2, &cache_args(&real, &prefix, &r2, 40, 4, "fp32"));
    let rrun = |name: &str, cache: Option<&Path>| {
        run_world(4, &cache_run(d, &prefix, &real, name, cache, 2, 1, 4));
    };
    rrun("real_live", None);
    rrun("real_cache_tp2", Some(&r2));
    assert_identical(d, "real_live", "real_cache_tp2");
    rrun("real_cache_tp1", Some(&r1));
    let (la, lb) = (
        all_losses(&d.join("real_live")),
        all_losses(&d.join("real_cache_tp1")),
    );
    let worst = la
        .iter()
        .zip(&lb)
        .map(|((_, x), (_, y))| (x - y).abs())
        .fold(0.0f64, f64::max);
    assert!(worst <= 1e-5, "TP1 cache at TP2 x DP2: loss diff {worst}");

    // compressed: bf16 values, u32 ids, f32 lse, the key: at most k·6 + 16 bytes a token
    let b = d.join("cache_bf16");
    let text = eval_world(1, &cache_args(&inv, &prefix, &b, 40, 4, "bf16"));
    let bytes: u64 = std::fs::read_dir(&b)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("shard_"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let per_token = bytes as f64 / (46.0 * 32.0);
    assert!(
        per_token <= 8.0 * 6.0 + 16.0,
        "{per_token} bytes/token: {text}"
    );
    println!(
        "teacher cache: bit-identical to the live teacher at TP1, TP2xDP2 and PP2 (TP1 cache); real fixture from a TP1 cache at TP2xDP2: max loss diff {worst:.2e}; bf16 cache {per_token:.1} bytes/token (k=8 bound 64)"
    );
}

/// A cache is refused for a run it was not made for: another dataset, another tokenizer, more
/// samples than it holds, a loss it cannot serve; and an existing cache is not overwritten.
#[test]
fn teacher_cache_refusals() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path();
    let (prefix, tok) = dataset(d, 120);
    let cache = d.join("cache");
    eval_world(1, &cache_args(&teacher(), &prefix, &cache, 40, 4, "bf16"));
    let refused = |args: Vec<String>| {
        let o = distill_cmd(&bin())
            .arg("distill")
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!o.status.success(), "{}", show(&o));
        show(&o)
    };
    let base = |name: &str, pfx: &Path| cache_run(d, pfx, &teacher(), name, Some(&cache), 1, 1, 1);
    // another dataset: same shape, other tokens
    let other = d.join("other");
    std::fs::create_dir_all(&other).unwrap_or_else(|e| panic!("{e}"));
    let (other_prefix, _) = dataset(&other, 121);
    let t = refused(base("a", &other_prefix));
    assert!(t.contains("made for another datasets"), "{t}");
    // another tokenizer file
    let mut bytes = std::fs::read(&tok).unwrap_or_else(|e| panic!("{e}"));
    bytes.push(b'\n');
    let tok2 = d.join("other_tokenizer.model");
    std::fs::write(&tok2, bytes).unwrap_or_else(|e| panic!("{e}"));
    let mut a = base("b", &prefix);
    a.push(format!("model.tokenizer.model={}", tok2.display()));
    let t = refused(a);
    assert!(t.contains("made for another tokenizer"), "{t}");
    // the same tokenizer as a file is accepted (the check is by content)
    let mut a = base("ok", &prefix);
    a.push(format!("model.tokenizer.model={}", tok.display()));
    a.push("trainer.max_steps=1".into());
    run_tp1(&a);
    // another sequence length or seed
    let mut a = base("c", &prefix);
    a.push("model.seed=7".into());
    assert!(refused(a).contains("made for another seed"));
    // more steps than cached
    let mut a = base("e", &prefix);
    a.push("trainer.max_steps=30".into());
    let t = refused(a);
    assert!(
        t.contains("train samples are not cached") && t.contains("--teacher-cache"),
        "{t}"
    );
    // k beyond the cache's; a loss the cache cannot serve; pairs need the teacher
    let mut a = base("f", &prefix);
    a.push("model.kd.logit_kl_topk=16".into());
    assert!(refused(a).contains("top 8 logits per token, logit_kl_topk is 16"));
    let a: Vec<String> = base("g", &prefix)
        .into_iter()
        .filter(|x| !x.starts_with("model.kd.logit_kl_topk"))
        .collect();
    assert!(refused(a).contains("set model.kd.logit_kl_topk"));
    let mut a = base("h", &prefix);
    a.push(
        "model.kd.intermediate_layer_pairs=[[decoder.final_layernorm,decoder.final_layernorm]]"
            .into(),
    );
    assert!(refused(a).contains("intermediate_layer_pairs need the live teacher"));
    // a corrupted shard
    let bad = d.join("bad");
    copy_dir(&cache, &bad);
    let shard = bad.join("shard_00000.bin");
    let mut b = std::fs::read(&shard).unwrap_or_else(|e| panic!("{e}"));
    b[100] ^= 1;
    std::fs::write(&shard, b).unwrap_or_else(|e| panic!("{e}"));
    let a: Vec<String> = base("i", &prefix)
        .into_iter()
        .map(|x| {
            if x.starts_with("model.kd.teacher_cache=") {
                format!("model.kd.teacher_cache={}", bad.display())
            } else {
                x
            }
        })
        .collect();
    assert!(refused(a).contains("sha256"));
    // no overwrite without --force
    let o = distill_cmd(&bin())
        .arg("eval")
        .args(cache_args(&teacher(), &prefix, &cache, 40, 4, "bf16"))
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !o.status.success() && show(&o).contains("--force"),
        "{}",
        show(&o)
    );
}

/// NeMo 2 and Megatron-LM folders (issue 17; written here by `convert --to nemo2|mlm` from the
/// fixture, whose equality with megatron-core's own folders tests/interop/test_foreign.py
/// shows) serve as the teacher and as the student's starting weights: each run equals the run
/// from the fixture's `.nemo`, loss for loss, bit for bit.
#[test]
fn nemo2_and_megatron_lm_folders_as_teacher_and_student() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path();
    let (prefix, _) = dataset(d, 60);
    for (to, extra) in [("nemo2", vec![]), ("mlm", vec!["--tp", "2"])] {
        let o = Command::new(bin())
            .arg("convert")
            .arg(teacher())
            .args(["--to", to])
            .args(&extra)
            .arg(d.join(to))
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(o.status.success(), "convert --to {to}: {}", show(&o));
    }
    let run = |name: &str, teacher_path: &Path, student: Option<&Path>| {
        let exp = d.join(name);
        let mut args = common(&prefix, &exp, &d.join(format!("{name}.nemo")));
        args[0] = format!(
            "model.kd_teacher_restore_from_path={}",
            teacher_path.display()
        );
        if let Some(s) = student {
            // the restored student keeps its own shape: drop the small-student overrides
            args.retain(|a| {
                ![
                    "model.num_",
                    "model.hidden_size",
                    "model.ffn_",
                    "model.make_vocab",
                ]
                .iter()
                .any(|p| a.starts_with(p))
            });
            args.push(format!("model.restore_from_path={}", s.display()));
        }
        args.extend([
            "trainer.max_steps=4".to_string(),
            "model.global_batch_size=2".into(),
        ]);
        run_tp1(&args);
        let l = step_losses(&exp);
        assert_eq!(l.len(), 4, "{name}");
        l
    };
    let fixture = teacher();
    let base = run("base", &fixture, None);
    assert_eq!(run("t_nemo2", &d.join("nemo2"), None), base);
    assert_eq!(run("t_mlm", &d.join("mlm"), None), base);
    let restored = run("s_nemo", &fixture, Some(&fixture));
    // a student restored from the teacher's own weights starts with a KD loss of zero
    assert!(restored[0].1.abs() < 1e-6, "{restored:?}");
    assert_eq!(run("s_nemo2", &fixture, Some(&d.join("nemo2"))), restored);
    assert_eq!(run("s_mlm", &fixture, Some(&d.join("mlm"))), restored);
}
