"""Shared pytest fixtures for the interop tests.

Run through `cargo xtask test`, which builds the binary and sets:
  NEMO_TOOL_BIN   absolute path of the nemo-tool binary under test
  NEMO_TOOL_ROOT  repository root (fixtures/ lives there)

Fixtures: `tool` (binary path), `root` (repo root), `run_tool(*args, check=True)`,
`tensor_sha256(t)`. The two helpers are also importable: `from conftest import tensor_sha256`.
"""

from __future__ import annotations

import hashlib
import os
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
