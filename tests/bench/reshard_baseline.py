"""PyTorch baseline for `cargo xtask bench reshard`: what NeMo's
`megatron_change_num_partitions.py` does, without NeMo or a GPU.

Extract the .nemo, torch.load every rank file, merge each parameter to TP=1
(concatenate along its partition dim; gated fc1 as [all gates; all ups]; vocab
rows truncated to the TP=1 padding), split for the target TP (zero-padding the
vocab rows), torch.save each new rank file, and tar the folder. Prints the
wall time and the peak RSS of this process as JSON on the last line.

usage: reshard_baseline.py IN.nemo OUT.nemo TARGET_TP VOCAB_SIZE
"""

from __future__ import annotations

import json
import math
import re
import resource
import shutil
import sys
import tarfile
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
import yaml


def rule(key: str, gated: bool) -> str:
    if key.endswith("_extra_state"):
        return "extra"
    if "word_embeddings" in key or "output_layer.weight" in key:
        return "vocab"
    if key.endswith("linear_fc1.weight") or key.endswith("linear_fc1.bias"):
        return "gated" if gated else "col"
    if key.endswith("linear_qkv.weight") or key.endswith("linear_qkv.bias"):
        return "col"
    if key.endswith("linear_proj.weight") or key.endswith("linear_fc2.weight"):
        return "row"
    return "rep"


def main() -> None:
    src, dst, tp_new, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="reshard_baseline_", dir=Path(dst).parent))
    try:
        ext = work / "in"
        with tarfile.open(src) as tf:
            tf.extractall(ext, filter="data")
        cfg_text = (ext / "model_config.yaml").read_text()
        cfg = yaml.safe_load(cfg_text)
        tp = int(cfg.get("tensor_model_parallel_size", 1))
        gated = str(cfg.get("activation", "gelu")).endswith("glu")
        m = int(cfg.get("make_vocab_size_divisible_by", 128))
        ranks = [torch.load(ext / f"mp_rank_{r:02d}" / "model_weights.ckpt", weights_only=True) for r in range(tp)]
        vp1 = math.ceil(vocab / m) * m
        vpn = math.ceil(vocab / (m * tp_new)) * (m * tp_new)
        # merge to TP=1 (NeMo keeps the whole merged model in memory)
        full = OrderedDict()
        for key in ranks[0]:
            parts = [r[key] for r in ranks]
            kind = rule(key, gated)
            if kind in ("extra", "rep"):
                full[key] = parts[0]
            elif kind == "row":
                full[key] = torch.cat(parts, dim=-1)
            elif kind == "gated":
                halves = [p.chunk(2, dim=0) for p in parts]
                full[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
            else:
                full[key] = torch.cat(parts, dim=0)
                if kind == "vocab":
                    full[key] = full[key][:vp1]
        del ranks
        out = work / "out"
        for t in range(tp_new):
            sd = OrderedDict()
            for key, v in full.items():
                kind = rule(key, gated)
                if kind in ("extra", "rep"):
                    sd[key] = v.clone() if isinstance(v, torch.Tensor) else v
                elif kind == "row":
                    sd[key] = v.chunk(tp_new, dim=-1)[t].clone()
                elif kind == "gated":
                    g, u = v.chunk(2, dim=0)
                    sd[key] = torch.cat([g.chunk(tp_new)[t], u.chunk(tp_new)[t]], dim=0)
                elif kind == "vocab":
                    rows = vpn // tp_new
                    piece = v[t * rows : (t + 1) * rows].clone()
                    if piece.shape[0] < rows:
                        pad = torch.zeros((rows - piece.shape[0],) + tuple(piece.shape[1:]), dtype=piece.dtype)
                        piece = torch.cat([piece, pad])
                    sd[key] = piece
                else:
                    sd[key] = v.chunk(tp_new, dim=0)[t].clone()
            d = out / f"mp_rank_{t:02d}"
            d.mkdir(parents=True)
            torch.save(sd, d / "model_weights.ckpt")
            del sd
        text = re.sub(r"(?m)^tensor_model_parallel_size: .*$", f"tensor_model_parallel_size: {tp_new}", cfg_text)
        (out / "model_config.yaml").write_text(text)
        for p in ext.iterdir():
            if p.is_file() and p.name != "model_config.yaml" and not p.name.startswith("mp_rank_"):
                shutil.copy(p, out / p.name)
        with tarfile.open(dst, "w") as tf:
            tf.add(out, arcname="./")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": time.time() - t0, "peak_rss_bytes": peak_kib * 1024}))


if __name__ == "__main__":
    main()
