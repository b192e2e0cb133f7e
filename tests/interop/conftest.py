"""Shared pytest fixtures for the interop tests.

Run through `cargo xtask test`, which builds the binary and sets:
  NEMO_TOOL_BIN   absolute path of the nemo-tool binary under test
  NEMO_TOOL_ROOT  repository root (fixtures/ lives there)

Fixtures: `tool` (binary path), `root` (repo root), `run_tool(*args, check=True)`,
`tensor_sha256(t)`, `mcore_reference_logits`. Helpers importable with `from conftest import ...`:
`tensor_sha256`, `free_port`, `mcore_logits`.

Ground truth for float outputs (logits, losses) is computed in the same run, on this machine:
never compare with floats stored in fixtures/, which another machine computed (its CPU kernels
round differently). Stored weights are data and may be compared bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch


def _repo_root() -> Path:
    env = os.environ.get("NEMO_TOOL_ROOT")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[2]


def _tool_path() -> Path:
    env = os.environ.get("NEMO_TOOL_BIN")
    if not env:
        pytest.fail(
            "NEMO_TOOL_BIN is not set: run these tests with `cargo xtask test` "
            "(or set NEMO_TOOL_BIN=<path to target/debug/nemo-tool>)",
            pytrace=False,
        )
    path = Path(env)
    if not path.is_file():
        pytest.fail(f"NEMO_TOOL_BIN={env} does not exist: build it with `cargo build`", pytrace=False)
    return path


def tensor_sha256(t: torch.Tensor) -> str:
    """Hex sha256 of a tensor's logical contents: its elements in row-major order, as
    little-endian bytes of its dtype. Views, strides and storage offsets do not matter; 0-dim and
    empty tensors, bool and bf16 are handled. Matches what nemo-tool reports for a tensor."""
    assert sys.byteorder == "little", "tensor_sha256 assumes a little-endian host"
    flat = t.detach().cpu().resolve_conj().resolve_neg().reshape(-1).contiguous()
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def run_tool_at(tool: Path, root: Path, *args: object, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Runs the binary with `args` (converted with str) from the repo root, capturing text
    output. With check=True a non-zero exit fails the test and shows both streams."""
    cmd = [str(tool), *map(str, args)]
    kwargs.setdefault("cwd", root)
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        pytest.fail(
            f"`{' '.join(cmd)}` exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MCORE_HELPER = Path(__file__).parent / "helpers" / "mcore_load_dist.py"


def mcore_logits(root: Path, ckpts: list[Path], tp: int, out: Path, ref: Path | None = None) -> list[torch.Tensor]:
    """megatron-core's logits of the fixture tokens (fixtures/mcore/llama/logits/tokens.pt) for
    each torch_dist folder in `ckpts`, at TP=`tp`, all computed by one torchrun of
    helpers/mcore_load_dist.py (CPU, gloo, one thread per rank). With `ref` (a TP=1
    model_weights.ckpt) every loaded tensor is also checked against it."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tp}",
        "--master_addr", "127.0.0.1", f"--master_port={free_port()}",
        str(MCORE_HELPER), str(root / "fixtures/mcore/llama/logits/tokens.pt"), str(out),
    ]
    if ref is not None:
        cmd += ["--ref", str(ref)]
    cmd += [str(c) for c in ckpts]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"]:
        env.pop(k, None)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    logits = torch.load(out)
    assert len(logits) == len(ckpts)
    return logits


@pytest.fixture(scope="session")
def mcore_reference_logits(root: Path, tmp_path_factory) -> torch.Tensor:
    """megatron-core's own TP=1 logits [2, 16, 128] of the fixture tokens, computed in this run
    from the fixture's torch_dist checkpoint (fixtures/mcore/llama/dcp_tp1, written by
    megatron-core; its weights checked equal to tp1/mp_rank_00/model_weights.ckpt). The ground
    truth for our logits, in place of the stored logits_tp1.pt (computed on another machine)."""
    llama = root / "fixtures/mcore/llama"
    out = tmp_path_factory.mktemp("mcore_ref") / "logits.pt"
    (logits,) = mcore_logits(root, [llama / "dcp_tp1"], 1, out, ref=llama / "tp1/mp_rank_00/model_weights.ckpt")
    assert logits.dtype == torch.float32 and tuple(logits.shape) == (2, 16, 128)
    return logits


@pytest.fixture(scope="session")
def root() -> Path:
    return _repo_root()


@pytest.fixture(scope="session")
def tool() -> Path:
    return _tool_path()


@pytest.fixture
def run_tool(tool: Path, root: Path) -> Callable[..., subprocess.CompletedProcess]:
    def run(*args: object, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return run_tool_at(tool, root, *args, check=check, **kwargs)

    return run


@pytest.fixture(name="tensor_sha256")
def tensor_sha256_fixture() -> Callable[[torch.Tensor], str]:
    return tensor_sha256
