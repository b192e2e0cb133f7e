"""ModelOpt 0.47.0's own distillation losses on the logits the Rust test `tests/distill.rs` wrote
(student.f32, teacher.f32, mask.f32, labels.f32 and the shape in losses_tp1.json, in DIR), at
TP = the number of processes (CPU over gloo, megatron-core's parallel_state): each rank feeds its
vocab slice, as megatron-core's output layer gives it.
usage: torchrun --nproc_per_node=TP modelopt_losses.py DIR

Writes modelopt_tp<TP>.json ({name: loss}) and modelopt_grad_<name>_tp<TP>.f32 (the gradient
w.r.t. the full student logits, every rank's slice gathered) into DIR, for:
  forward_kl_t2     plugins.megatron.LogitsKLLoss(temperature=2)
  topk_modelopt_8   plugins.megatron.TopKLogitsKLLoss(temperature=1.5, top_k=8)
  forward_kl_t2_sq  losses.LogitsDistillationLoss(temperature=2) (T^2 factor; TP1 only: an HF loss)
  kl_lm_s2          LogitsKLLoss + megatron-core's vocab-parallel cross entropy, balanced by
                    plugins.megatron.LogitsAndIntermediatesLossBalancer(kd_loss_scale=2,
                    skip_original_loss=False)
and on the hidden states of the same run (hidden_s/hidden_t/hidden_t2.f32, proj_w.f32) into
hidden_tp<TP>.json and hgrad_<case>_<s|w|b|logits>_tp<TP>.f32 prefixed `modelopt_`:
  cos_proj / mse_proj  HiddenStateCosineLoss / MSELoss through a ProjectionLayer(16 -> 24)
  cos_same             HiddenStateCosineLoss, same hidden size (no projection)
  balanced_skip        LogitsKLLoss + both intermediate losses, LogitsAndIntermediatesLossBalancer
                       (skip_original_loss=True)
  balanced_lm          the same with the LM loss (kd_loss_scale=2, skip_original_loss=False)
Per-token losses are reduced as Megatron-LM's `_mask_loss` does (masked sum, all-reduced over TP
when the loss says tp_reduce), then divided by the number of valid tokens (Megatron-LM's later
division; the balancer's factors are ratios, so this does not change them).
"""
import json
import os
import sys
import types

import torch

torch.cuda.current_device = lambda: torch.device("cpu")  # noqa: E731

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state, tensor_parallel  # noqa: E402

import modelopt.torch.distill as mtd  # noqa: E402
from modelopt.torch.distill.losses import LogitsDistillationLoss  # noqa: E402
from modelopt.torch.distill.plugins import megatron as mo  # noqa: E402


def read(path, shape):
    data = open(path, "rb").read()
    return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape).clone()


def main():
    out = sys.argv[1]
    dist.init_process_group(backend="gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    shape = json.load(open(os.path.join(out, "losses_tp1.json")))["shape"]
    b, s, v = shape
    vl = v // tp
    student = read(os.path.join(out, "student.f32"), shape)
    teacher = read(os.path.join(out, "teacher.f32"), shape)
    mask = read(os.path.join(out, "mask.f32"), shape[:2])
    labels = read(os.path.join(out, "labels.f32"), shape[:2]).long()
    cfg = types.SimpleNamespace(tensor_model_parallel_size=tp, sequence_parallel=False)
    n = mask.sum()

    def mask_loss(result):
        # Megatron-LM's _mask_loss: [b, s] losses, masked sum, TP all-reduce (no autograd)
        loss, tp_reduce = (result[0], result[1]) if isinstance(result, tuple) else (result, False)
        total = torch.sum(loss.reshape(-1).float() * mask.reshape(-1))
        if tp_reduce and tp > 1:
            dist.all_reduce(total, group=group)
        return total / n

    def run(name, fn):
        # megatron-core's layout: [s, b, v/tp] on each rank
        sl = student[..., rank * vl:(rank + 1) * vl].transpose(0, 1).contiguous().requires_grad_(True)
        tl = teacher[..., rank * vl:(rank + 1) * vl].transpose(0, 1).contiguous()
        loss = fn(sl, tl)
        loss.backward()
        g = sl.grad.transpose(0, 1).contiguous()
        parts = [torch.empty_like(g) for _ in range(tp)]
        dist.all_gather(parts, g, group=group)
        return loss.item(), torch.cat(parts, dim=-1)

    def balanced(sl, tl):
        kd = mask_loss(mo.LogitsKLLoss(cfg, temperature=1.0)(sl, tl))
        ce = tensor_parallel.vocab_parallel_cross_entropy(sl.float(), labels.transpose(0, 1).contiguous())
        lm = mask_loss(ce.transpose(0, 1))
        balancer = mo.LogitsAndIntermediatesLossBalancer(kd_loss_scale=2.0, skip_original_loss=False)
        return balancer({mtd.loss_balancers.STUDENT_LOSS_KEY: lm, "LogitsKLLoss": kd})["kd_loss"]

    cases = {
        "forward_kl_t2": lambda sl, tl: mask_loss(mo.LogitsKLLoss(cfg, temperature=2.0)(sl, tl)),
        "topk_modelopt_8": lambda sl, tl: mask_loss(mo.TopKLogitsKLLoss(cfg, temperature=1.5, top_k=8)(sl, tl)),
        "kl_lm_s2": balanced,
    }
    if tp == 1:
        cases["forward_kl_t2_sq"] = lambda sl, tl: mask_loss(
            LogitsDistillationLoss(temperature=2.0, reduction="none")(sl, tl).transpose(0, 1)
        )
    values = {}
    for name, fn in cases.items():
        value, grad = run(name, fn)
        values[name] = value
        if rank == 0:
            grad.numpy().tofile(os.path.join(out, f"modelopt_grad_{name}_tp{tp}.f32"))
    if rank == 0:
        with open(os.path.join(out, f"modelopt_tp{tp}.json"), "w") as f:
            json.dump(values, f)
        print(json.dumps(values))
    hidden_cases(out, rank, tp, vl, student, teacher, labels, cfg, mask_loss, group)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def hidden_cases(out, rank, tp, vl, student, teacher, labels, cfg, mask_loss, group):
    b, s, _ = student.shape
    hs, ht = 16, 24
    hid_s = read(os.path.join(out, "hidden_s.f32"), [b, s, hs])
    hid_t = read(os.path.join(out, "hidden_t.f32"), [b, s, ht])
    hid_t2 = read(os.path.join(out, "hidden_t2.f32"), [b, s, hs])
    w0 = read(os.path.join(out, "proj_w.f32"), [ht, hs])
    values = {}
    for name, pairs, logits in [
        ("cos_proj", [(mo.HiddenStateCosineLoss, True)], None),
        ("mse_proj", [(mo.MSELoss, True)], None),
        ("cos_same", [(mo.HiddenStateCosineLoss, False)], None),
        ("balanced_skip", [(mo.HiddenStateCosineLoss, True), (mo.MSELoss, True)], "skip"),
        ("balanced_lm", [(mo.HiddenStateCosineLoss, True), (mo.MSELoss, True)], "lm"),
    ]:
        scfg = types.SimpleNamespace(hidden_size=hs, tensor_model_parallel_size=tp, sequence_parallel=False,
                                     init_method=lambda w: None)
        tcfg = types.SimpleNamespace(hidden_size=ht)
        proj = mo.ProjectionLayer(scfg, tcfg)
        with torch.no_grad():
            proj._fit.weight.copy_(w0)
            proj._fit.bias.zero_()
        xs = hid_s.transpose(0, 1).contiguous().requires_grad_(True)  # [s, b, h]
        losses = {}
        for i, (cls, with_proj) in enumerate(pairs):
            t = (hid_t if with_proj else hid_t2).transpose(0, 1).contiguous()
            fn = cls(cfg, projection_layer=proj if with_proj else None)
            losses[f"{cls.__name__}_{i}"] = mask_loss(fn(xs, t))
        sl = student[..., rank * vl:(rank + 1) * vl].transpose(0, 1).contiguous().requires_grad_(True)
        if logits is None:
            total = sum(losses.values()) / len(losses)
        else:
            tl = teacher[..., rank * vl:(rank + 1) * vl].transpose(0, 1).contiguous()
            kd = mask_loss(mo.LogitsKLLoss(cfg, temperature=1.0)(sl, tl))
            ce = tensor_parallel.vocab_parallel_cross_entropy(sl.float(), labels.transpose(0, 1).contiguous())
            lm = mask_loss(ce.transpose(0, 1))
            balancer = mo.LogitsAndIntermediatesLossBalancer(kd_loss_scale=2.0, skip_original_loss=logits == "skip")
            total = balancer({mtd.loss_balancers.STUDENT_LOSS_KEY: lm, "LogitsKLLoss": kd, **losses})["kd_loss"]
        total.backward()
        values[name] = total.item()
        if rank == 0:
            xs.grad.transpose(0, 1).contiguous().numpy().tofile(os.path.join(out, f"modelopt_hgrad_{name}_s_tp{tp}.f32"))
            if any(p for _, p in pairs):
                proj._fit.weight.grad.numpy().tofile(os.path.join(out, f"modelopt_hgrad_{name}_w_tp{tp}.f32"))
                proj._fit.bias.grad.numpy().tofile(os.path.join(out, f"modelopt_hgrad_{name}_b_tp{tp}.f32"))
        if logits is not None:
            g = sl.grad.transpose(0, 1).contiguous()
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g, group=group)
            if rank == 0:
                torch.cat(parts, dim=-1).numpy().tofile(os.path.join(out, f"modelopt_hgrad_{name}_logits_tp{tp}.f32"))
    if rank == 0:
        with open(os.path.join(out, f"modelopt_hidden_tp{tp}.json"), "w") as f:
            json.dump(values, f)
        print(json.dumps(values))


if __name__ == "__main__":
    main()
