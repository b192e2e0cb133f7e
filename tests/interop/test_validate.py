"""Canonical checksums, validate and diff against real torch.

* The canonical sha256 nemo-tool reports for every tensor of the TP=2 and torch_dist fixtures
  equals the sha256 of the TP=1 tensor as `torch.load` gives it (norms under their TE names,
  vocab tensors cut to the tokenizer's 100 rows), and the model digest is the same for all three.
* `validate --deep` passes on every fixture `.nemo`, and `diff` finds them equal.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch

from conftest import tensor_sha256

NEMO = Path("fixtures/mcore/llama/nemo")
ALIASES = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
           "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def tp1_state_dict(root: Path) -> dict[str, torch.Tensor]:
    with tarfile.open(root / NEMO / "tiny_llama_tp1.nemo") as tf:
        data = tf.extractfile("./model_weights.ckpt").read()
    sd = torch.load(io.BytesIO(data), weights_only=True)
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        name = k.removeprefix("model.")
        if name.startswith("decoder.layers."):
            layer, rest = name.removeprefix("decoder.layers.").split(".", 1)
            for local, te in ALIASES.items():
                if rest.startswith(local):
                    rest = te + rest.removeprefix(local)
            name = f"decoder.layers.{layer}.{rest}"
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            v = v[:100]
        out[name] = v
    return out


def test_canonical_sums_are_torch_tp1_tensors(root, run_tool):
    want = {k: tensor_sha256(v) for k, v in tp1_state_dict(root).items()}
    digests = set()
    for f in ("tiny_llama_tp1.nemo", "tiny_llama_tp2.nemo", "tiny_llama_dist_tp1.nemo"):
        m = json.loads(run_tool("checksum", NEMO / f, "--json").stdout)
        got = {t["name"]: t["sha256"] for t in m["tensors"]}
        assert got == want, f
        assert m["vocab"] == {"stored": 128, "hashed": 100,
                              "source": "tokenizer:79b7d2d99291075a58045d29d6b0b3cc_tokenizer.model"}
        digests.add(m["model_digest"])
    assert len(digests) == 1


def test_validate_and_diff_fixtures(run_tool):
    for f in ("tiny_llama_tp1.nemo", "tiny_llama_tp2.nemo", "tiny_llama_dist_tp1.nemo"):
        r = json.loads(run_tool("validate", NEMO / f, "--deep", "--json").stdout)
        assert r["valid"] and r["findings"] == [], f
    d = json.loads(run_tool("diff", NEMO / "tiny_llama_tp2.nemo", NEMO / "tiny_llama_dist_tp1.nemo",
                            "--json").stdout)
    assert d["same"] and d["compared"] == 15 and d["max_abs_diff"] == 0.0
