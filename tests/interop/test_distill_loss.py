"""The distill engine's KD losses (src/distill/loss.rs) against PyTorch references.

The Rust test `tests/distill.rs` (feature `distill`; `tp1_logits_losses_and_gradients` and the
two-process `tp2_over_gloo_two_processes`) writes, into NEMO_TOOL_DISTILL_OUT (default
`target/interop/distill_loss/`): the student/teacher logits and mask it used (`*.f32`, raw
little-endian fp32), the loss values (`losses_tp{1,2}.json`) and the gradients w.r.t. the full
student logits gathered over TP (`grad_<kind>_tp{1,2}.f32`). Here each loss is recomputed with
torch's own ops, written from the definitions (NeMo `LogitsKLLoss`: nemo-format.md §5.2; JSD as
TRL's `generalized_jsd_loss`), in float64, and compared for every loss kind at TP1 and TP2.
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

ROOT = os.environ.get("NEMO_TOOL_ROOT") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.environ.get("NEMO_TOOL_DISTILL_OUT", os.path.join(ROOT, "target/interop/distill_loss"))

# name -> (kind, temperature, extra); must match kinds() in tests/distill.rs
KINDS = {
    "forward_kl": ("forward", 1.0, None),
    "forward_kl_t2": ("forward", 2.0, None),
    "reverse_kl": ("reverse", 1.0, None),
    "jsd_b03": ("jsd", 1.5, 0.3),
    "topk_8": ("topk", 1.0, 8),
}


def missing(path):
    if os.environ.get("NEMO_TOOL_NO_DISTILL"):
        pytest.skip("cargo xtask test --no-distill: the distill tests did not run")
    if os.environ.get("NEMO_TOOL_STRICT"):
        pytest.fail(f"{path} missing: `cargo test --features distill --test distill` did not write it")
    pytest.skip(f"{path} missing: run `cargo test --features distill --test distill` first")


def read(name, shape):
    path = os.path.join(OUT, name)
    if not os.path.exists(path):
        missing(path)
    data = open(path, "rb").read()
    return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)


def reference(kind, temp, extra, s, t, mask):
    """Masked mean over tokens of the per-token divergence, float64."""
    ls = F.log_softmax(s / temp, dim=-1)
    if kind == "topk":
        tt = t / temp
        thr = torch.topk(tt, extra, dim=-1).values[..., -1:]
        keep = tt >= thr
        lt = F.log_softmax(tt.masked_fill(~keep, float("-inf")), dim=-1)
        per_tok = torch.where(keep, lt.exp() * (lt - ls), torch.zeros_like(ls)).sum(-1)
    else:
        lt = F.log_softmax(t / temp, dim=-1)
        if kind == "forward":
            per_tok = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
        elif kind == "reverse":
            per_tok = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
        else:
            beta = extra
            lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), dim=0)
            kl_t = F.kl_div(lm, lt, reduction="none", log_target=True).sum(-1)
            kl_s = F.kl_div(lm, ls, reduction="none", log_target=True).sum(-1)
            per_tok = beta * kl_t + (1 - beta) * kl_s
    return (per_tok * mask).sum() / mask.sum()


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", sorted(KINDS))
def test_loss_and_grad_match_torch(name, tp):
    path = os.path.join(OUT, f"losses_tp{tp}.json")
    if not os.path.exists(path):
        missing(path)
    meta = json.load(open(path))
    shape = meta["shape"]
    s = read("student.f32", shape).double().requires_grad_(True)
    t = read("teacher.f32", shape).double()
    mask = read("mask.f32", shape[:2]).double()
    kind, temp, extra = KINDS[name]
    loss = reference(kind, temp, extra, s, t, mask)
    loss.backward()
    ours = meta[f"{name}_tp{tp}"]
    assert ours == pytest.approx(loss.item(), rel=2e-6, abs=1e-6), f"{name} TP{tp}: {ours} vs torch {loss.item()}"
    grad = read(f"grad_{name}_tp{tp}.f32", shape).double()
    diff = (grad - s.grad).abs().max().item()
    scale = s.grad.abs().max().item()
    print(f"{name} TP{tp}: loss {ours:.8f} vs {loss.item():.8f}, grad max abs diff {diff:.2e} (max |grad| {scale:.2e})")
    assert diff <= 1e-7 + 1e-5 * scale, f"{name} TP{tp}: grad differs by {diff}"
