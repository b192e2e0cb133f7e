//! `nemo-tool distill`: logit knowledge distillation, a drop-in for NeMo's
//! `megatron_gpt_distillation.py` (Hydra-style overrides, torchrun launch).

use std::path::PathBuf;
use std::process::ExitCode;

/// Distill a teacher into a student (NeMo's megatron_gpt_distillation.py, same config keys).
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Launch one process per rank (world = TP x PP x DP) with torchrun:\n\n  \
torchrun --no-python --nproc_per_node=$TP nemo-tool distill \\\n      \
model.restore_from_path=$STUDENT_CKPT model.kd_teacher_restore_from_path=$TEACHER_CKPT \\\n      \
model.tensor_model_parallel_size=$TP model.tokenizer.model=$TOKENIZER \\\n      \
model.data.data_prefix=[1.0,path/to/tokenized/data] model.nemo_path=final.nemo \\\n      \
trainer.precision=bf16 trainer.devices=$TP\n\n\
or with srun under Slurm (no torchrun), e.g. TP2 x DP8 on two 8-GPU nodes:\n\n  \
srun -N2 --ntasks-per-node=8 nemo-tool distill ... model.tensor_model_parallel_size=2 \\\n      \
trainer.devices=8 trainer.num_nodes=2 model.optim.name=distributed_fused_adam\n\n\
Add model.pipeline_model_parallel_size=2 to split both models into 2 pipeline stages (1F1B).\n\
STUDENT_CKPT=None initialises the student from the model.* architecture keys.\n\
Overrides: key=value (existing key), +key=value (new key), ++key=value (either), ~key (delete).\n\
Print the full default config with --print-config. Docs: docs/distill.md"
)]
pub struct Args {
    /// A YAML config replacing the built-in default (NeMo's megatron_llama_distill.yaml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the resolved config (after overrides) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Only run one validation of the student (model.restore_from_path) and print it.
    #[arg(long)]
    pub validate_only: bool,
    /// Hydra-style overrides: a.b=v, +a.b=v, ++a.b=v, ~a.b.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "OVERRIDES"
    )]
    pub overrides: Vec<String>,
}

#[cfg(not(feature = "distill"))]
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!(
        "this nemo-tool was built without the `distill` feature (libtorch); rebuild with `cargo build --release --features distill` (see docs/distill.md)"
    )
}

#[cfg(feature = "distill")]
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(feature = "distill")]
fn load_config(args: &Args) -> anyhow::Result<nemo_tool::distill::runconfig::RunConfig> {
    use anyhow::Context;
    use nemo_tool::distill::runconfig::RunConfig;
    let mut cfg = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            RunConfig::from_yaml(&p.display().to_string(), &text)?
        }
        None => RunConfig::distill_default(),
    };
    cfg.apply(&args.overrides)?;
    Ok(cfg)
}

#[cfg(feature = "distill")]
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    use nemo_tool::distill::job::Job;
    use nemo_tool::distill::parallel::{Backend, Grid, Launch};
    use nemo_tool::distill::train::{self, Event};

    let cfg = load_config(&args)?;
    if args.print_config {
        print!("{}", cfg.to_yaml());
        return Ok(ExitCode::SUCCESS);
    }
    let launch = Launch::from_env()?;
    let job = Job::resolve(&cfg, launch.world as u64)?;
    let cuda = !job.force_cpu && tch::Cuda::is_available();
    let (device, backend) = if cuda {
        (tch::Device::Cuda(launch.local_rank as usize), Backend::Nccl)
    } else {
        (tch::Device::Cpu, Backend::Gloo)
    };
    let tp = i32::try_from(job.tp).unwrap_or(i32::MAX);
    let pp = i32::try_from(job.pp).unwrap_or(i32::MAX);
    let grid = Grid::init(&launch, backend, tp, pp)?;
    let rank0 = grid.world.rank() == 0;
    if args.validate_only {
        let v = train::evaluate(&job, &grid, device)?;
        if rank0 {
            match v {
                Some(v) => println!(
                    "validation: val_kd_loss {:.6} val_loss {:.6}",
                    v.val_kd_loss, v.val_loss
                ),
                None => println!("validation: trainer.limit_val_batches is 0, nothing to do"),
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let every = job.log_every_n_steps;
    let max = job.max_steps;
    let mut on = |e: Event| match e {
        Event::Info(s) => {
            if tty {
                eprint!("\r\x1b[K");
            }
            eprintln!("distill: {s}");
        }
        Event::Step(r) => {
            let mut line = format!(
                "step {}/{max} kd_loss {:.5} lr {:.3e} grad_norm {:.4} tokens/s {:.0}",
                r.step, r.kd_loss, r.lr, r.grad_norm, r.tokens_per_s
            );
            let terms: Vec<String> = [
                ("logits_loss", r.logits_loss),
                ("intermediate_loss", r.intermediate_loss),
                ("lm_loss", r.lm_loss),
                ("moe_load_balancing_loss", r.moe_load_balancing_loss),
            ]
            .iter()
            .filter_map(|(k, v)| v.map(|v| format!("{k} {v:.5}")))
            .collect();
            if !terms.is_empty() {
                line.push_str(&format!(" ({})", terms.join(" ")));
            }
            if let Some(m) = r.mfu {
                line.push_str(&format!(" mfu {:.1}%", 100.0 * m));
            }
            if tty {
                let pct = 100.0 * r.step as f64 / max as f64;
                eprint!("\r\x1b[K[{pct:5.1}%] {line}");
            } else if r.step % every == 0 || r.step == max || r.step == 1 {
                eprintln!("distill: {line}");
            }
        }
        Event::Val(v) => {
            if tty {
                eprint!("\r\x1b[K");
            }
            eprintln!(
                "distill: validation at step {}: val_kd_loss {:.6} val_loss {:.6}",
                v.step, v.val_kd_loss, v.val_loss
            );
        }
    };
    let out = train::run(&job, &grid, device, &mut on)?;
    if rank0 {
        if tty {
            eprintln!();
        }
        let h = &out.history;
        // steady-state throughput: skip the first steps (allocator and thread-pool warm-up)
        let skip = (h.train.len() / 10).clamp(usize::from(h.train.len() > 1), 5);
        let tail = &h.train[skip.min(h.train.len())..];
        let tps = if tail.is_empty() {
            0.0
        } else {
            tail.len() as f64 / tail.iter().map(|r| 1.0 / r.tokens_per_s).sum::<f64>()
        };
        println!("student: {}", out.nemo_path.display());
        println!("experiment folder: {}", out.exp_dir.display());
        println!("plot: {}", out.plot.display());
        println!(
            "distill: done steps={} tokens_per_s={:.1} peak_rss_kib={} final_kd_loss={:.6}{}",
            h.step,
            tps,
            peak_rss_kib(),
            h.train.last().map_or(f64::NAN, |r| r.kd_loss),
            h.val
                .last()
                .map(|v| format!(
                    " val_kd_loss={:.6} val_loss={:.6}",
                    v.val_kd_loss, v.val_loss
                ))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}
