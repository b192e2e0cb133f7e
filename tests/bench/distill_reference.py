"""PyTorch eager reference for `cargo xtask bench distill`.

The same job as `nemo-tool distill` in the bench: the teacher loaded from the same `.nemo`
(TP1, model_weights.ckpt), a student of the same shape built from the same architecture keys,
Megatron-Core GPT math (RMSNorm, fused GQA QKV in mcore's per-group row order, rotary
positions, causal SDPA, SwiGLU, untied output layer), NeMo's LogitsKLLoss (forward KL over
the padded vocabulary, fp32, masked mean over tokens) in sequence chunks like ours, the mean
over micro-batches, global-norm clipping, torch.optim.AdamW with no decay on 1-D parameters,
CosineAnnealing with warmup, on the same number of threads. With `--dp N` (N processes started
with torchrun's variables) the student is wrapped in torch's DistributedDataParallel over Gloo
(32 MiB buckets, gradients reduced during the last micro-batch's backward, `no_sync` before),
each rank running `global / (micro × N)` micro-batches; the KD loss then takes one backward pass
per micro-batch (unchunked: DDP reduces once per forward), the same arithmetic when a chunk
covers the sequence, as in the bench. Rank 0 prints one line:

    reference: steps=N tokens_per_s=X peak_rss_kib=Y final_kd_loss=Z
"""

import argparse
import io
import math
import resource
import tarfile
import time

import torch
import torch.nn.functional as F


def top_level_config(text):
    cfg = {}
    for line in text.splitlines():
        if not line or line[0] in " #\t" or ":" not in line:
            continue
        k, v = line.split(":", 1)
        cfg[k.strip()] = v.strip().strip("'\"")
    return cfg


def load_teacher(path):
    t = tarfile.open(path)
    names = {m.name.lstrip("./"): m for m in t.getmembers()}
    cfg = top_level_config(t.extractfile(names["model_config.yaml"]).read().decode())
    sd = torch.load(io.BytesIO(t.extractfile(names["model_weights.ckpt"]).read()), weights_only=True)
    return cfg, {k[len("model."):]: v for k, v in sd.items() if torch.is_tensor(v)}


class Gpt(torch.nn.Module):
    def __init__(self, layers, hidden, ffn, heads, groups, vocab, std=0.02):
        super().__init__()
        self.h, self.heads, self.groups, self.d = hidden, heads, groups, hidden // heads
        self.emb = torch.nn.Parameter(torch.randn(vocab, hidden) * std)
        self.blocks = torch.nn.ModuleList()
        out_std = std / math.sqrt(2 * layers)
        for _ in range(layers):
            b = torch.nn.Module()
            b.ln1 = torch.nn.Parameter(torch.ones(hidden))
            b.qkv = torch.nn.Parameter(torch.randn((heads + 2 * groups) * self.d, hidden) * std)
            b.proj = torch.nn.Parameter(torch.randn(hidden, heads * self.d) * out_std)
            b.ln2 = torch.nn.Parameter(torch.ones(hidden))
            b.fc1 = torch.nn.Parameter(torch.randn(2 * ffn, hidden) * std)
            b.fc2 = torch.nn.Parameter(torch.randn(hidden, ffn) * out_std)
            self.blocks.append(b)
        self.final = torch.nn.Parameter(torch.ones(hidden))
        self.out = torch.nn.Parameter(torch.randn(vocab, hidden) * std)

    def load_mcore(self, sd):
        with torch.no_grad():
            self.emb.copy_(sd["embedding.word_embeddings.weight"])
            for i, b in enumerate(self.blocks):
                p = f"decoder.layers.{i}."
                get = lambda *ks: next(sd[k] for k in ks if k in sd)
                b.ln1.copy_(get(p + "input_layernorm.weight", p + "self_attention.linear_qkv.layer_norm_weight"))
                b.qkv.copy_(sd[p + "self_attention.linear_qkv.weight"])
                b.proj.copy_(sd[p + "self_attention.linear_proj.weight"])
                b.ln2.copy_(get(p + "pre_mlp_layernorm.weight", p + "mlp.linear_fc1.layer_norm_weight"))
                b.fc1.copy_(sd[p + "mlp.linear_fc1.weight"])
                b.fc2.copy_(sd[p + "mlp.linear_fc2.weight"])
            self.final.copy_(sd["decoder.final_layernorm.weight"])
            self.out.copy_(sd["output_layer.weight"])

    def rope(self, s):
        inv = 1.0 / (10000.0 ** (torch.arange(0, self.d, 2, dtype=torch.float32) / self.d))
        f = torch.outer(torch.arange(s, dtype=torch.float32), inv)
        e = torch.cat([f, f], -1)[:, None, :]
        return e.cos(), e.sin()

    @staticmethod
    def rot(x, cos, sin):
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def forward(self, tokens):
        return self.hidden_states(tokens)

    def hidden_states(self, tokens):
        b, s = tokens.shape
        x = F.embedding(tokens, self.emb)
        cos, sin = self.rope(s)
        hpg = self.heads // self.groups
        for blk in self.blocks:
            h = F.rms_norm(x, (self.h,), blk.ln1, 1e-5)
            qkv = (h @ blk.qkv.t()).view(b, s, self.groups, hpg + 2, self.d)
            q = qkv[:, :, :, :hpg].reshape(b, s, self.heads, self.d)
            k = qkv[:, :, :, hpg : hpg + 1].reshape(b, s, self.groups, self.d)
            v = qkv[:, :, :, hpg + 1 :].reshape(b, s, self.groups, self.d)
            q, k = self.rot(q, cos, sin), self.rot(k, cos, sin)
            q = q.transpose(1, 2)
            k = k.transpose(1, 2).repeat_interleave(hpg, 1)
            v = v.transpose(1, 2).repeat_interleave(hpg, 1)
            ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + ctx.transpose(1, 2).reshape(b, s, -1) @ blk.proj.t()
            h = F.rms_norm(x, (self.h,), blk.ln2, 1e-5)
            g, u = (h @ blk.fc1.t()).chunk(2, -1)
            x = x + (F.silu(g) * u) @ blk.fc2.t()
        return F.rms_norm(x, (self.h,), self.final, 1e-5)


def kd_single(model, student, teacher, tokens, mask):
    """LogitsKLLoss in one backward pass through `model` (the DDP wrapper of `student`)."""
    n = mask.sum()
    with torch.no_grad():
        tl = teacher.hidden_states(tokens) @ teacher.out.t()
    sl = model(tokens) @ student.out.t()
    ls = sl.float().log_softmax(-1)
    lt = tl.float().log_softmax(-1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    loss = (kl * mask).sum() / n
    loss.backward()
    return loss.item()


def kd_chunked(student, teacher, tokens, mask, chunk):
    """LogitsKLLoss, chunked over the sequence like nemo-tool's (same arithmetic)."""
    n = mask.sum()
    with torch.no_grad():
        th = teacher.hidden_states(tokens)
    sh = student.hidden_states(tokens)
    leaf = sh.detach().requires_grad_(True)
    total = 0.0
    for s0 in range(0, tokens.shape[1], chunk):
        with torch.no_grad():
            tl = th[:, s0 : s0 + chunk] @ teacher.out.t()
        sl = leaf[:, s0 : s0 + chunk] @ student.out.t()
        ls = sl.float().log_softmax(-1)
        lt = tl.float().log_softmax(-1)
        kl = (lt.exp() * (lt - ls)).sum(-1)
        part = (kl * mask[:, s0 : s0 + chunk]).sum() / n
        total += part.item()
        part.backward()
    sh.backward(leaf.grad)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--ffn", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--groups", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--micro-batch", type=int, required=True)
    ap.add_argument("--global-batch", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dp", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rank = 0
    if args.dp > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        assert dist.get_world_size() == args.dp, "WORLD_SIZE must equal --dp"

    cfg, sd = load_teacher(args.teacher)
    vocab = sd["embedding.word_embeddings.weight"].shape[0]
    teacher = Gpt(
        int(cfg["num_layers"]), int(cfg["hidden_size"]), int(cfg["ffn_hidden_size"]),
        int(cfg["num_attention_heads"]), int(cfg["num_query_groups"]), vocab,
    )
    teacher.load_mcore(sd)
    teacher.requires_grad_(False)
    student = Gpt(args.layers, args.hidden, args.ffn, args.heads, args.groups, vocab)
    decay = [p for p in student.parameters() if p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    warm, min_lr = 5, args.lr / 10

    def lr_at(step):
        if step <= warm:
            return args.lr * (step + 1) / (warm + 1)
        r = (step - warm) / max(1, args.steps - warm)
        return min_lr + 0.5 * (math.cos(math.pi * min(r, 1.0)) + 1) * (args.lr - min_lr)

    model = student
    if args.dp > 1:
        from contextlib import nullcontext

        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(student, bucket_cap_mb=32)
    accum = args.global_batch // (args.micro_batch * args.dp)
    chunk = max(1, args.chunk // args.micro_batch)
    g = torch.Generator().manual_seed(1 + rank)
    times, loss = [], float("nan")
    for step in range(args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = 0.0
        for j in range(accum):
            tokens = torch.randint(3, 100, (args.micro_batch, args.seq), generator=g)
            mask = torch.ones(args.micro_batch, args.seq)
            if args.dp > 1:
                with model.no_sync() if j + 1 < accum else nullcontext():
                    loss += kd_single(model, student, teacher, tokens, mask)
            else:
                loss += kd_chunked(student, teacher, tokens, mask, chunk)
        if accum > 1:
            for p in student.parameters():
                p.grad.mul_(1.0 / accum)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        opt.step()
        times.append(time.perf_counter() - t0)
        loss /= accum
    skip = min(5, max(1 if len(times) > 1 else 0, len(times) // 10))
    tail = times[skip:]
    tps = args.global_batch * args.seq * len(tail) / sum(tail)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if rank == 0:
        print(f"reference: steps={args.steps} tokens_per_s={tps:.1f} peak_rss_kib={rss} final_kd_loss={loss:.6f}")
    if args.dp > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
