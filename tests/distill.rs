//! Acceptance tests of the distill compute engine (feature `distill`, CPU, Gloo):
//! logits of the tiny mcore Llama fixtures at TP1 and TP2 (two processes, and under torchrun),
//! loss values and student-logit gradients for every loss kind (also handed to the Python
//! interop test `tests/interop/test_distill_loss.py`), full-model gradients at TP2 against TP1
//! through the chunked loss, and the chunked loss's peak memory.
//!
//! Multi-process tests re-run this test binary with `--exact worker_entry` and
//! `NEMO_DISTILL_WORKER` set; `worker_entry` does nothing without that variable.
#![cfg(feature = "distill")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nemo_tool::distill::loss::{KdLoss, LossKind};
use nemo_tool::distill::model::{Gpt, InitFrom};
use nemo_tool::distill::parallel::{Backend, Dim, Launch, ProcessGroup, RankLayout};
use nemo_tool::distill::spec::GptSpec;
use nemo_tool::distill::weights::Source;
use nemo_tool::formats::torch::{Dtype, TorchFile};
use nemo_tool::model::checkpoint::Checkpoint;
use tch::{Device, Kind, Tensor};

/// Our logits against `fixtures/mcore/llama/logits/logits_tp1.pt`, megatron-core's logits computed
/// on the machine that made the fixture. A stored reference is unavoidable here: this test runs
/// without Python (`cargo test --features distill` needs only libtorch), so megatron-core cannot
/// run in the same process; `tests/interop/test_eval.py` checks the same logits against
/// megatron-core computed in its own run. The tolerance covers what two machines and two
/// implementations of the same fp32 math can differ by: a different op order (fused attention,
/// TP splits) and different CPU kernels (BLAS blocking, SIMD width) round differently, about
/// 1e-6 on logits up to 4.4 in magnitude (TP2 vs TP1 in megatron-core itself: 1.7e-6, see
/// logits/diff_tp2_vs_tp1.json). A mis-mapped or mis-split tensor moves the logits by whole
/// units (logits/diff_hf_vs_mcore.json, negative controls: 2.1 to 3.0).
const LOGITS_TOL: f64 = 1e-4;
const GRAD_TOL: f64 = 1e-5;

/// The repository root: NEMO_TOOL_ROOT when the binary runs from a copy elsewhere
/// (scripts/gpu_check.sh), else where it was built.
fn root() -> PathBuf {
    std::env::var_os("NEMO_TOOL_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn fixture(rel: &str) -> PathBuf {
    root().join("fixtures/mcore/llama").join(rel)
}

/// A tensor saved by torch.save as the whole file.
fn load_pt(path: &Path) -> Tensor {
    let f: TorchFile =
        nemo_tool::formats::torch::load_file(path, &nemo_tool::model::checkpoint::weights_policy())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let t = f
        .root
        .as_tensor()
        .unwrap_or_else(|| panic!("{}: not a tensor", path.display()));
    let kind = match t.dtype {
        Dtype::F32 => Kind::Float,
        Dtype::I64 => Kind::Int64,
        d => panic!("{}: unexpected dtype {d:?}", path.display()),
    };
    let bytes = t
        .to_vec()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    Tensor::from_data_size(&bytes, &shape, kind)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Deterministic pseudo-random values (no global RNG: tests run in parallel threads).
fn wavy(shape: &[i64], a: f64, b: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    (Tensor::arange(n, (Kind::Double, Device::Cpu)) * a + b)
        .sin()
        .multiply_scalar(4.0)
        .view(shape)
        .to_kind(Kind::Float)
}

fn mask(b: i64, s: i64) -> Tensor {
    // a few padded positions, as a real batch has
    let m = Tensor::ones([b, s], (Kind::Float, Device::Cpu));
    let _ = m.narrow(1, s - 3, 3).get(1).fill_(0.0);
    let _ = m.get(0).narrow(0, 0, 1).fill_(0.0);
    m
}

fn model(path: &Path, pg: &ProcessGroup, trainable: bool) -> Gpt {
    let ck = Checkpoint::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let src = Source::new(&ck).unwrap_or_else(|e| panic!("{e}"));
    let tp = pg.world() as u64;
    let vocab = src
        .padded_vocab(ck.config.make_vocab_size_divisible_by(), tp)
        .unwrap_or_else(|e| panic!("{e}"));
    let spec = GptSpec::from_config(&ck.config, tp, vocab).unwrap_or_else(|e| panic!("{e}"));
    Gpt::new(
        spec,
        &InitFrom::Checkpoint(&src),
        pg,
        Kind::Float,
        Device::Cpu,
        trainable,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn random_student(like: &Gpt, pg: &ProcessGroup) -> Gpt {
    let mut spec = like.spec.clone();
    spec.tp = pg.world() as i64;
    Gpt::new(
        spec,
        &InitFrom::Random { seed: 7 },
        pg,
        Kind::Float,
        Device::Cpu,
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn kinds() -> Vec<(&'static str, KdLoss)> {
    let k = |kind, t| KdLoss::new(kind, t).unwrap_or_else(|e| panic!("{e}"));
    vec![
        ("forward_kl", k(LossKind::ForwardKl, 1.0)),
        ("forward_kl_t2", k(LossKind::ForwardKl, 2.0)),
        ("reverse_kl", k(LossKind::ReverseKl, 1.0)),
        ("jsd_b03", k(LossKind::Jsd { beta: 0.3 }, 1.5)),
        ("topk_8", k(LossKind::TopK { k: 8 }, 1.0)),
        // ModelOpt's own losses (tests/interop/test_distill_modelopt.py compares with them)
        ("topk_modelopt_8", k(LossKind::ModeloptTopK { k: 8 }, 1.5)),
        (
            "forward_kl_t2_sq",
            k(LossKind::ForwardKl, 2.0).with_temperature_squared(true),
        ),
        (
            "kl_lm_s2",
            k(LossKind::ForwardKl, 1.0).with_lm_loss(Some(2.0)),
        ),
    ]
}

/// Next-token ids `[b, s]` in `0..v` (the LM loss's labels; every rank's range is hit).
fn labels(b: i64, s: i64, v: i64) -> Tensor {
    (Tensor::arange(b * s, (Kind::Int64, Device::Cpu)) * 37 + 11)
        .remainder(v)
        .view([b, s])
}

/// Where the loss hand-off for the Python interop test goes.
fn interop_dir() -> PathBuf {
    std::env::var_os("NEMO_TOOL_DISTILL_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/interop/distill_loss"))
}

fn write_f32(path: &Path, t: &Tensor) {
    let t = t.to_kind(Kind::Float).contiguous();
    let n = t.numel();
    let mut v = vec![0f32; n];
    t.copy_data(&mut v, n);
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    // the in-process TP1 test and the TP2 workers write the same inputs concurrently:
    // write aside and rename, so a reader never sees a torn file
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Every check, at the group's TP size (1 in process, 2 in the workers). Returns a report.
fn tp_checks(pg: &ProcessGroup) -> String {
    let tp = pg.world();
    let rank = pg.rank() as i64;
    let mut report = String::new();
    if rank == 0 && tp == 1 {
        // the worker binary for tests/interop/test_distill_mcore.py
        let dir = interop_dir();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let p = dir.join("worker_exe.txt");
        std::fs::write(&p, exe().display().to_string())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    let tokens = load_pt(&fixture("logits/tokens.pt"));
    let want = load_pt(&fixture("logits/logits_tp1.pt"));
    let (b, s) = (tokens.size()[0], tokens.size()[1]);

    // (a) forward: every checkpoint layout, resharded on the fly where TP differs
    for name in [
        "tiny_llama_tp1.nemo",
        "tiny_llama_tp2.nemo",
        "tiny_llama_dist_tp1.nemo",
    ] {
        let m = model(&fixture(&format!("nemo/{name}")), pg, false);
        let got = tch::no_grad(|| m.forward_gathered(&tokens)).unwrap_or_else(|e| panic!("{e}"));
        let d = max_diff(&got, &want);
        report += &format!("logits {name} at TP{tp}: max abs diff {d:.3e}\n");
        assert!(d <= LOGITS_TOL, "logits {name} at TP{tp}: max abs diff {d}");
    }

    // (b) loss value and gradient w.r.t. the student logits, vs TP1 in this process
    let v = want.size()[2];
    let vl = v / tp as i64;
    let st = wavy(&[b, s, v], 0.731, 0.2);
    let te = wavy(&[b, s, v], 0.377, 1.1);
    let mk = mask(b, s);
    let lab = labels(b, s, v);
    let single = ProcessGroup::single();
    let out = interop_dir();
    if rank == 0 {
        std::fs::create_dir_all(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        write_f32(&out.join("student.f32"), &st);
        write_f32(&out.join("teacher.f32"), &te);
        write_f32(&out.join("mask.f32"), &mk);
        write_f32(&out.join("labels.f32"), &lab);
    }
    let mut summary = Vec::new();
    for (name, k) in kinds() {
        let grad_of = |pg: &ProcessGroup, lo: i64, n: i64| {
            let sl = st.narrow(-1, lo, n).detach().set_requires_grad(true);
            let tl = te.narrow(-1, lo, n);
            let l = k
                .masked_mean_with(pg, &sl, &tl, Some(&lab), &mk)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            l.backward();
            (l.double_value(&[]), sl.grad())
        };
        let (l1, g1) = grad_of(&single, 0, v);
        let (lt, gl) = grad_of(pg, rank * vl, vl);
        let g = Tensor::cat(&pg.all_gather(&gl).unwrap_or_else(|e| panic!("{e}")), -1);
        let (dl, dg) = ((lt - l1).abs(), max_diff(&g, &g1));
        report += &format!(
            "loss {name} TP{tp}: {lt:.8} (TP1 {l1:.8}, diff {dl:.2e}), grad diff {dg:.2e}\n"
        );
        assert!(
            dl <= 1e-6 * (1.0 + l1.abs()) && dg <= 1e-7,
            "loss {name} at TP{tp} differs from TP1"
        );
        if rank == 0 {
            write_f32(&out.join(format!("grad_{name}_tp{tp}.f32")), &g);
        }
        summary.push(format!("\"{name}_tp{tp}\": {lt:.10e}"));
    }
    if rank == 0 {
        let p = out.join(format!("losses_tp{tp}.json"));
        let text = format!("{{\"shape\": [{b}, {s}, {v}], {}}}\n", summary.join(", "));
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }

    // (c) full-model gradients through the chunked loss, vs unchunked TP1 in this process
    let teacher = model(&fixture("nemo/tiny_llama_tp1.nemo"), pg, false);
    let teacher1 = model(&fixture("nemo/tiny_llama_tp1.nemo"), &single, false);
    for (name, k) in kinds() {
        let student = random_student(&teacher, pg);
        let next = labels(b, s, 100);
        let loss = k
            .chunked_backward_parts(
                &student,
                nemo_tool::distill::loss::Teacher::Model(&teacher),
                &tokens,
                Some(&next),
                &mk,
                5,
                nemo_tool::distill::model::Recompute::None,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .total;
        let student1 = random_student(&teacher1, &single);
        let l1 = {
            let sl = student1.forward(&tokens).unwrap_or_else(|e| panic!("{e}"));
            let tl = tch::no_grad(|| teacher1.forward(&tokens)).unwrap_or_else(|e| panic!("{e}"));
            let l = k
                .masked_mean_with(&single, &sl, &tl, Some(&next), &mk)
                .unwrap_or_else(|e| panic!("{e}"));
            l.backward();
            l.double_value(&[])
        };
        assert!(
            (loss - l1).abs() <= 1e-6 * (1.0 + l1.abs()),
            "{name}: chunked TP{tp} loss {loss} vs {l1}"
        );
        let mut worst: (f64, String) = (0.0, String::new());
        for (p, p1) in student.params().iter().zip(student1.params()) {
            assert_eq!(p.name, p1.name);
            let g = student
                .gather_canonical(p, &p.tensor.grad())
                .unwrap_or_else(|e| panic!("{e}"));
            let d = max_diff(&g, &p1.tensor.grad());
            assert!(
                p1.tensor.grad().abs().max().double_value(&[]) > 0.0,
                "{}: zero gradient",
                p.name
            );
            if d > worst.0 {
                worst = (d, p.name.clone());
            }
        }
        report += &format!(
            "model grads {name}: TP{tp} chunked(5) vs TP1 unchunked: loss {loss:.8} vs {l1:.8}, max grad diff {:.2e} ({})\n",
            worst.0, worst.1
        );
        assert!(
            worst.0 <= GRAD_TOL,
            "{name}: gradient of {} differs by {}",
            worst.1,
            worst.0
        );
    }
    report += &hidden_checks(pg, &st, &te, &lab, &mk);
    report
}

/// Hidden-state losses (cosine, MSE, with and without the projection) and the balancer with
/// intermediate terms, on fixed tensors: values and gradients w.r.t. the student's hidden
/// states, the projection and the student logits, written for
/// tests/interop/test_distill_modelopt.py (`hidden_tp<TP>.json`, `hgrad_<case>_<wrt>_tp<TP>.f32`).
fn hidden_checks(pg: &ProcessGroup, st: &Tensor, te: &Tensor, lab: &Tensor, mk: &Tensor) -> String {
    use nemo_tool::distill::hidden_loss::{HiddenLoss, Pair, Projection, Site};
    use nemo_tool::distill::loss::{balance, lm_mean};
    let tp = pg.world();
    let rank = i64::from(pg.rank());
    let (b, s, v) = (st.size()[0], st.size()[1], st.size()[2]);
    let vl = v / i64::from(tp);
    let (hs, ht) = (16, 24);
    let hid_s = wavy(&[b, s, hs], 0.113, 0.4);
    let hid_t = wavy(&[b, s, ht], 0.271, 2.0);
    let hid_t2 = wavy(&[b, s, hs], 0.191, 1.3);
    let w0 = wavy(&[ht, hs], 0.057, 0.9) * 0.05;
    let out = interop_dir();
    if rank == 0 {
        write_f32(&out.join("hidden_s.f32"), &hid_s);
        write_f32(&out.join("hidden_t.f32"), &hid_t);
        write_f32(&out.join("hidden_t2.f32"), &hid_t2);
        write_f32(&out.join("proj_w.f32"), &w0);
    }
    let n = mk.sum(Kind::Double).double_value(&[]);
    let pair = |loss| Pair {
        student: Site::FinalNorm,
        teacher: Site::FinalNorm,
        loss,
    };
    let kd = KdLoss::new(LossKind::ForwardKl, 1.0).unwrap_or_else(|e| panic!("{e}"));
    let mut values = Vec::new();
    let mut report = String::new();
    // (case, pairs (loss, through the projection), None: intermediates alone, or
    // Some(kd_loss_scale with the LM loss, None without): balanced with the logits loss)
    type Case = (&'static str, Vec<(HiddenLoss, bool)>, Option<Option<f64>>);
    let cases: Vec<Case> = vec![
        ("cos_proj", vec![(HiddenLoss::Cosine, true)], None),
        ("mse_proj", vec![(HiddenLoss::Mse, true)], None),
        ("cos_same", vec![(HiddenLoss::Cosine, false)], None),
        (
            "balanced_skip",
            vec![(HiddenLoss::Cosine, true), (HiddenLoss::Mse, true)],
            Some(None),
        ),
        (
            "balanced_lm",
            vec![(HiddenLoss::Cosine, true), (HiddenLoss::Mse, true)],
            Some(Some(2.0)),
        ),
    ];
    for (name, pairs_spec, logits) in cases {
        let xs = hid_s.detach().set_requires_grad(true);
        let proj = Projection::new(w0.shallow_clone(), Device::Cpu);
        let uses_proj = pairs_spec.iter().any(|(_, p)| *p);
        let mut inter_terms = Vec::new();
        for (loss, with_proj) in &pairs_spec {
            let t = if *with_proj { &hid_t } else { &hid_t2 };
            let i = kd
                .intermediate_mean(
                    &[pair(*loss)],
                    with_proj.then_some(&proj),
                    &[xs.shallow_clone()],
                    &[t.shallow_clone()],
                    mk,
                    n,
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            inter_terms.push(i);
        }
        let inter = Tensor::stack(&inter_terms, 0).sum(Kind::Float) / inter_terms.len() as f64;
        let sl = st
            .narrow(-1, rank * vl, vl)
            .detach()
            .set_requires_grad(true);
        let tl = te.narrow(-1, rank * vl, vl);
        let total = match logits {
            None => inter.shallow_clone(),
            Some(lm_scale) => {
                let l = kd
                    .masked_mean(pg, &sl, &tl, mk)
                    .unwrap_or_else(|e| panic!("{e}"));
                let lm = lm_mean(pg, &sl, lab, mk).unwrap_or_else(|e| panic!("{e}"));
                let bl = balance(
                    l.double_value(&[]),
                    Some(inter.double_value(&[])),
                    lm_scale.map(|sc| (lm.double_value(&[]), sc)),
                );
                &l * bl.logits + &inter * bl.intermediate + &lm * bl.lm
            }
        };
        total.backward();
        let value = total.double_value(&[]);
        values.push(format!("\"{name}\": {value:.12e}"));
        report += &format!("hidden {name} TP{tp}: {value:.10}\n");
        if rank == 0 {
            write_f32(&out.join(format!("hgrad_{name}_s_tp{tp}.f32")), &xs.grad());
            if uses_proj {
                write_f32(
                    &out.join(format!("hgrad_{name}_w_tp{tp}.f32")),
                    &proj.weight.grad(),
                );
                write_f32(
                    &out.join(format!("hgrad_{name}_b_tp{tp}.f32")),
                    &proj.bias.grad(),
                );
            }
        }
        if logits.is_some() {
            let g = Tensor::cat(
                &pg.all_gather(&sl.grad()).unwrap_or_else(|e| panic!("{e}")),
                -1,
            );
            if rank == 0 {
                write_f32(&out.join(format!("hgrad_{name}_logits_tp{tp}.f32")), &g);
            }
        }
    }
    if rank == 0 {
        let p = out.join(format!("hidden_tp{tp}.json"));
        std::fs::write(&p, format!("{{{}}}\n", values.join(", ")))
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    report
}

/// For tests/interop/test_distill_mcore.py: the gathered logits of the checkpoint folder
/// NEMO_DISTILL_CKPT for its `tokens.i64` (`[2, NEMO_DISTILL_SEQ]`), written by rank 0 to
/// `ours_tp<world>.f32` in that folder.
fn logits_worker() {
    let dir = PathBuf::from(
        std::env::var_os("NEMO_DISTILL_CKPT").unwrap_or_else(|| panic!("NEMO_DISTILL_CKPT unset")),
    );
    let seq: i64 = std::env::var("NEMO_DISTILL_SEQ")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let launch = Launch::from_env().unwrap_or_else(|e| panic!("{e}"));
    let pg = ProcessGroup::init(&launch, Backend::Gloo).unwrap_or_else(|e| panic!("{e}"));
    let bytes = std::fs::read(dir.join("tokens.i64")).unwrap_or_else(|e| panic!("tokens.i64: {e}"));
    let tokens = Tensor::from_data_size(&bytes, &[2, seq], Kind::Int64);
    let m = model(&dir, &pg, false);
    let logits = tch::no_grad(|| m.forward_gathered(&tokens)).unwrap_or_else(|e| panic!("{e}"));
    if pg.rank() == 0 {
        write_f32(&dir.join(format!("ours_tp{}.f32", pg.world())), &logits);
    }
    pg.barrier().unwrap_or_else(|e| panic!("{e}"));
}

/// Peak-memory probe: builds a wide-vocab student/teacher pair and runs the chunked loss with
/// `NEMO_DISTILL_CHUNK` positions per chunk; prints the rise of VmHWM over the RSS before.
fn mem_probe() {
    let chunk: i64 = std::env::var("NEMO_DISTILL_CHUNK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let cfg = nemo_tool::model::config::ModelConfig::parse(
        "num_layers: 1\nhidden_size: 64\nffn_hidden_size: 128\nnum_attention_heads: 4\n\
         normalization: rmsnorm\nactivation: fast-swiglu\nbias: false\nposition_embedding_type: rope\n\
         share_embeddings_and_output_weights: false\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (b, s, v) = (2i64, 256i64, 32768i64);
    let spec = GptSpec::from_config(&cfg, 1, v as u64).unwrap_or_else(|e| panic!("{e}"));
    let pg = ProcessGroup::single();
    let mk = |seed, train| {
        Gpt::new(
            spec.clone(),
            &InitFrom::Random { seed },
            &pg,
            Kind::Float,
            Device::Cpu,
            train,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let (student, teacher) = (mk(1, true), mk(2, false));
    let tokens = (Tensor::arange(b * s, (Kind::Int64, Device::Cpu)) * 7919)
        .remainder(v)
        .view([b, s]);
    let m = Tensor::ones([b, s], (Kind::Float, Device::Cpu));
    let k = KdLoss::new(LossKind::ForwardKl, 1.0).unwrap_or_else(|e| panic!("{e}"));
    let status = |key: &str| -> u64 {
        let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let before = status("VmRSS:");
    let loss = k
        .chunked_backward(&student, &teacher, &tokens, &m, chunk)
        .unwrap_or_else(|e| panic!("{e}"));
    let peak = status("VmHWM:");
    let both_logits_kib = (2 * b * s * v * 4 / 1024) as u64;
    println!("MEM chunk={chunk} loss={loss:.6} rss_before_kib={before} peak_rise_kib={} both_fp32_logits_kib={both_logits_kib}", peak.saturating_sub(before));
}

/// GPU acceptance (scripts/gpu_check.sh; needs a CUDA machine): fp32 logits on CUDA equal the
/// fixture's stored CPU logits within LOGITS_TOL (the same tolerance as across CPUs: libtorch's
/// default keeps fp32 matmuls off TF32), an NCCL group at world size 1 runs every mapping and
/// collective, and a bf16 model gives close logits and a finite chunked loss with gradients.
#[cfg(feature = "cuda")]
fn gpu_checks() {
    assert!(
        tch::Cuda::is_available(),
        "CUDA is not available (libtorch_cuda not loaded or no GPU)"
    );
    let dev = Device::Cuda(0);
    let launch = Launch::from_env().unwrap_or_else(|e| panic!("{e}"));
    let pg = ProcessGroup::init(&launch, Backend::Nccl).unwrap_or_else(|e| panic!("nccl: {e}"));
    println!(
        "GPU backend {:?}, {} device(s)",
        pg.backend_name().ok(),
        tch::Cuda::device_count()
    );
    let mut t = Tensor::ones([4], (Kind::Float, dev));
    pg.all_reduce(&mut t, nemo_tool::distill::parallel::ReduceOp::Sum)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.sum(Kind::Float).double_value(&[]), 4.0);
    let peak = nemo_tool::distill::flops::device_peak(dev, Kind::BFloat16)
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "GPU MFU peak (bf16 dense): {:?} TFLOP/s",
        peak.map(|p| p / 1e12)
    );
    let tokens = load_pt(&fixture("logits/tokens.pt")).to_device(dev);
    let want = load_pt(&fixture("logits/logits_tp1.pt"));
    let path = fixture("nemo/tiny_llama_tp1.nemo");
    let ck = Checkpoint::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let src = Source::new(&ck).unwrap_or_else(|e| panic!("{e}"));
    let spec = GptSpec::from_config(&ck.config, 1, 128).unwrap_or_else(|e| panic!("{e}"));
    // bf16 keeps 8 significant bits (relative rounding 2^-8 per op): logits up to 4.4 after two
    // layers move by tenths; a mis-mapped tensor still moves them by whole units
    for (kind, tol) in [(Kind::Float, LOGITS_TOL), (Kind::BFloat16, 0.5)] {
        let m = Gpt::new(
            spec.clone(),
            &InitFrom::Checkpoint(&src),
            &pg,
            kind,
            dev,
            false,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let got = tch::no_grad(|| m.forward_gathered(&tokens)).unwrap_or_else(|e| panic!("{e}"));
        let d = max_diff(&got.to_device(Device::Cpu), &want);
        println!("GPU logits {kind:?}: max abs diff {d:.3e} (tolerance {tol})");
        assert!(d <= tol, "GPU logits {kind:?} differ by {d}");
        let student = Gpt::new(
            spec.clone(),
            &InitFrom::Random { seed: 7 },
            &pg,
            kind,
            dev,
            true,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let k = KdLoss::new(LossKind::ForwardKl, 1.0).unwrap_or_else(|e| panic!("{e}"));
        let l = k
            .chunked_backward(&student, &m, &tokens, &mask(2, 16).to_device(dev), 5)
            .unwrap_or_else(|e| panic!("{e}"));
        let gnorm: f64 = student
            .params()
            .iter()
            .map(|p| {
                p.tensor
                    .grad()
                    .to_kind(Kind::Float)
                    .square()
                    .sum(Kind::Float)
                    .double_value(&[])
            })
            .sum();
        println!("GPU chunked KD {kind:?}: loss {l:.6}, grad norm² {gnorm:.3e}");
        assert!(l.is_finite() && gnorm.is_finite() && gnorm > 0.0);
    }
    println!("GPU CHECKS OK");
}

/// Two ranks: point-to-point send/recv (pipeline stages) both ways, and the distributed
/// optimizer's reduce-scatter and all-gather against values computed by hand.
fn collective_checks(pg: &ProcessGroup) {
    use nemo_tool::distill::parallel::ReduceOp;
    let r = pg.rank();
    let cpu = (tch::Kind::Float, tch::Device::Cpu);
    if r == 0 {
        pg.send(&tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]), 1, 7)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut back = tch::Tensor::zeros([3], cpu);
        pg.recv(&mut back, 1, 8).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            Vec::<f32>::try_from(&back).unwrap_or_default(),
            [2.0, 3.0, 4.0]
        );
    } else {
        let mut got = tch::Tensor::zeros([3], cpu);
        pg.recv(&mut got, 0, 7).unwrap_or_else(|e| panic!("{e}"));
        pg.send(&(got + 1.0), 0, 8)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // rank r holds [10r, 10r+1, 10r+2, 10r+3]: sums [10, 12, 14, 16], halves to each rank
    let x = tch::Tensor::arange(4, cpu) + 10.0 * f64::from(r);
    let mine = pg
        .reduce_scatter(&x, ReduceOp::Sum)
        .unwrap_or_else(|e| panic!("{e}"));
    let want: [f32; 2] = if r == 0 { [10.0, 12.0] } else { [14.0, 16.0] };
    assert_eq!(Vec::<f32>::try_from(&mine).unwrap_or_default(), want);
    let all = pg.all_gather_flat(&mine).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        Vec::<f32>::try_from(&all).unwrap_or_default(),
        [10.0, 12.0, 14.0, 16.0]
    );
    println!("rank {r}: send/recv, reduce_scatter and all_gather ok");
}

#[test]
fn worker_entry() {
    let Ok(which) = std::env::var("NEMO_DISTILL_WORKER") else {
        return; // only meaningful when spawned by the tests below
    };
    match which.as_str() {
        "tp" => {
            let launch = Launch::from_env().unwrap_or_else(|e| panic!("{e}"));
            let pg = ProcessGroup::init(&launch, Backend::Gloo).unwrap_or_else(|e| panic!("{e}"));
            let r = tp_checks(&pg);
            if pg.world() == 2 {
                collective_checks(&pg);
            }
            println!(
                "rank {} backend {:?}\n{r}",
                pg.rank(),
                pg.backend_name().ok()
            );
            pg.barrier().unwrap_or_else(|e| panic!("{e}"));
        }
        "mem" => mem_probe(),
        "logits" => logits_worker(),
        #[cfg(feature = "cuda")]
        "gpu" => gpu_checks(),
        other => panic!("unknown NEMO_DISTILL_WORKER={other}"),
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    l.local_addr()
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn worker_cmd(program: &Path, scenario: &str) -> Command {
    let mut c = Command::new(program);
    c.env("NEMO_DISTILL_WORKER", scenario)
        .env("OMP_NUM_THREADS", "1")
        .env("NEMO_TOOL_DISTILL_OUT", interop_dir());
    c
}

fn exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|e| panic!("{e}"))
}

const WORKER_ARGS: [&str; 4] = ["--exact", "worker_entry", "--nocapture", "--test-threads=1"];

fn show(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn tp1_logits_losses_and_gradients() {
    let r = tp_checks(&ProcessGroup::single());
    print!("{r}");
}

#[test]
fn tp2_over_gloo_two_processes() {
    let port = free_port().to_string();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            worker_cmd(&exe(), "tp")
                .args(WORKER_ARGS)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env_remove("TORCHELASTIC_USE_AGENT_STORE")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("spawn: {e}"))
        })
        .collect();
    for (rank, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
        assert!(o.status.success(), "rank {rank} failed: {}", show(&o));
        assert!(
            show(&o).contains("send/recv, reduce_scatter and all_gather ok"),
            "{}",
            show(&o)
        );
        println!("{}", show(&o));
    }
}

fn python() -> Option<PathBuf> {
    let p = std::env::var_os("NEMO_TOOL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    p.exists().then_some(p)
}

/// Our rank → (tp, dp, pp) layout and its groups are megatron-core's own: its
/// `parallel_state.RankGenerator` (0.16.1, in the venv) is asked for every group of several
/// TP × DP × PP shapes in this run.
#[test]
fn rank_layout_equals_megatron_cores() {
    let Some(py) = python() else {
        assert!(
            std::env::var_os("NEMO_TOOL_STRICT").is_none(),
            "NEMO_TOOL_STRICT is set but no python was found"
        );
        eprintln!("skipped: no python with megatron-core (set NEMO_TOOL_PYTHON)");
        return;
    };
    let shapes = [
        (1, 1, 1),
        (2, 1, 1),
        (1, 2, 1),
        (2, 2, 1),
        (2, 2, 2),
        (4, 2, 1),
        (1, 3, 2),
        (2, 1, 4),
    ];
    let code = format!(
        "import json\nfrom megatron.core.parallel_state import RankGenerator\nout = []\n\
         for tp, dp, pp in {shapes:?}:\n    g = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order='tp-cp-ep-dp-pp')\n    \
         out.append([g.get_ranks(k) for k in ('tp', 'dp', 'pp')])\nprint(json.dumps(out))\n"
    );
    let o = Command::new(&py)
        .args(["-W", "ignore", "-c", &code])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success(), "{}", show(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let want: Vec<[Vec<Vec<i32>>; 3]> =
        serde_json::from_str(text.trim().lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(want.len(), shapes.len());
    for ((tp, dp, pp), w) in shapes.iter().zip(&want) {
        let l = RankLayout {
            tp: *tp,
            dp: *dp,
            pp: *pp,
        };
        for (dim, groups) in [Dim::Tp, Dim::Dp, Dim::Pp].into_iter().zip(w) {
            assert_eq!(&l.groups(dim), groups, "TP{tp} DP{dp} PP{pp} {dim:?}");
        }
    }
}

#[test]
fn torchrun_launches_two_ranks() {
    let Some(py) = python() else {
        assert!(
            std::env::var_os("NEMO_TOOL_STRICT").is_none(),
            "NEMO_TOOL_STRICT is set but no python was found"
        );
        eprintln!("skipped: no python with torch (set NEMO_TOOL_PYTHON)");
        return;
    };
    let torchrun = py.with_file_name("torchrun");
    let mut c = if torchrun.exists() {
        worker_cmd(&torchrun, "tp")
    } else {
        let mut c = worker_cmd(&py, "tp");
        c.args(["-m", "torch.distributed.run"]);
        c
    };
    let o = c
        .args([
            "--no-python",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
        ])
        .arg(format!("--master_port={}", free_port()))
        .arg(exe())
        .args(WORKER_ARGS)
        .output()
        .unwrap_or_else(|e| panic!("torchrun: {e}"));
    assert!(o.status.success(), "torchrun failed: {}", show(&o));
    let text = show(&o);
    assert!(
        text.contains("logits tiny_llama_tp2.nemo at TP2"),
        "no worker report: {text}"
    );
    println!("{text}");
}

#[test]
fn chunked_loss_peak_memory() {
    let run = |chunk: &str| -> (u64, u64, f64) {
        let o = worker_cmd(&exe(), "mem")
            .args(WORKER_ARGS)
            .env("NEMO_DISTILL_CHUNK", chunk)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let text = show(&o);
        assert!(o.status.success(), "mem probe failed: {text}");
        let line = text
            .lines()
            .find_map(|l| l.find("MEM chunk=").map(|i| &l[i..]))
            .unwrap_or_else(|| panic!("no MEM line: {text}"));
        let field = |k: &str| -> String {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {line}"))
                .to_string()
        };
        let num = |k: &str| {
            field(k)
                .parse::<u64>()
                .unwrap_or_else(|e| panic!("{k}: {e}"))
        };
        (
            num("peak_rise_kib="),
            num("both_fp32_logits_kib="),
            field("loss=").parse().unwrap_or(f64::NAN),
        )
    };
    let (full, both, l_full) = run("256");
    let (chunked, _, l_chunk) = run("4");
    let msg = format!(
        "peak memory rise: unchunked {full} KiB, chunked(4) {chunked} KiB; both fp32 logit tensors alone {both} KiB"
    );
    println!("{msg}");
    let _ = std::io::stdout().flush();
    assert!(
        (l_full - l_chunk).abs() <= 1e-4 * (1.0 + l_full.abs()),
        "losses differ: {l_full} vs {l_chunk}"
    );
    assert!(chunked < both, "{msg}");
    assert!(chunked < full, "{msg}");
}
