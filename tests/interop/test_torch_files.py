"""Checks that .pt files written by nemo-tool load with the real torch.

The files are written by the Rust test `torch_samples::write_interop_files`:

    NEMO_TOOL_INTEROP_OUT=target/interop/torch_files cargo test --test it write_interop_files
    .venv/bin/python tests/interop/test_torch_files.py target/interop/torch_files
    # or: NEMO_TOOL_INTEROP_OUT=target/interop/torch_files .venv/bin/python -m pytest tests/interop/test_torch_files.py

Each fixture in fixtures/torch-samples/pt was read by the Rust reader and saved
again by the Rust writer; here torch loads both the original (weights_only=False)
and the rewritten file (weights_only=True where the fixture allows it, plain,
mmap=True, and mmap with calculate_storage_offsets) and compares them exactly.
"""
import io
import os
import sys
from collections import OrderedDict
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "torch-samples" / "pt"
SAMPLES = {  # file -> loadable with weights_only=True
    "two_tensors.pt": True,
    "dtypes.pt": True,
    "views.pt": True,
    "nested_values.pt": True,
    "module_state_dict.pt": True,
    "te_extra_state.pt": False,  # _io.BytesIO is outside the allowlist, as with torch's own file
    "ref_writer_output.pt": True,
    "minimal_one_tensor.pt": True,
    "legacy_nonzip.pt": True,  # rewritten in the zip format
}


def out_dir():
    d = os.environ.get("NEMO_TOOL_INTEROP_OUT") or (sys.argv[1] if len(sys.argv) > 1 else None)
    if not d:
        raise SystemExit("usage: test_torch_files.py DIR (or set NEMO_TOOL_INTEROP_OUT)")
    return Path(d)


def same(a, b, path="root"):
    assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape"
        assert a.stride() == b.stride(), f"{path}: stride {a.stride()} vs {b.stride()}"
        assert a.storage_offset() == b.storage_offset(), f"{path}: storage_offset"
        assert a.requires_grad == b.requires_grad, f"{path}: requires_grad"
        assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes(), f"{path}: storage size"
        assert torch.equal(a.detach(), b.detach()), f"{path}: values {a} vs {b}"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
        if hasattr(a, "_metadata") or hasattr(b, "_metadata"):
            assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), f"{path}: _metadata"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, io.BytesIO):
        assert a.getvalue() == b.getvalue(), f"{path}: BytesIO content"
        assert a.tell() == b.tell(), f"{path}: BytesIO position"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def loads(path, weights_only):
    """Every way of loading the file that torch offers for our layout."""
    yield "plain", torch.load(path, weights_only=weights_only)
    yield "mmap", torch.load(path, weights_only=weights_only, mmap=True)
    from torch.utils.serialization import config

    cfg = config.load
    old = cfg.calculate_storage_offsets
    cfg.calculate_storage_offsets = True
    try:
        yield "mmap+offsets", torch.load(path, weights_only=weights_only, mmap=True)
    finally:
        cfg.calculate_storage_offsets = old


def test_rewritten_samples_load_identically():
    d = out_dir()
    for name, wo in SAMPLES.items():
        orig = torch.load(FIXTURES / name, weights_only=False)
        for how, new in loads(d / name, wo):
            try:
                same(orig, new)
            except AssertionError as e:
                raise AssertionError(f"{name} ({how}, weights_only={wo}): {e}") from None


def test_shared_storage_survives():
    v = torch.load(out_dir() / "views.pt", weights_only=True)
    ptr = v["base"].untyped_storage().data_ptr()
    assert v["view_off4"].untyped_storage().data_ptr() == ptr
    assert v["transposed"].untyped_storage().data_ptr() == ptr
    assert isinstance(v["param"], torch.nn.Parameter)


def test_te_extra_state_is_refused_by_weights_only_like_the_original():
    # In a fresh interpreter: importing megatron.core (other tests do) adds
    # io.BytesIO to torch's safe globals for the rest of the process.
    import subprocess

    code = (
        "import sys, torch\n"
        "try:\n"
        "    torch.load(sys.argv[1], weights_only=True)\n"
        "except Exception as e:\n"
        "    sys.exit(0 if 'BytesIO' in str(e) else 3)\n"
        "sys.exit(4)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out_dir() / "te_extra_state.pt")])
    assert proc.returncode == 0, "weights_only must refuse _io.BytesIO, as it does for torch's own file"


def test_composed_tensor():
    for how, v in loads(out_dir() / "composed.pt", True):
        c = torch.tensor([[4.0, 5, 6, 7], [0, 0, 0, 1]])
        assert torch.equal(v["c"], c), how
        assert v["c_t"].stride() == (1, 4), how
        assert torch.equal(v["c_t"], torch.as_strided(c.flatten(), (4, 2), (1, 4))), how
        assert v["c"].untyped_storage().data_ptr() == v["c_t"].untyped_storage().data_ptr(), how
        assert v["u16"].dtype == torch.uint16 and v["u16"].tolist() == [1, 2, 65535], how
        assert v["n"] == -5 and v["big"] == 2**40, how


if __name__ == "__main__":
    failed = 0
    tests = [f for n, f in sorted(globals().items()) if n.startswith("test_")]
    for t in tests:
        try:
            t()
            print(f"ok   {t.__name__}")
        except Exception as e:  # report every failure, then exit non-zero
            failed += 1
            print(f"FAIL {t.__name__}: {e}")
    print(f"{len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
