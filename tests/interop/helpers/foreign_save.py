"""Writes the checkpoint folders of today's trainers from the fixture's tiny Llama, with the real
libraries, for tests/interop/test_foreign.py (issue 17):

- OUT/nemo2/: NeMo 2. `weights/` is megatron-core's own `dist_checkpointing.save` of the
  fixture's TP1 weights loaded into its GPTModel, keys prefixed `module.` as NeMo 2's
  MegatronParallel saves them; `context/model.yaml` the model's TransformerConfig fields as
  NeMo 2 dumps them (`_target_` nodes, `activation_func` a function reference),
  `context/io.json` a fiddle-style JSON, `context/nemo_tokenizer/tokenizer.model` the fixture's
  SentencePiece model.
- OUT/bridge/: Megatron-Bridge: tracker 0, `iter_0000000/` with megatron-core's torch_dist save
  (unprefixed keys), `run_config.yaml` (`model:` the provider's fields), `train_state.pt`,
  `tokenizer/tokenizer.model`; `latest_train_state.pt`.
- OUT/mlm_dist/: Megatron-LM `--ckpt-format torch_dist`: `latest_checkpointed_iteration.txt` =
  10, `iter_0000010/` saved by `dist_checkpointing.save` with unprefixed keys and the common
  state Megatron-LM puts beside them (`args`, an `argparse.Namespace`; `checkpoint_version`;
  `iteration`), which megatron-core writes to `common.pt`.
- OUT/mlm_v15/: that iteration with its `.metadata` pickled as megatron-core 0.15 did
  (`megatron.core.dist_checkpointing.strategies.torch.MCoreMetadata`); tracker 10.
- OUT/mlm_v19/: the torch_dist iteration as megatron-core 0.19+ lays it out (one `.distcp` per
  rank, no `common.pt`, the common state with the args in the DCP object
  `common_state/shard_0_1`), written by torch's own DCP writer (tensors only); tracker 40.
- OUT/mlm_legacy/: Megatron-LM `--ckpt-format torch`: tracker 20, `iter_0000020/mp_rank_0{0,1}/
  model_optim_rng.pt`, each a `torch.save` of {args (Namespace with TP=2, `exit_signal` a
  `signal.Signals`, `params_dtype` a torch dtype), checkpoint_version 3.0, iteration 20, model
  (the fixture's TP2 shards, unprefixed), optimizer (state tensors), opt_param_scheduler,
  rng_state (Python, numpy and torch RNG states)}.
- OUT/mlm_pp2/: the same at PP2 (`mp_rank_00_00{0,1}`, stage-local layer numbers), tracker 30.
- OUT/hostile/iter_0000001/mp_rank_00/model_optim_rng.pt: the same pickle with `posix.system`
  called while loading.

usage: torchrun --nproc_per_node=1 foreign_save.py ROOT OUT
"""
import argparse
import io
import json
import os
import pickle
import random
import shutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mcore_load_dist import build  # noqa: E402  (also applies the CPU workarounds)
from megatron.core import dist_checkpointing, parallel_state  # noqa: E402

MODEL_YAML = """_target_: nemo.collections.llm.gpt.model.llama.LlamaModel
config:
  _target_: nemo.collections.llm.gpt.model.llama.LlamaConfig
  num_layers: {num_layers}
  hidden_size: {hidden_size}
  ffn_hidden_size: {ffn_hidden_size}
  num_attention_heads: {num_attention_heads}
  num_query_groups: {num_query_groups}
  kv_channels: {kv_channels}
  normalization: {normalization}
  layernorm_epsilon: {layernorm_epsilon}
  gated_linear_unit: {gated_linear_unit}
  activation_func:
    _target_: torch.nn.functional.silu
    _call_: false
  add_bias_linear: false
  add_qkv_bias: false
  position_embedding_type: rope
  rotary_base: 10000
  rotary_percent: 1.0
  seq_length: 32
  share_embeddings_and_output_weights: false
  make_vocab_size_divisible_by: 128
  init_method_std: 0.02
  tensor_model_parallel_size: 1
  pipeline_model_parallel_size: 1
  transformer_layer_spec:
    _target_: megatron.core.models.gpt.gpt_layer_specs.get_gpt_layer_local_spec
    _call_: false
  params_dtype:
    _target_: torch.float32
    _call_: false
  bf16: false
tokenizer:
  _target_: nemo.collections.common.tokenizers.sentencepiece_tokenizer.SentencePieceTokenizer
  model_path: nemo_tokenizer/tokenizer.model
"""


def mlm_args(tp):
    """Megatron-LM's args for the fixture model (the fields its checkpoints carry)."""
    return argparse.Namespace(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
        group_query_attention=True, num_query_groups=2, kv_channels=8, swiglu=True,
        normalization="RMSNorm", norm_epsilon=1e-5, add_bias_linear=False, add_qkv_bias=False,
        qk_layernorm=False, position_embedding_type="rope", rotary_base=10000, rotary_percent=1.0,
        untie_embeddings_and_output_weights=True, padded_vocab_size=128,
        make_vocab_size_divisible_by=128, tokenizer_type="SentencePieceTokenizer",
        tokenizer_model="/data/tokenizers/tiny/tokenizer.model", seq_length=32,
        max_position_embeddings=32, tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1,
        transformer_impl="local", ckpt_format="torch", params_dtype=torch.float32, bf16=False,
        fp16=False, exit_signal=signal.SIGTERM, init_method_std=0.02, num_experts=None,
        data_path=["1.0", "/data/corpus_text_document"], lr=3e-4, seed=1234,
    )


def legacy_file(path, args, model_sd, iteration):
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "model": model_sd,
        "optimizer": {
            "optimizer": {"state": {i: {"exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.ones_like(v)}
                                    for i, v in enumerate(t for t in model_sd.values() if t is not None)},
                          "param_groups": [{"lr": 3e-4, "params": list(range(len(model_sd)))}]},
            "fp32_from_fp16_params": [],
        },
        "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": iteration},
        "rng_state": [{
            "random_rng_state": random.getstate(),
            "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.get_rng_state(),
            "rng_tracker_states": {},
        }],
        "num_floating_point_operations_so_far": 12345,
    }
    torch.save(state, path)


class Hostile:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def main():
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.distributed.init_process_group(backend="gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    llama = root / "fixtures/mcore/llama"
    tp1 = torch.load(llama / "tp1/mp_rank_00/model_weights.ckpt", weights_only=True)
    model = build(1)
    model.load_state_dict({k[len("model."):]: v for k, v in tp1.items()}, strict=True)
    tok = root / "fixtures/mcore/tokenizer/tokenizer.model"
    cfg = model.config

    # NeMo 2
    n2 = out / "nemo2"
    (n2 / "context/nemo_tokenizer").mkdir(parents=True)
    shutil.copy(tok, n2 / "context/nemo_tokenizer/tokenizer.model")
    model_yaml = MODEL_YAML.format(
        **{k: getattr(cfg, k) for k in ["num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                        "num_query_groups", "kv_channels", "normalization", "layernorm_epsilon"]},
        gated_linear_unit=str(cfg.gated_linear_unit).lower())
    (n2 / "context/model.yaml").write_text(model_yaml)
    (n2 / "context/io.json").write_text(json.dumps({
        "root": {"type": "ref", "key": "trainer_context_1"},
        "objects": {"trainer_context_1": {"type": {"type": "pyref", "module": "nemo.lightning.io.pl",
                                                    "name": "TrainerContext"}, "items": [], "paths": ["<root>"]}},
        "refcounts": {"trainer_context_1": 1}, "version": "0.0.1"}))
    (n2 / "weights").mkdir()
    dist_checkpointing.save(model.sharded_state_dict(prefix="module."), str(n2 / "weights"))

    # Megatron-Bridge: iter_0000000/ (what AutoBridge.import_ckpt writes: step 0) with the
    # unprefixed torch_dist weights, run_config.yaml (the ConfigContainer; `model:` the provider's
    # TransformerConfig fields), train_state.pt, tokenizer/; latest_train_state.pt and the tracker
    mb = out / "bridge"
    it = mb / "iter_0000000"
    it.mkdir(parents=True)
    dist_checkpointing.save(dict(model.sharded_state_dict(), checkpoint_version=3.0, iteration=0), str(it))
    model_section = model_yaml.split("config:\n", 1)[1].split("tokenizer:", 1)[0].replace(
        "nemo.collections.llm.gpt.model.llama.LlamaConfig", "megatron.bridge.models.llama.llama_provider.LlamaModelProvider")
    (it / "run_config.yaml").write_text(
        "_target_: megatron.bridge.training.config.ConfigContainer\n"
        "rng:\n  _target_: megatron.bridge.training.config.RNGConfig\n  seed: 1234\n"
        "model:\n" + model_section +
        "tokenizer:\n  _target_: megatron.bridge.training.tokenizers.config.TokenizerConfig\n"
        "  tokenizer_type: SentencePieceTokenizer\n  tokenizer_model: tokenizer/tokenizer.model\n")
    state = {"step": torch.tensor(0), "consumed_train_samples": torch.tensor(0), "do_train": torch.tensor(False),
             "floating_point_operations_so_far": torch.tensor(0.0)}
    torch.save(state, it / "train_state.pt")
    torch.save(state, mb / "latest_train_state.pt")
    (it / "tokenizer").mkdir()
    shutil.copy(tok, it / "tokenizer/tokenizer.model")
    (mb / "latest_checkpointed_iteration.txt").write_text("0")

    # Megatron-LM torch_dist
    md = out / "mlm_dist"
    (md / "iter_0000010").mkdir(parents=True)
    state = dict(model.sharded_state_dict(), args=mlm_args(1), checkpoint_version=3.0, iteration=10)
    dist_checkpointing.save(state, str(md / "iter_0000010"))
    (md / "latest_checkpointed_iteration.txt").write_text("10")

    # Megatron-LM as megatron-core 0.15 wrote it: `.metadata` pickles megatron-core's own
    # MCoreMetadata (a dataclass subclass of torch's Metadata with `mcore_data`), re-pickled here
    # from the 0.16 save under that class's module and name
    import dataclasses
    import pickle as pkl

    import megatron.core.dist_checkpointing.strategies.torch as mst
    from torch.distributed.checkpoint.metadata import Metadata

    @dataclasses.dataclass
    class MCoreMetadata(Metadata):
        mcore_data: dict = dataclasses.field(default_factory=dict)

    MCoreMetadata.__module__, MCoreMetadata.__qualname__ = mst.__name__, "MCoreMetadata"
    v15 = out / "mlm_v15"
    shutil.copytree(md, v15)
    with open(v15 / "iter_0000010/.metadata", "rb") as f:
        plain = pkl.load(f)
    fields = {f.name: getattr(plain, f.name) for f in dataclasses.fields(Metadata)}
    stub, mst.MCoreMetadata = mst.MCoreMetadata, MCoreMetadata
    try:
        with open(v15 / "iter_0000010/.metadata", "wb") as f:
            pkl.dump(MCoreMetadata(**fields, mcore_data=dict(getattr(plain, "mcore_data", None) or {})), f)
    finally:
        mst.MCoreMetadata = stub

    # Megatron-LM as megatron-core 0.19+ lays it out, built from the documented layout with torch's
    # own DCP writer: one .distcp per rank, metadata.json without common_*, no common.pt, the
    # common state in the DCP object common_state/shard_0_1 = torch.save([state])
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = out / "whole.pt"
    dcp_to_torch_save(str(md / "iter_0000010"), str(whole))
    sd = {}
    for k, v in torch.load(whole, weights_only=False).items():  # written by torch just now
        # the (empty) _extra_state objects are left out: torch's writer would wrap them in a
        # pickled BytesIO, which megatron-core's own writer does not
        if isinstance(v, torch.Tensor):
            sd[k] = v
    whole.unlink()
    b = io.BytesIO()
    torch.save([{"args": mlm_args(1), "checkpoint_version": 3.0, "iteration": 40}], b)
    b.seek(0)
    sd["common_state/shard_0_1"] = b
    v19 = out / "mlm_v19/iter_0000040"
    dcp_save(sd, storage_writer=FileSystemWriter(str(v19), thread_count=1))
    (v19 / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
    (out / "mlm_v19/latest_checkpointed_iteration.txt").write_text("40")

    # Megatron-LM legacy, TP2 (the fixture's own TP2 shards)
    ml = out / "mlm_legacy"
    for r in range(2):
        shard = torch.load(llama / f"tp2/mp_rank_{r:02d}/model_weights.ckpt", weights_only=True)
        legacy_file(ml / f"iter_0000020/mp_rank_{r:02d}/model_optim_rng.pt", mlm_args(2),
                    {k[len("model."):]: v for k, v in shard.items()}, 20)
    (ml / "latest_checkpointed_iteration.txt").write_text("20")

    # Megatron-LM legacy, PP2: stage-local layer numbers (global layer 1 is stage 1's layer 0),
    # the embedding on the first stage, the final norm and output layer on the last
    mp = out / "mlm_pp2"
    args = mlm_args(1)
    args.pipeline_model_parallel_size = 2
    stages = [{}, {}]
    for k, v in tp1.items():
        k = k[len("model."):]
        if k.startswith("decoder.layers."):
            layer, rest = k[len("decoder.layers."):].split(".", 1)
            stages[int(layer)][f"decoder.layers.0.{rest}"] = v
        elif k.startswith("embedding."):
            stages[0][k] = v
        else:
            stages[1][k] = v
    for p, sd in enumerate(stages):
        legacy_file(mp / f"iter_0000030/mp_rank_00_{p:03d}/model_optim_rng.pt", args, sd, 30)
    (mp / "latest_checkpointed_iteration.txt").write_text("30")

    # hostile: a global outside the allowlist, called while unpickling
    h = out / "hostile/iter_0000001/mp_rank_00/model_optim_rng.pt"
    h.parent.mkdir(parents=True)
    torch.save({"args": mlm_args(1), "checkpoint_version": 3.0, "iteration": 1, "model": {}, "x": Hostile()}, h,
               pickle_protocol=pickle.DEFAULT_PROTOCOL)
    (out / "hostile/latest_checkpointed_iteration.txt").write_text("1")

    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
