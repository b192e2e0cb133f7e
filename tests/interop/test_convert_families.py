"""`nemo-tool convert`, `reshard` and `eval` for the Llama-shaped families beyond Llama (issue 15):
Mistral (sliding window), Qwen2 (Q/K/V biases), Qwen3 (per-head Q/K RMSNorm), Gemma 2
(zero-centred norms, post-norms, GeGLU, scaled embeddings, soft-capped scores and logits, every
second layer windowed) and Gemma 3 (plus Q/K norms and a local RoPE base, linear scaling on the
global layers), each as a tiny random GQA model saved by transformers 5.24.0, untied and tied:

* HF -> .nemo (TP2) -> HF gives the same tensors (bit for bit), the same config class and the
  same transformers logits;
* HF -> .nemo loads into megatron-core 0.16.1's own GPTModel (local spec, CPU, strict=True) at
  TP1 and TP2, and its logits equal transformers' within 1e-4 (both computed in this test).
  megatron-core ships no Gemma spec: Gemma loads into its GPTModel built as NeMo 2 and
  Megatron-Bridge build it, its own modules plus the few Gemma pieces (zero-centred RMSNorm,
  post-norms, soft-capped scores and logits, scaled embeddings, local RoPE) defined in
  helpers/mcore_gemma.py;
* the distill engine (`nemo-tool eval --logits-out`, TP1 and TP2) computes the same logits
  within 1e-4.

The sliding window (4 positions) is narrower than the 12-token sequences, so it shapes the
logits; biases and norm weights are randomised away from their init (zeros, ones) so a dropped
or swapped one shows.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from conftest import free_port
from test_eval import exe as eval_exe

HELPER = Path(__file__).parent / "helpers" / "mcore_family.py"

# Gemma: a query scale unlike head_dim's, caps small enough to bend the scores and logits
GEMMA_CFG = {"sliding_window": 4, "query_pre_attn_scalar": 24}
FAMILIES = {
    "mistral": (MistralConfig, {"sliding_window": 4}),
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, {}),
    "gemma2": (Gemma2Config, {**GEMMA_CFG, "attn_logit_softcapping": 0.5, "final_logit_softcapping": 0.3}),
    "gemma3_text": (
        Gemma3TextConfig,
        {
            **GEMMA_CFG,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
            },
        },
    ),
}
GEMMA = {"gemma2", "gemma3_text"}
CASES = [(f, tied) for f in FAMILIES for tied in (False, True)]
IDS = [f"{f}-{'tied' if t else 'untied'}" for f, t in CASES]


def _tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, 100, (2, 12), generator=g)


def _random_model(family: str, tied: bool, out: Path):
    cls, extra = FAMILIES[family]
    cfg = cls(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=tied,
        **{"rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}, **extra},
    )
    torch.manual_seed(3 + tied)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
            if family in GEMMA and n.endswith(("q_proj.weight", "k_proj.weight")):
                # scores large enough for Gemma 2's 0.5 cap to bend them (~0.4 on the logits)
                p.mul_(10.0)
    model.save_pretrained(out)
    return AutoModelForCausalLM.from_pretrained(out).eval()


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as t:
        return {m.name.removeprefix("./"): t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


def _mcore_logits(nemo: Path, tp: int, tmp: Path) -> torch.Tensor:
    tok = tmp / "tokens.pt"
    torch.save(_tokens(), tok)
    out = tmp / f"mcore_tp{tp}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"]:
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tp}", "--master_addr",
           "127.0.0.1", f"--master_port={free_port()}", str(HELPER), str(nemo), str(tok), str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return torch.load(out)


def _our_logits(nemo: Path, tp: int, tmp: Path) -> torch.Tensor:
    tok = tmp / "tokens.json"
    tok.write_text(json.dumps(_tokens().tolist()))
    out = tmp / f"ours_tp{tp}.npy"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"]:
        env.pop(k, None)
    cmd = [eval_exe(), "eval", str(nemo), "--tokens", str(tok), "--logits-out", str(out), "--device", "cpu",
           "--force"]
    if tp > 1:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, "--no-python", f"--nproc_per_node={tp}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", *cmd]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{cmd}\n{p.stdout}\n{p.stderr}"
    return torch.from_numpy(np.load(out))


def _check_logits(what: str, want: torch.Tensor, nemo1: Path, nemo2: Path, tmp: Path) -> None:
    """megatron-core's and the distill engine's logits of the TP1 and TP2 archives equal
    transformers' `want` (first 100 columns) within 1e-4."""
    diffs = []
    for tp, nemo in ((1, nemo1), (2, nemo2)):
        mc = _mcore_logits(nemo, tp, tmp)
        d = (mc[..., :100] - want).abs().max().item()
        assert d <= 1e-4, f"{what}: megatron-core TP{tp}: {d}"
        ours = _our_logits(nemo, tp, tmp)
        e = (ours[..., :100] - want).abs().max().item()
        assert e <= 1e-4, f"{what}: nemo-tool eval TP{tp}: {e}"
        diffs.append(f"TP{tp} mcore {d:.1e} ours {e:.1e}")
    print(f"{what}: max |logits - transformers|: " + ", ".join(diffs))


@pytest.mark.parametrize("family,tied", CASES, ids=IDS)
def test_hf_nemo_hf_round_trip_and_mcore(tmp_path, run_tool, family, tied):
    src = tmp_path / "hf"
    orig = _random_model(family, tied, src)
    with torch.no_grad():
        want = orig(_tokens()).logits

    nemo2 = tmp_path / "m_tp2.nemo"
    run_tool("convert", "--from", "hf", src, nemo2, "--tp", "2")
    cfg = yaml.safe_load(_members(nemo2)["model_config.yaml"])
    gemma = family in GEMMA
    assert cfg["qkv_bias"] is (family == "qwen2") and cfg["bias"] is False
    assert cfg["qk_layernorm"] is (family in ("qwen3", "gemma3_text"))
    assert cfg["window_size"] == ([3, 0] if family == "mistral" or gemma else None)
    if gemma:
        assert cfg["activation"] == "fast-geglu" and cfg["openai_gelu"] is True
        assert cfg["layernorm_zero_centered_gamma"] is True and cfg["window_attn_skip_freq"] == 2
        assert cfg["query_pre_attn_scalar"] == 24.0
        assert cfg.get("rope_local_base_freq") == (1000.0 if family == "gemma3_text" else None)
        g = json.loads(run_tool("inspect", nemo2, "--json").stdout)["architecture"]["gemma"]
        assert g["windowed_layers"] == [1] and g["post_norms"] and g["scale_embedding"], g
        assert g["attn_logit_softcapping"] == (0.5 if family == "gemma2" else None), g
    assert cfg["kv_channels"] == 16 and cfg["share_embeddings_and_output_weights"] is tied
    r0 = torch.load(io.BytesIO(_members(nemo2)["mp_rank_00/model_weights.ckpt"]), weights_only=True)
    if family == "qwen2":
        # the fused QKV bias is split like the weight: (8 + 2*2) * 16 / 2 rows per rank
        assert r0["model.decoder.layers.0.self_attention.linear_qkv.bias"].shape == (96,)
    if family in ("qwen3", "gemma3_text"):
        assert r0["model.decoder.layers.1.self_attention.q_layernorm.weight"].shape == (16,)
    if gemma:
        for k in ("self_attention.linear_proj.post_layernorm.weight", "mlp.linear_fc2.post_layernorm.weight"):
            assert r0[f"model.decoder.layers.1.{k}"].shape == (64,)

    back = tmp_path / "back"
    run_tool("convert", nemo2, "--to", "hf", back)
    again = AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(again) is type(orig)
    assert again.config.model_type == family and again.config.tie_word_embeddings is tied
    if family == "mistral" or gemma:
        assert again.config.sliding_window == 4
    if gemma:
        for k in ("layer_types", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                  "rope_parameters"):
            assert getattr(again.config, k) == getattr(orig.config, k), k
    # the weights file itself, byte for byte as transformers wrote it
    assert (back / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    sd0, sd1 = orig.state_dict(), again.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert sd0[k].dtype == sd1[k].dtype and torch.equal(sd0[k], sd1[k]), k
    with torch.no_grad():
        assert torch.equal(again(_tokens()).logits, want)

    # reshard TP2 -> TP1 gives the tensors HF -> TP1 gives
    nemo1 = tmp_path / "m_tp1.nemo"
    run_tool("convert", "--from", "hf", src, nemo1)
    resharded = tmp_path / "m_resharded.nemo"
    run_tool("reshard", nemo2, resharded, "--tp", "1")
    a = torch.load(io.BytesIO(_members(nemo1)["model_weights.ckpt"]), weights_only=True)
    b = torch.load(io.BytesIO(_members(resharded)["model_weights.ckpt"]), weights_only=True)
    assert list(a) == list(b)
    for k, v in a.items():
        assert (v is None and b[k] is None) or torch.equal(v, b[k]), k

    # megatron-core's own model, and the distill engine, compute the same function
    _check_logits(f"{family} tied={tied}", want, nemo1, nemo2, tmp_path)


@pytest.mark.parametrize(
    "config,message",
    [
        ({"model_type": "gemma"}, "model_type `gemma`"),
        ({"model_type": "gemma2", "hidden_activation": "gelu"}, "hidden_activation `gelu`"),
        ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"model_type": "deepseek_v3"}, "model_type `deepseek_v3`"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "sliding-window layers"),
        ({"model_type": "qwen3", "attention_bias": True}, "covers every linear layer"),
        (
            {"model_type": "qwen2", "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
            "rope type `yarn`",
        ),
    ],
    ids=["gemma", "gemma2-exact-gelu", "gemma3-bidirectional", "deepseek_v3", "qwen2-sliding",
         "qwen3-attention-bias", "qwen2-yarn"],
)
def test_unmapped_features_are_refused(tmp_path, run_tool, config, message):
    """What the NeMo keys cannot express is refused with the reason and exit 2, before any
    output exists."""
    src = tmp_path / "hf"
    src.mkdir()
    base = {
        "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
    }
    (src / "config.json").write_text(json.dumps({**base, **config}))
    out = tmp_path / "m.nemo"
    p = run_tool("convert", "--from", "hf", src, out, check=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert not out.exists()
