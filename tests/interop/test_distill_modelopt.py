"""The distill engine's losses against NVIDIA ModelOpt 0.47.0's own classes (the loss code behind
NeMo 2, Megatron-LM and Megatron-Bridge), on the same tensors, value and gradient w.r.t. the
student logits, at TP1 and TP2 (CPU over gloo, megatron-core's parallel_state).

The Rust test `tests/distill.rs` writes the logits, mask, labels, our losses and our gradients into
NEMO_TOOL_DISTILL_OUT; `helpers/modelopt_losses.py` (under torchrun) computes ModelOpt's in this
run. Cases: LogitsKLLoss at T=2; TopKLogitsKLLoss (k=8, T=1.5) against our `ModeloptTopK`; the HF
`LogitsDistillationLoss` (T^2 factor) against `temperature_squared`; LogitsKLLoss plus the student's
LM loss through LogitsAndIntermediatesLossBalancer (kd_loss_scale=2, skip_original_loss=False);
and on hidden states: HiddenStateCosineLoss and MSELoss through a ProjectionLayer (16 -> 24) and
without one, and the balancer with those intermediate losses, with and without the LM loss
(gradients also w.r.t. the projection's weight and bias).

One difference is asserted rather than hidden: ModelOpt's TopKLogitsKLLoss returns the same loss on
every TP rank (tp_reduce=False) and gathers the student's candidates with
torch.distributed.nn.all_gather, whose backward sums the ranks' gradients, so at TP2 its gradient
w.r.t. the student logits is exactly TP times the TP1 gradient. Ours is the TP1 gradient at any TP.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.environ.get("NEMO_TOOL_ROOT") or os.path.dirname(os.path.dirname(HERE))
OUT = os.environ.get("NEMO_TOOL_DISTILL_OUT", os.path.join(ROOT, "target/interop/distill_loss"))
NAMES = ["forward_kl_t2", "topk_modelopt_8", "forward_kl_t2_sq", "kl_lm_s2"]
# Values: relative difference. Gradients: the norm-wise relative error ||ours - theirs|| / ||theirs||
# of the whole gradient (w.r.t. the student outputs and the projection's weight and bias as one
# vector). Both sides are fp32 with different op orders (megatron-core's [s, b] layout against our
# [b, s]), so single small entries (a bias gradient that sums 32 tokens of both signs) carry
# ~1e-6 of rounding relative to themselves; the whole gradient agrees to ~1e-7.
REL = 1e-6


def rel_err(g, m):
    return ((g - m).norm() / m.norm()).item()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(path):
    if os.path.exists(path):
        return
    if os.environ.get("NEMO_TOOL_NO_DISTILL"):
        pytest.skip("cargo xtask test --no-distill: the distill tests did not run")
    if os.environ.get("NEMO_TOOL_STRICT"):
        pytest.fail(f"{path} missing: `cargo test --features distill --test distill` did not write it")
    pytest.skip(f"{path} missing: run `cargo test --features distill --test distill` first")


@pytest.fixture(scope="module")
def modelopt():
    need(os.path.join(OUT, "losses_tp2.json"))
    need(os.path.join(OUT, "labels.f32"))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"]:
        env.pop(k, None)
    out = {}
    for tp in (1, 2):
        p = subprocess.run([torchrun, f"--nproc_per_node={tp}", "--master_addr=127.0.0.1",
                            f"--master_port={free_port()}", os.path.join(HERE, "helpers", "modelopt_losses.py"), OUT],
                           env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
        out[tp] = json.load(open(os.path.join(OUT, f"modelopt_tp{tp}.json")))
    return out


def grad(name, shape):
    data = open(os.path.join(OUT, name), "rb").read()
    return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape).double()


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_loss_and_grad_match_modelopt(modelopt, name, tp):
    ours = json.load(open(os.path.join(OUT, f"losses_tp{tp}.json")))
    shape = ours["shape"]
    # the HF loss has no TP: our TP2 against ModelOpt's TP1
    ref_tp = tp if name in modelopt[tp] else 1
    want = modelopt[ref_tp][name]
    got = ours[f"{name}_tp{tp}"]
    assert got == pytest.approx(want, rel=REL), f"{name} TP{tp}: ours {got} vs ModelOpt {want}"
    g = grad(f"grad_{name}_tp{tp}.f32", shape)
    m = grad(f"modelopt_grad_{name}_tp{ref_tp}.f32", shape)
    if name == "topk_modelopt_8" and tp == 2:
        # ModelOpt's all_gather backward sums every rank's gradient of the replicated loss
        m = m / tp
    err = rel_err(g, m)
    print(f"{name} TP{tp}: loss {got:.10f} vs ModelOpt {want:.10f}; grad relative error {err:.2e}")
    assert err <= REL, f"{name} TP{tp}: gradient differs from ModelOpt's by {err} (relative)"


def test_modelopt_topk_gradient_scales_with_tp(modelopt):
    """The documented difference: ModelOpt's top-k gradient at TP2 is twice its TP1 gradient."""
    shape = json.load(open(os.path.join(OUT, "losses_tp1.json")))["shape"]
    g1 = grad("modelopt_grad_topk_modelopt_8_tp1.f32", shape)
    g2 = grad("modelopt_grad_topk_modelopt_8_tp2.f32", shape)
    assert torch.allclose(g2, 2 * g1, rtol=1e-6, atol=1e-9)
    assert modelopt[2]["topk_modelopt_8"] == pytest.approx(modelopt[1]["topk_modelopt_8"], rel=REL)


HIDDEN = ["cos_proj", "mse_proj", "cos_same", "balanced_skip", "balanced_lm"]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", HIDDEN)
def test_hidden_state_losses_match_modelopt(modelopt, name, tp):
    need(os.path.join(OUT, f"hidden_tp{tp}.json"))
    shape = json.load(open(os.path.join(OUT, "losses_tp1.json")))["shape"]
    b, s, v = shape
    ours = json.load(open(os.path.join(OUT, f"hidden_tp{tp}.json")))[name]
    want = json.load(open(os.path.join(OUT, f"modelopt_hidden_tp{tp}.json")))[name]
    assert ours == pytest.approx(want, rel=REL), f"{name} TP{tp}: ours {ours} vs ModelOpt {want}"
    ours_g, theirs_g, pieces = [], [], []
    for wrt, shp in [("s", [b, s, 16]), ("w", [24, 16]), ("b", [24]), ("logits", shape)]:
        mine = os.path.join(OUT, f"hgrad_{name}_{wrt}_tp{tp}.f32")
        if not os.path.exists(mine):
            continue
        g, m = grad(f"hgrad_{name}_{wrt}_tp{tp}.f32", shp), grad(f"modelopt_hgrad_{name}_{wrt}_tp{tp}.f32", shp)
        ours_g.append(g.reshape(-1))
        theirs_g.append(m.reshape(-1))
        pieces.append(f"{wrt} {rel_err(g, m):.1e}")
    assert pieces and pieces[0].startswith("s "), pieces
    err = rel_err(torch.cat(ours_g), torch.cat(theirs_g))
    print(f"{name} TP{tp}: {ours:.10f} vs ModelOpt {want:.10f}; grad relative error {err:.2e} ({', '.join(pieces)})")
    assert err <= REL, f"{name} TP{tp}: gradient differs from ModelOpt's by {err} (relative; {pieces})"
