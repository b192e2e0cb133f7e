"""Real torch reads the torch_dist folders nemo-tool writes (dcp_write.rs).

The Rust unit test `dcp_write::tests::writes_interop_folders` (run by `cargo test`) re-writes every DCP fixture
through `write_torch_dist` into `target/interop/dcp_roundtrip/<name>/`; this test (pytest, in the venv with
torch) checks those folders with torch's own `FileSystemReader` and `dcp_to_torch_save`, and compares every
tensor and byte item with the fixture's expected values. Missing folders are skipped: run `cargo test` first.
"""
import io
import json
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ROOT = os.environ.get("NEMO_TOOL_ROOT") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.environ.get("NEMO_TOOL_DCP_ROUNDTRIP", os.path.join(ROOT, "target/interop/dcp_roundtrip"))
SAMPLES = os.path.join(ROOT, "fixtures/torch-samples")
EXPECTED = json.load(open(os.path.join(SAMPLES, "expected.json")))


def missing(d):
    """Under `cargo xtask test` (NEMO_TOOL_STRICT) the Rust tests must have written `d`."""
    if os.environ.get("NEMO_TOOL_STRICT"):
        pytest.fail(f"{d} missing: the Rust test that writes it did not run")
    pytest.skip(f"{d} missing: run `cargo test` first")


def load(name, tmp_path):
    d = os.path.join(OUT, name)
    if not os.path.isdir(d):
        missing(d)
    md = dcp.FileSystemReader(d).read_metadata()
    assert pickle.load(open(os.path.join(d, ".metadata"), "rb")).state_dict_metadata.keys() == md.state_dict_metadata.keys()
    out = tmp_path / f"{name}.pt"
    dcp_to_torch_save(d, out)
    return d, md, torch.load(out, weights_only=False)


def test_plain_equals_original(tmp_path):
    d, md, sd = load("plain", tmp_path)
    orig = tmp_path / "orig.pt"
    dcp_to_torch_save(os.path.join(SAMPLES, "dcp/plain_single_rank"), orig)
    want = torch.load(orig, weights_only=False)
    assert sd.keys() == want.keys()
    def same(a, b):
        if torch.is_tensor(b):
            return a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in b)
        return a == b
    for k, v in want.items():
        assert same(sd[k], v), k
    assert sd["step"] == 7 and sd["nested"]["name"] == "abc"
    assert sd["w"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


@pytest.mark.parametrize("name,sample", [("v013", "dcp/megatron_core_v0.13.0_tp2"), ("v019", "dcp/megatron_core_v0.19.0_tp2")])
def test_megatron_values(tmp_path, name, sample):
    d, md, sd = load(name, tmp_path)
    exp = EXPECTED[sample]
    for key, t in exp["tensors"].items():
        got = sd[key]
        assert list(got.shape) == t["global_shape"], key
        assert str(got.dtype) == "torch." + t["dtype"], key
        assert got.float().flatten().tolist() == t["values_as_float"], key
    for i in range(2):
        proj = torch.load(io.BytesIO(sd[f"decoder.layers.self_attention.linear_proj._extra_state/shard_{i}_2"].getvalue()
                                     if hasattr(sd[f"decoder.layers.self_attention.linear_proj._extra_state/shard_{i}_2"], "getvalue")
                                     else sd[f"decoder.layers.self_attention.linear_proj._extra_state/shard_{i}_2"]), weights_only=False) \
            if isinstance(sd[f"decoder.layers.self_attention.linear_proj._extra_state/shard_{i}_2"], (bytes, io.BytesIO)) \
            else sd[f"decoder.layers.self_attention.linear_proj._extra_state/shard_{i}_2"]
        obj = proj[0] if isinstance(proj, list) else proj
        assert pickle.loads(bytes(obj.tolist())) == {"layer": i}
    if name == "v013":
        assert torch.load(os.path.join(d, "common.pt")) == exp["common"]
        assert json.load(open(os.path.join(d, "metadata.json")))["common_backend"] == "torch"
    else:
        common = sd["common_state/shard_0_1"]
        common = torch.load(io.BytesIO(common.getvalue()), weights_only=False) if isinstance(common, io.BytesIO) else common
        assert common == [exp["common"]]


def test_llama_equals_tp1_weights(tmp_path):
    d, md, sd = load("llama", tmp_path)
    tp1 = torch.load(os.path.join(ROOT, "fixtures/mcore/llama/tp1/mp_rank_00/model_weights.ckpt"), weights_only=True)
    names = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    n = 0
    for k, v in tp1.items():
        if not torch.is_tensor(v):
            continue
        if k.startswith("model.decoder.layers."):
            rest = k[len("model.decoder.layers."):]
            i, name = rest.split(".", 1)
            got = sd["model.decoder.layers." + names.get(name, name)][int(i)]
        else:
            got = sd[k]
        assert torch.equal(got, v), k
        n += 1
    assert n == 15


def test_zarr_llama_as_torch_dist_equals_tp1(tmp_path):
    """fixtures/zarr/llama_tp2 (written by the real zarr package) converted to torch_dist by nemo-tool."""
    d, md, sd = load("zarr_llama", tmp_path)
    tp1 = torch.load(os.path.join(ROOT, "fixtures/mcore/llama/tp1/mp_rank_00/model_weights.ckpt"), weights_only=True)
    names = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    for k, v in tp1.items():
        if not torch.is_tensor(v):
            continue
        if k.startswith("model.decoder.layers."):
            i, name = k[len("model.decoder.layers."):].split(".", 1)
            got = sd["model.decoder.layers." + names.get(name, name)][int(i)]
        else:
            got = sd[k]
        assert torch.equal(got, v), k
    # the zarr chunk grid (TP=2 shards) became the DCP chunks
    qkv = md.state_dict_metadata["model.decoder.layers.self_attention.linear_qkv.weight"]
    assert sorted(tuple(c.offsets) for c in qkv.chunks) == [(0, 0, 0), (0, 48, 0), (1, 0, 0), (1, 48, 0)]
    # zarr objects torch.save(None) became Megatron items torch.save([None])
    assert sd["model.decoder.layers.mlp.linear_fc1._extra_state/shard_1_2"] == [None]
    assert json.load(open(os.path.join(d, "metadata.json")))["sharded_backend"] == "torch_dist"


def test_zarr_extra_as_torch_dist(tmp_path):
    d, md, sd = load("zarr_extra", tmp_path)
    qkv = sd["decoder.layers.self_attention.linear_qkv.weight"]
    assert qkv.dtype == torch.bfloat16
    assert torch.equal(qkv, torch.arange(96, dtype=torch.float32).view(2, 12, 4).to(torch.bfloat16))
    assert torch.equal(sd["edge"], torch.arange(15, dtype=torch.float32).view(5, 3) + 100)
    assert sd["scalar"].dtype == torch.int64 and sd["scalar"].shape == () and sd["scalar"].item() == 7
    assert sd["decoder.layers.self_attention.linear_qkv._extra_state/shard_0_1"] == [{"layer": 0, "note": "zarr shard object"}]


def test_llama_as_zarr_reads_with_zarr(tmp_path):
    """fixtures/mcore/llama/dcp_tp1 written as an mcore zarr folder by nemo-tool, read by the real zarr package."""
    import zarr
    d = os.path.join(OUT, "llama_as_zarr")
    if not os.path.isdir(d):
        missing(d)
    tp1 = torch.load(os.path.join(ROOT, "fixtures/mcore/llama/tp1/mp_rank_00/model_weights.ckpt"), weights_only=True)
    qkv = zarr.open_array(os.path.join(d, "model.decoder.layers.self_attention.linear_qkv.weight"), mode="r")
    assert qkv.shape == (2, 96, 64) and qkv.compressor is None
    for i in range(2):
        assert torch.equal(torch.from_numpy(qkv[i]), tp1[f"model.decoder.layers.{i}.self_attention.linear_qkv.weight"])
    ln = zarr.open_array(os.path.join(d, "model.decoder.layers.mlp.linear_fc1.layer_norm_weight"), mode="r")
    assert torch.equal(torch.from_numpy(ln[1]), tp1["model.decoder.layers.1.pre_mlp_layernorm.weight"])
    emb = zarr.open_array(os.path.join(d, "model.embedding.word_embeddings.weight"), mode="r")
    assert torch.equal(torch.from_numpy(emb[...]), tp1["model.embedding.word_embeddings.weight"])
    assert torch.load(os.path.join(d, "model.decoder.layers.mlp.linear_fc2._extra_state/shard_0_2.pt")) is None
    assert json.load(open(os.path.join(d, "metadata.json")))["sharded_backend"] == "zarr"
