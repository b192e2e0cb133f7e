"""`nemo-tool reshard` output checked with real torch and megatron-core.

* Every rank file loads with torch.load(weights_only=True) and has exactly the keys (in order),
  dtypes, shapes and values of megatron-core's own TP=2 shards (fixtures/mcore/llama/tp2), from a
  TP=1 .nemo and from the torch_dist .nemo.
* A TP=2 -> TP=1 reshard loads into megatron-core's GPTModel at TP=1 with
  load_state_dict(strict=True) and gives bit for bit the logits that megatron-core's own TP=1
  checkpoint gives in the same process.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

LLAMA = Path("fixtures/mcore/llama")


def rank_files(archive: Path) -> dict[str, dict]:
    out = {}
    with tarfile.open(archive) as tf:
        for m in tf.getmembers():
            if m.name.endswith("model_weights.ckpt"):
                data = tf.extractfile(m).read()
                out[m.name.lstrip("./")] = torch.load(io.BytesIO(data), weights_only=True)
    return out


def mcore_tp2() -> dict[str, dict]:
    return {
        f"mp_rank_0{r}/model_weights.ckpt": torch.load(
            LLAMA / f"tp2/mp_rank_0{r}/model_weights.ckpt", weights_only=True
        )
        for r in range(2)
    }


@pytest.mark.parametrize("source", ["nemo/tiny_llama_tp1.nemo", "nemo/tiny_llama_dist_tp1.nemo"])
def test_tp2_output_is_what_megatron_core_has_at_tp2(run_tool, root, tmp_path, source):
    out = tmp_path / "tp2.nemo"
    run_tool("reshard", LLAMA / source, out, "--tp", "2")
    got, want = rank_files(out), mcore_tp2()
    assert list(got) == list(want)
    for member, sd in want.items():
        assert list(got[member].keys()) == list(sd.keys()), member
        for k, v in sd.items():
            g = got[member][k]
            if v is None:
                assert g is None, k
                continue
            assert g.dtype == v.dtype and g.shape == v.shape, k
            assert torch.equal(g, v), k


SCRIPT = r"""
import sys, io, tarfile, torch
sys.path.insert(0, sys.argv[1])
import mcore_common as mc
mc.init_dist()
mc.init_mp(1)

def logits_of(sd, seed):
    torch.manual_seed(seed)  # each model its own random init: a tensor not loaded shows
    model = mc.build_model("llama", 1)
    sd = {k[len("model."):]: v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    return mc.forward_logits(model, torch.load(sys.argv[3], weights_only=True))

with tarfile.open(sys.argv[2]) as tf:
    data = tf.extractfile("./model_weights.ckpt").read()
ours = logits_of(torch.load(io.BytesIO(data), weights_only=True), 1)
# ground truth in this process: megatron-core's own TP=1 checkpoint of the same model
theirs = logits_of(torch.load(sys.argv[4], weights_only=True), 2)
print("max_abs_diff", (ours - theirs).abs().max().item())
# same weights, same code, same process: bit-identical
assert torch.equal(ours, theirs)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp1_output_loads_strictly_into_megatron_core(run_tool, root, tmp_path):
    out = tmp_path / "tp1.nemo"
    run_tool("reshard", LLAMA / "nemo/tiny_llama_tp2.nemo", out, "--tp", "1")
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(root / "fixtures/mcore/scripts"),
            str(out),
            str(root / LLAMA / "logits/tokens.pt"),
            str(root / LLAMA / "tp1/mp_rank_00/model_weights.ckpt"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max_abs_diff" in proc.stdout
