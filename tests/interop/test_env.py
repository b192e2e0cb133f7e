"""The interop environment itself: pinned torch, the binary, and the conftest helpers."""

import hashlib
import os
import struct
import warnings

import torch


def test_torch_is_pinned_version():
    assert torch.__version__.startswith("2.11.0"), torch.__version__


def test_megatron_core_imports_on_cpu():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Apex / Transformer Engine not installed" notices
        import megatron.core
        from megatron.core import dist_checkpointing, parallel_state  # noqa: F401
    assert megatron.core.__version__ == "0.16.1"


def test_binary_exists(tool):
    assert tool.is_file()
    assert os.access(tool, os.X_OK)


def test_help_exits_zero(run_tool):
    proc = run_tool("--help")
    assert "nemo-tool" in proc.stdout.lower() or "usage" in proc.stdout.lower(), proc.stdout


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_tensor_sha256_is_logical_little_endian(tensor_sha256):
    assert tensor_sha256(torch.tensor([1.0, -2.0])) == sha(struct.pack("<2f", 1.0, -2.0))
    # 0-dim, empty, bool, bf16 and int64.
    assert tensor_sha256(torch.tensor(3, dtype=torch.int64)) == sha(struct.pack("<q", 3))
    assert tensor_sha256(torch.empty(0, 4)) == sha(b"")
    assert tensor_sha256(torch.tensor([True, False, True])) == sha(b"\x01\x00\x01")
    # bf16 1.0 = 0x3f80.
    assert tensor_sha256(torch.tensor([1.0], dtype=torch.bfloat16)) == sha(b"\x80\x3f")


def test_tensor_sha256_ignores_layout(tensor_sha256):
    base = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    t = base.t()  # non-contiguous view: logical row-major order of the transpose
    assert not t.is_contiguous()
    assert tensor_sha256(t) == tensor_sha256(t.contiguous().clone())
    assert tensor_sha256(t) != tensor_sha256(base)
    assert tensor_sha256(base[1:]) == sha(struct.pack("<8i", *range(4, 12)))
