"""Mixture-of-experts checkpoints (issue 15) against megatron-core's own MoE GPTModel
(SequentialMLP experts, CPU, Gloo) and against transformers' Mixtral and Qwen3-MoE:

* megatron-core writes the same random MoE model at TP1 and, resharded by its own
  `dist_checkpointing`, at TP2; `nemo-tool reshard` turns each into the other, and its
  `torch_dist` checkpoint (experts stacked `[layers, experts, ...]`) into each, with the same keys
  in the same order and the same tensor bytes; `convert --to dist` writes a checkpoint megatron-core
  loads at TP2 into exactly its own shards;
* `nemo-tool eval --logits-out` of those archives equals megatron-core's logits within 1e-4,
  at TP1 and TP2;
* tiny random Mixtral and Qwen3-MoE (GQA; untied and tied) -> `.nemo` TP2 -> HF give the same
  tensors, class and logits; the `.nemo` loads into megatron-core (strict=True) and megatron-core
  and the distill engine both compute transformers' logits within 1e-4.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

from conftest import free_port
from test_convert_families import _check_logits, _mcore_logits, _our_logits, _tokens
from test_eval import exe as eval_exe

HELPERS = Path(__file__).parent / "helpers"

# the NeMo config of megatron-core's MoE model (what `nemo-tool convert` writes for it)
MOE_CONFIG = {
    "mcore_gpt": True, "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96,
    "num_attention_heads": 8, "num_query_groups": 2, "kv_channels": 16, "normalization": "rmsnorm",
    "layernorm_epsilon": 1e-6, "activation": "fast-swiglu", "bias": False, "qkv_bias": False,
    "qk_layernorm": True, "window_size": None, "position_embedding_type": "rope", "rotary_base": 10000.0,
    "rotary_percentage": 1.0, "max_position_embeddings": 64, "encoder_seq_length": 64,
    "share_embeddings_and_output_weights": False, "make_vocab_size_divisible_by": 32,
    "num_moe_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 32, "moe_router_pre_softmax": True,
    "moe_grouped_gemm": False, "moe_aux_loss_coeff": 0.0, "transformer_engine": False, "precision": 32,
    "pipeline_model_parallel_size": 1, "padded_vocab": 128,
}


def _torchrun(tp: int, *args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"]:
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tp}", "--master_addr",
           "127.0.0.1", f"--master_port={free_port()}", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]


def _pack(out: Path, cfg: dict, ranks: list[dict]) -> None:
    """A per-rank .nemo of megatron-core's state dicts, as NeMo packs them."""
    text = yaml.safe_dump({**cfg, "tensor_model_parallel_size": len(ranks)}, sort_keys=False).encode()
    with tarfile.open(out, "w") as tf:
        def add(name, data):
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        add("model_config.yaml", text)
        for r, sd in enumerate(ranks):
            buf = io.BytesIO()
            torch.save(sd, buf)
            add("model_weights.ckpt" if len(ranks) == 1 else f"mp_rank_{r:02d}/model_weights.ckpt", buf.getvalue())


def _ranks(nemo: Path, tp: int) -> list[dict]:
    with tarfile.open(nemo) as tf:
        names = {m.name.removeprefix("./"): m for m in tf.getmembers()}
        members = ["model_weights.ckpt"] if tp == 1 else [f"mp_rank_{r:02d}/model_weights.ckpt" for r in range(tp)]
        return [torch.load(io.BytesIO(tf.extractfile(names[m]).read()), weights_only=True) for m in members]


def _same(ours: dict, theirs: dict, what: str) -> None:
    assert list(ours) == list(theirs), f"{what}: key order"
    for k, v in theirs.items():
        if v is None:
            assert ours[k] is None, (what, k)
            continue
        o = ours[k]
        assert o.dtype == v.dtype and o.shape == v.shape, (what, k)
        assert o.contiguous().numpy().tobytes() == v.contiguous().numpy().tobytes(), (what, k)


# megatron-core's SharedExpertMLP beside the routed experts, with its sigmoid gate
SHARED = {"moe_shared_expert_intermediate_size": 48, "moe_shared_expert_gate": True}


@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared-experts"])
def test_reshard_and_eval_match_megatron_core_moe(tmp_path, run_tool, shared):
    config = {**MOE_CONFIG, **(SHARED if shared else {})}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    dist = tmp_path / "dist"
    dist.mkdir()
    _torchrun(1, HELPERS / "mcore_moe_save.py", cfg_path, dist, tmp_path / "tp1", "--init")
    _torchrun(2, HELPERS / "mcore_moe_save.py", cfg_path, dist, tmp_path / "tp2")
    tp1 = [torch.load(tmp_path / "tp1_rank0.pt", weights_only=True)]
    tp2 = [torch.load(tmp_path / f"tp2_rank{r}.pt", weights_only=True) for r in range(2)]
    assert "model.decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight" in tp1[0]
    assert ("model.decoder.layers.1.mlp.shared_experts.gate_weight" in tp1[0]) is shared
    # megatron-core's own distributed checkpoint of it (experts stacked [layers, experts, ...])
    # reshards to its per-rank shards at TP1 and TP2
    folder = tmp_path / "dist_nemo"
    folder.mkdir()
    (folder / "model_config.yaml").write_text(yaml.safe_dump({**config, "tensor_model_parallel_size": 1}))
    os.rename(dist, folder / "model_weights")
    for tp, want in ((1, tp1), (2, tp2)):
        out = tmp_path / f"from_dist_tp{tp}.nemo"
        run_tool("reshard", folder, out, "--tp", str(tp), "--vocab-size", "128")
        for r, (o, t) in enumerate(zip(_ranks(out, tp), want)):
            _same(o, t, f"dist -> TP{tp}, rank {r}")

    m1, m2 = tmp_path / "mcore_tp1.nemo", tmp_path / "mcore_tp2.nemo"
    _pack(m1, config, tp1)
    _pack(m2, config, tp2)

    ours2, ours1 = tmp_path / "ours_tp2.nemo", tmp_path / "ours_tp1.nemo"
    # no tokenizer in these archives: the true vocabulary is given (all 128 rows)
    run_tool("reshard", m1, ours2, "--tp", "2", "--vocab-size", "128")
    run_tool("reshard", m2, ours1, "--tp", "1", "--vocab-size", "128")
    for r, (o, t) in enumerate(zip(_ranks(ours2, 2), tp2)):
        _same(o, t, f"TP1 -> TP2, rank {r}")
    _same(_ranks(ours1, 1)[0], tp1[0], "TP2 -> TP1")

    # ... and ours: `convert --to dist` stacks the experts as megatron-core does, which loads
    # it at TP2 into exactly its own shards
    ours_dist = tmp_path / "ours_dist.nemo"
    run_tool("convert", m1, "--to", "dist", ours_dist)
    extracted = tmp_path / "ours_dist"
    with tarfile.open(ours_dist) as tf:
        tf.extractall(extracted, filter="data")
    _torchrun(2, HELPERS / "mcore_moe_save.py", cfg_path, extracted / "model_weights", tmp_path / "loaded")
    for r in range(2):
        _same(torch.load(tmp_path / f"loaded_rank{r}.pt", weights_only=True), tp2[r], f"mcore loads our dist, rank {r}")

    # validate checks every expert's shape against the config
    run_tool("validate", m2)
    bad = [dict(r) for r in tp2]
    k = "model.decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight"
    bad[0][k] = bad[0][k][:, :-1].contiguous()
    _pack(tmp_path / "bad.nemo", config, bad)
    p = run_tool("validate", tmp_path / "bad.nemo", check=False)
    assert p.returncode != 0 and "local_experts.2.linear_fc2.weight" in p.stdout + p.stderr, p.stdout + p.stderr

    info = json.loads(run_tool("inspect", m2, "--json").stdout)
    assert info["architecture"]["moe"] == {
        "experts": 4, "topk": 2, "ffn_hidden_size": 32, "expert_parallel": 1,
        "shared_ffn_hidden_size": 48 if shared else None,
    }, info["architecture"]

    if shared:
        # the engine has no shared experts yet: refused with the key named, not dropped
        tok = tmp_path / "tokens.json"
        tok.write_text("[[1, 2, 3]]")
        p = subprocess.run([eval_exe(), "eval", str(m1), "--tokens", str(tok), "--device", "cpu"],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and "moe_shared_expert_intermediate_size" in p.stderr, p.stderr
        return
    diffs = []
    for tp, nemo in ((1, m1), (2, m2)):
        mc = _mcore_logits(nemo, tp, tmp_path)
        ours = _our_logits(nemo, tp, tmp_path)
        d = (ours - mc).abs().max().item()
        assert d <= 1e-4, f"TP{tp}: {d}"
        diffs.append(f"TP{tp} {d:.1e}")
    print("MoE eval vs megatron-core:", ", ".join(diffs))


FAMILIES = {
    "mixtral": (MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2, "router_jitter_noise": 0.0}),
    "qwen3_moe": (Qwen3MoeConfig, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                   "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": []}),
}
CASES = [(f, tied) for f in FAMILIES for tied in (False, True)]


@pytest.mark.parametrize("family,tied", CASES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in CASES])
def test_hf_moe_round_trip_and_mcore(tmp_path, run_tool, family, tied):
    cls, extra = FAMILIES[family]
    cfg = cls(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **extra,
    )
    torch.manual_seed(7 + tied)
    src = tmp_path / "hf"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(src)
    orig = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        want = orig(_tokens()).logits

    nemo2 = tmp_path / "m_tp2.nemo"
    run_tool("convert", "--from", "hf", src, nemo2, "--tp", "2")
    back = tmp_path / "back"
    run_tool("convert", nemo2, "--to", "hf", back)
    again = AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(again) is type(orig) and again.config.tie_word_embeddings is tied
    assert (back / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    sd0, sd1 = orig.state_dict(), again.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    with torch.no_grad():
        assert torch.equal(again(_tokens()).logits, want)

    nemo1 = tmp_path / "m_tp1.nemo"
    run_tool("convert", "--from", "hf", src, nemo1)
    _check_logits(f"{family} tied={tied}", want, nemo1, nemo2, tmp_path)


def test_expert_parallel_checkpoints(tmp_path, run_tool):
    """Expert parallelism (EP2: each rank holds two of the four experts) with megatron-core's
    own EP run on CPU: its distributed checkpoint saved at EP2 reads as the same model (reshard
    to TP1 equals its TP1 state dict, byte for byte); `convert --to dist --ep 2` writes a
    checkpoint megatron-core loads at EP2 into exactly its own EP shards, with its EP1 logits;
    per-rank outputs say EP 1 (they hold every expert); `reshard --ep 2` and an EP not dividing
    the experts are refused with the reason."""
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(MOE_CONFIG))
    tokens = tmp_path / "tokens.pt"
    torch.save(_tokens(), tokens)
    dist = tmp_path / "dist"
    dist.mkdir()
    save = HELPERS / "mcore_moe_save.py"
    _torchrun(1, save, cfg_path, dist, tmp_path / "tp1", "--init", "--logits", tokens)
    _torchrun(2, save, cfg_path, dist, tmp_path / "ep2", "--ep", "2", "--save", tmp_path / "ep2dist",
              "--logits", tokens)
    tp1 = torch.load(tmp_path / "tp1_rank0.pt", weights_only=True)
    ep2 = [torch.load(tmp_path / f"ep2_rank{r}.pt", weights_only=True) for r in range(2)]
    want = torch.load(tmp_path / "tp1_logits.pt")
    assert torch.equal(torch.load(tmp_path / "ep2_logits.pt"), want)
    # rank 1's local expert 0 is expert 2
    k = "model.decoder.layers.1.mlp.experts.local_experts.{}.linear_fc2.weight"
    assert torch.equal(ep2[1][k.format(0)], tp1[k.format(2)]) and k.format(2) not in ep2[1]

    # megatron-core's own checkpoint written at EP2
    folder = tmp_path / "ep2_nemo"
    folder.mkdir()
    (folder / "model_config.yaml").write_text(
        yaml.safe_dump({**MOE_CONFIG, "tensor_model_parallel_size": 1, "expert_model_parallel_size": 2}))
    os.rename(tmp_path / "ep2dist", folder / "model_weights")
    info = json.loads(run_tool("inspect", folder, "--json").stdout)
    assert info["architecture"]["moe"]["expert_parallel"] == 2, info["architecture"]
    out = tmp_path / "from_ep2.nemo"
    run_tool("reshard", folder, out, "--tp", "1", "--vocab-size", "128")
    _same(_ranks(out, 1)[0], tp1, "EP2 dist -> TP1")
    with tarfile.open(out) as tf:
        cfg = yaml.safe_load(tf.extractfile("./model_config.yaml").read())
    assert cfg["expert_model_parallel_size"] == 1
    # an expert TP of its own is a property of the dist run too; per-rank files split experts by TP
    (folder / "model_config.yaml").write_text(yaml.safe_dump(
        {**MOE_CONFIG, "tensor_model_parallel_size": 1, "expert_model_parallel_size": 2,
         "expert_tensor_parallel_size": 1}))
    out2 = tmp_path / "from_ep2_tp2.nemo"
    run_tool("reshard", folder, out2, "--tp", "2", "--vocab-size", "128")
    with tarfile.open(out2) as tf:
        cfg = yaml.safe_load(tf.extractfile("./model_config.yaml").read())
    assert (cfg["expert_model_parallel_size"], cfg["expert_tensor_parallel_size"]) == (1, 2)

    # Megatron-LM's legacy files of megatron-core's EP2 shards (mp_rank_00_00{0,1}: each EP
    # rank's own experts, numbered from 0; PP 1 and EP 2 told apart by the args) read as the
    # EP1 model: to a .nemo it is megatron-core's TP1 state dict, keys, order and bytes
    import argparse
    import signal

    c = MOE_CONFIG
    args = argparse.Namespace(
        num_layers=c["num_layers"], hidden_size=c["hidden_size"], ffn_hidden_size=c["ffn_hidden_size"],
        num_attention_heads=c["num_attention_heads"], group_query_attention=True,
        num_query_groups=c["num_query_groups"], kv_channels=c["kv_channels"], swiglu=True, normalization="RMSNorm",
        norm_epsilon=c["layernorm_epsilon"], add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True,
        position_embedding_type="rope", rotary_base=10000, rotary_percent=1.0,
        untie_embeddings_and_output_weights=True, padded_vocab_size=128, make_vocab_size_divisible_by=32,
        seq_length=64, max_position_embeddings=64, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        expert_model_parallel_size=2, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
        moe_router_pre_softmax=True, moe_grouped_gemm=False, transformer_impl="local",
        params_dtype=torch.float32, exit_signal=signal.SIGTERM)
    mlm = tmp_path / "mlm_ep2"
    for r in range(2):
        f = mlm / f"iter_0000005/mp_rank_00_{r:03d}/model_optim_rng.pt"
        f.parent.mkdir(parents=True)
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 5,
                    "model": {k[len("model."):]: v for k, v in ep2[r].items()}}, f)
    (mlm / "latest_checkpointed_iteration.txt").write_text("5")
    run_tool("convert", mlm, "--to", "nemo1", tmp_path / "from_mlm_ep2.nemo")
    _same(_ranks(tmp_path / "from_mlm_ep2.nemo", 1)[0], tp1, "Megatron-LM legacy EP2 -> TP1")

    # ours at EP2, loaded by megatron-core at EP2
    m1 = tmp_path / "mcore_tp1.nemo"
    _pack(m1, MOE_CONFIG, [tp1])
    ours = tmp_path / "ours_ep2.nemo"
    run_tool("convert", m1, "--to", "dist", "--ep", "2", ours)
    extracted = tmp_path / "ours_ep2"
    with tarfile.open(ours) as tf:
        tf.extractall(extracted, filter="data")
    assert yaml.safe_load((extracted / "model_config.yaml").read_text())["expert_model_parallel_size"] == 2
    _torchrun(2, save, cfg_path, extracted / "model_weights", tmp_path / "loaded", "--ep", "2", "--logits", tokens)
    for r in range(2):
        _same(torch.load(tmp_path / f"loaded_rank{r}.pt", weights_only=True), ep2[r], f"mcore EP2 loads ours, rank {r}")
    assert torch.equal(torch.load(tmp_path / "loaded_logits.pt"), want)

    # per-rank files that do not hold every expert split by TP are refused, not misread
    _pack(tmp_path / "ep_per_rank.nemo", {**MOE_CONFIG, "expert_model_parallel_size": 2}, [tp1])
    _pack(tmp_path / "etp_per_rank.nemo", {**MOE_CONFIG, "expert_tensor_parallel_size": 1}, [tp1, tp1])
    for args, message in [
        (("reshard", tmp_path / "ep_per_rank.nemo", tmp_path / "a.nemo", "--tp", "1"),
         "expert_model_parallel_size 2 in a per-rank archive"),
        (("reshard", tmp_path / "etp_per_rank.nemo", tmp_path / "b.nemo", "--tp", "1"),
         "expert_tensor_parallel_size 1 with tensor_model_parallel_size 2"),
        (("reshard", m1, tmp_path / "x.nemo", "--tp", "1", "--ep", "2"), "--to dist --ep 2"),
        (("convert", m1, "--to", "dist", "--ep", "3", tmp_path / "y.nemo"), "must divide num_moe_experts (4)"),
        (("convert", m1, "--to", "hf", "--ep", "2", tmp_path / "z"), "--ep is for --to dist"),
    ]:
        p = run_tool(*args, check=False)
        assert p.returncode == 2 and message in p.stderr, p.stderr
        assert not Path(args[-1] if args[0] == "convert" else args[2]).exists()
