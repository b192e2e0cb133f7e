"""Loads torch_dist folders with megatron-core's own `dist_checkpointing.load` into a
local-spec Llama GPTModel at TP=world size (CPU over gloo) and saves their logits on rank 0.
usage: torchrun --nproc_per_node=TP mcore_load_dist.py TOKENS.pt OUT.pt [--ref REF_TP1_CKPT] CKPT_DIR...
Keys are read under the prefix each checkpoint's metadata uses (`model.`, NeMo 2's `module.`, or
none as Megatron-LM saves them).

OUT.pt is a list with one logits tensor per CKPT_DIR, in order, all computed by this one run:
a test passes the fixture's own checkpoint (the reference) and ours, and compares the two, so
the comparison never involves floats computed on another machine. Each checkpoint goes into a
freshly built model with its own random init, so a tensor that is not loaded shows.

The model is the tiny Llama of fixtures/mcore (2 layers, hidden 64, ffn 96, 8 heads, 2 query
groups, vocab 100 padded to 128). CPU workarounds as in fixtures/mcore/README.md ("Running
megatron-core on CPU"), copied here so the test does not import the fixture scripts. With a
reference per-rank checkpoint (--ref, a TP=1 model_weights.ckpt) rank r also checks that every
loaded tensor equals the reference's TP split, as megatron-core computes it.
"""
import os
import sys

import torch

torch.cuda.current_device = lambda: torch.device("cpu")  # noqa: E731
torch.cuda.synchronize = lambda *a, **k: None  # noqa: E731

import torch.nn.functional as F  # noqa: E402
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def build(tp):
    cfg = TransformerConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=2,
        kv_channels=8, normalization="RMSNorm", layernorm_epsilon=1e-5, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, sequence_parallel=False,
        init_method_std=0.02,
    )
    model = GPTModel(
        config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=128, max_sequence_length=32, pre_process=True, post_process=True,
        parallel_output=False, share_embeddings_and_output_weights=False,
        position_embedding_type="rope", rotary_percent=1.0, rotary_base=10000,
    )
    return model.eval()


def key_prefix(ckpt):
    """`model.` (NeMo 1 model_weights/), `module.` (NeMo 2 weights/) or none (Megatron-LM), as
    the checkpoint's own metadata names its keys."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    for p in ("model.", "module."):
        if any(k.startswith(p + "decoder.") for k in keys):
            return p
    return ""


def load_and_run(ckpt, seed, tokens, ref, rank, tp):
    torch.manual_seed(seed + rank)  # random init: a tensor that is not loaded shows in the logits
    model = build(tp)
    prefix = key_prefix(ckpt)
    loaded = dist_checkpointing.load(model.sharded_state_dict(prefix=prefix), ckpt)
    model.load_state_dict({k[len(prefix):]: v for k, v in loaded.items()}, strict=True)
    if ref is not None:
        got = model.state_dict()
        bad = []
        for k, v in ref.items():
            if v is None:
                continue
            mine = got[k[len("model."):]]
            # Rebuild the rank's expected slice from the TP1 tensor with mcore's own rules.
            if mine.shape != v.shape:
                dim = [i for i in range(v.dim()) if mine.shape[i] != v.shape[i]][0]
                if "linear_fc1" in k:
                    g, u = v.chunk(2, 0)
                    exp = torch.cat([g.chunk(tp, 0)[rank], u.chunk(tp, 0)[rank]])
                else:
                    exp = v.chunk(tp, dim)[rank]
            else:
                exp = v
            if not torch.equal(mine, exp):
                bad.append(k)
        # every rank stops here, with every rank's names (not one here and another in a collective)
        everyone = [None] * tp
        torch.distributed.all_gather_object(everyone, bad)
        assert not any(everyone), f"{ckpt}: loaded tensors differ from the reference, by rank: {everyone}"
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=pos, attention_mask=mask)


def main():
    args = sys.argv[1:]
    ref = None
    if "--ref" in args:
        i = args.index("--ref")
        ref = torch.load(args[i + 1], weights_only=True)
        del args[i:i + 2]
    tokens_path, out, ckpts = args[0], args[1], args[2:]
    assert ckpts, __doc__
    torch.distributed.init_process_group(backend="gloo")
    rank, tp = torch.distributed.get_rank(), torch.distributed.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
    tokens = torch.load(tokens_path)
    logits = [load_and_run(c, 999 + 1000 * i, tokens, ref, rank, tp) for i, c in enumerate(ckpts)]
    if rank == 0:
        torch.save(logits, out)
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
