"""Reading and writing .nemo checkpoints, checked against real torch (and megatron-core's
classes for the torch_dist metadata).

* `checksum`: for every fixture (.nemo tars, a gzip copy, extracted folders, bare rank and DCP
  folders, and a PP=2 layout written here by torch), the sha256 nemo-tool reports for each stored
  tensor equals the sha256 of what torch.load / torch's DCP reader gives for it.
* `pack`: what nemo-tool writes loads with torch.load(weights_only=True) and with mmap=True, with
  equal keys, values, dtypes and non-tensor entries; config and artifacts are byte-identical.
* `inspect --json`: layout, sizes, vocab and parameter counts agree with what torch sees.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from conftest import tensor_sha256

LLAMA = Path("fixtures/mcore/llama")


def extract(archive: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tf:
        tf.extractall(dest, filter="data")
    return dest


def dcp_state_dict(folder: Path, tmp: Path) -> dict:
    """Loads a torch_dist folder with torch's own DCP reader (megatron-core's classes must be
    importable for Megatron's .metadata)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = tmp / f"dcp_{abs(hash(str(folder)))}.pt"
    dcp_to_torch_save(str(folder), str(out))
    return torch.load(out, weights_only=False)


def torch_view(path: Path, tmp: Path) -> dict[tuple[str, str], torch.Tensor]:
    """(member, key) -> tensor, the way torch sees a checkpoint (tar, gzip tar or folder)."""
    tmp.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        path = extract(path, tmp / ("x_" + path.name))
    out = {}
    if (path / "model_weights" / "metadata.json").exists() or (path / "metadata.json").exists():
        dcp = path / "model_weights" if (path / "model_weights").exists() else path
        for k, v in dcp_state_dict(dcp, tmp).items():
            if isinstance(v, torch.Tensor):
                out[("model_weights/", k)] = v
        return out
    for f in sorted(path.rglob("model_weights.ckpt")):
        member = f.relative_to(path).as_posix()
        for k, v in torch.load(f, weights_only=True).items():
            if isinstance(v, torch.Tensor):
                out[(member, k)] = v
    return out


def make_pp2(tmp: Path) -> Path:
    """A PP=2 (layout tp_rank_00_pp_rank_00X) .nemo written by torch from the TP1 fixture: stage 0
    gets the embedding and layer 0, stage 1 gets layer 1 (renumbered 0), the final norm and the
    output layer."""
    src = extract(LLAMA / "nemo/tiny_llama_tp1.nemo", tmp / "pp2_src")
    sd = torch.load(src / "model_weights.ckpt", weights_only=True)
    stages = [OrderedDict(), OrderedDict()]
    for k, v in sd.items():
        if ".layers.1." in k:
            stages[1][k.replace(".layers.1.", ".layers.0.")] = v
        elif ".layers.0." in k or "embedding" in k:
            stages[0][k] = v
        else:
            stages[1][k] = v
    out = tmp / "pp2_dir"
    out.mkdir()
    for p, st in enumerate(stages):
        d = out / f"tp_rank_00_pp_rank_{p:03d}"
        d.mkdir()
        torch.save(st, d / "model_weights.ckpt")
    cfg = (src / "model_config.yaml").read_text()
    cfg = cfg.replace("pipeline_model_parallel_size: 1", "pipeline_model_parallel_size: 2")
    assert "pipeline_model_parallel_size: 2" in cfg
    (out / "model_config.yaml").write_text(cfg)
    for f in src.iterdir():
        if f.name.endswith("tokenizer.model"):
            shutil.copy(f, out / f.name)
    nemo = tmp / "tiny_llama_pp2.nemo"
    with tarfile.open(nemo, "w:") as tf:
        tf.add(out, arcname=".")
    return nemo


def fixture_paths(tmp: Path) -> list[Path]:
    paths = [
        LLAMA / "nemo/tiny_llama_tp1.nemo",
        LLAMA / "nemo/tiny_llama_tp2.nemo",
        LLAMA / "nemo/tiny_llama_dist_tp1.nemo",
        LLAMA / "tp1",
        LLAMA / "tp2",
        LLAMA / "dcp_tp1",
    ]
    gz = tmp / "tiny_llama_tp2.nemo.gz"
    gz.write_bytes(gzip.compress((LLAMA / "nemo/tiny_llama_tp2.nemo").read_bytes()))
    paths.append(gz)
    paths.append(extract(LLAMA / "nemo/tiny_llama_dist_tp1.nemo", tmp / "dist_folder"))
    paths.append(make_pp2(tmp))
    return paths


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, root) -> list[Path]:
    tmp = tmp_path_factory.mktemp("fixtures")
    return [p if p.is_absolute() else root / p for p in fixture_paths(tmp)]


def tool_sums(run_tool, path: Path) -> dict[tuple[str, str], dict]:
    sums = json.loads(run_tool("checksum", path, "--stored", "--json").stdout)
    return {(s["member"], s["key"]): s for s in sums}


def test_checksums_equal_torch(fixtures, run_tool, tmp_path):
    for path in fixtures:
        ours = tool_sums(run_tool, path)
        theirs = torch_view(path, tmp_path)
        assert set(ours) == set(theirs), f"{path}: tensor keys differ"
        for key, t in theirs.items():
            s = ours[key]
            assert s["sha256"] == tensor_sha256(t), f"{path}: {key} differs"
            assert s["shape"] == list(t.shape), f"{path}: {key} shape"
            assert s["dtype"] == str(t.dtype).removeprefix("torch."), f"{path}: {key} dtype"


def members(archive: Path) -> list[str]:
    with tarfile.open(archive, "r:") as tf:
        return [m.name for m in tf.getmembers()]


def test_pack_round_trip_loads_in_torch(fixtures, run_tool, tmp_path):
    for i, path in enumerate(fixtures):
        out = tmp_path / f"packed_{i}.nemo"
        run_tool("pack", path, out)
        before = torch_view(path, tmp_path / f"b{i}")
        after = torch_view(out, tmp_path / f"a{i}")
        assert list(before) == list(after) or set(before) == set(after), f"{path}: keys"
        for k, t in before.items():
            u = after[k]
            assert u.dtype == t.dtype and torch.equal(u, t), f"{path}: {k}"
        ex = extract(out, tmp_path / f"packed_{i}_x")
        for f in ex.rglob("model_weights.ckpt"):
            # weights_only (the NeMo default) and mmap (zero-copy loading) must both work, and
            # non-tensor entries (None _extra_state) survive.
            plain = torch.load(f, weights_only=True)
            mapped = torch.load(f, weights_only=True, mmap=True)
            assert isinstance(plain, OrderedDict)
            assert list(plain) == list(mapped)
            for k, v in plain.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, mapped[k])
                else:
                    assert v == mapped[k]
        if path.is_file() and not path.name.endswith(".gz"):
            # Same members in the same order, except that our torch_dist writer puts every chunk
            # in one __0_0.distcp where megatron-core wrote one file per writer thread.
            def keep(names):
                return [n for n in names if ".distcp" not in n]

            assert keep(members(out)) == keep(members(path)), f"{path}: member order"
            src = extract(path, tmp_path / f"packed_{i}_src")
            for f in src.rglob("*"):
                rel = f.relative_to(src)
                if f.is_file() and not rel.as_posix().startswith(("model_weights", "mp_rank", "tp_rank")):
                    assert (ex / rel).read_bytes() == f.read_bytes(), f"{rel} changed"


def test_pack_refuses_to_overwrite(run_tool, root, tmp_path):
    out = tmp_path / "x.nemo"
    out.write_bytes(b"keep me")
    proc = run_tool("pack", root / LLAMA / "nemo/tiny_llama_tp1.nemo", out, check=False)
    assert proc.returncode == 2
    assert "--force" in proc.stderr
    assert out.read_bytes() == b"keep me"
    run_tool("pack", root / LLAMA / "nemo/tiny_llama_tp1.nemo", out, "--force")
    assert out.read_bytes() != b"keep me"


def test_inspect_agrees_with_torch(run_tool, root, tmp_path):
    sd = torch.load(root / LLAMA / "tp1/mp_rank_00/model_weights.ckpt", weights_only=True)
    n_params = sum(v.numel() for v in sd.values() if isinstance(v, torch.Tensor))
    for name, variant, tp in [
        ("tiny_llama_tp1.nemo", "model_weights.ckpt", 1),
        ("tiny_llama_tp2.nemo", "mp_rank_XX", 2),
        ("tiny_llama_dist_tp1.nemo", "torch_dist", 1),
    ]:
        rep = json.loads(run_tool("inspect", root / LLAMA / "nemo" / name, "--json").stdout)
        assert rep["layout"]["variant"] == variant
        assert rep["layout"]["tp_on_disk"] == tp
        assert rep["vocab"]["true_vocab"] == 100
        assert rep["vocab"]["padded_vocab"] == 128
        assert rep["params"]["total"] == n_params, name
        arch = rep["architecture"]
        assert (arch["num_layers"], arch["hidden_size"], arch["num_query_groups"]) == (2, 64, 2)
        assert len(rep["artifacts"]) == 1 and rep["artifacts"][0]["referenced_by"] == ["tokenizer.model"]
    rep = json.loads(run_tool("inspect", root / LLAMA / "nemo/tiny_llama_tp2.nemo", "--json").stdout)
    qkv = next(t for t in rep["tensors"] if t["name"] == "model.decoder.layers.1.self_attention.linear_qkv.weight")
    assert qkv["global_shape"] == list(sd["model.decoder.layers.1.self_attention.linear_qkv.weight"].shape)
    assert [s["shape"] for s in qkv["shards"]] == [[48, 64], [48, 64]]
    assert qkv["rule"] == "qkv"
