"""Writes megatron-core reference models for the distill engine's interop test.

Usage: python distill_mcore_ref.py OUT_DIR VARIANT

Builds a TP=1 megatron-core 0.16.1 GPTModel on CPU (gloo, world size 1, the in-process
workarounds of fixtures/mcore/scripts/mcore_common.py), fills every parameter with seeded
non-trivial values, and writes OUT_DIR/VARIANT/ as an extracted NeMo checkpoint folder
(model_config.yaml + model_weights.ckpt with `model.*` keys) plus tokens.i64 / logits.f32
(raw little-endian) of mcore's own forward over the padded vocabulary. Run in a subprocess:
the workarounds patch torch.cuda globally.
"""
import collections
import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "fixtures", "mcore", "scripts"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mcore_common as mc  # noqa: E402  (applies the CPU workarounds)
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

VOCAB = 100
SEQ = 32

# mcore arguments, and the NeMo model_config.yaml keys that describe the same model
VARIANTS = {
    # GPT-2 / NeMo-GPT: LayerNorm, exact GELU, plain MLP, MHA, biases, tied, learned positions
    "gpt": dict(
        mcore=dict(normalization="LayerNorm", gated_linear_unit=False, act=F.gelu, bias=True,
                   heads=8, groups=8, tied=True, pos="learned_absolute", rope={}),
        nemo="normalization: layernorm\nactivation: gelu\nbias: true\nnum_query_groups: null\n"
             "share_embeddings_and_output_weights: true\nposition_embedding_type: learned_absolute\n",
    ),
    # Llama-3 style RoPE: partial rotary, large base, llama3 frequency scaling, interpolation
    "rope_scaled": dict(
        mcore=dict(normalization="RMSNorm", gated_linear_unit=True, act=F.silu, bias=False,
                   heads=8, groups=2, tied=False, pos="rope",
                   rope=dict(rotary_percent=0.5, rotary_base=500000, rope_scaling=True,
                             rope_scaling_factor=8.0, seq_len_interpolation_factor=2.0)),
        nemo="normalization: rmsnorm\nactivation: fast-swiglu\nbias: false\nnum_query_groups: 2\n"
             "share_embeddings_and_output_weights: false\nposition_embedding_type: rope\n"
             "rotary_percentage: 0.5\nrotary_base: 500000\nscale_positional_embedding: true\n"
             "rope_scaling_factor: 8.0\nseq_len_interpolation_factor: 2.0\n",
    ),
}


def build(v):
    m = VARIANTS[v]["mcore"]
    cfg = TransformerConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=m["heads"],
        num_query_groups=m["groups"], kv_channels=8, normalization=m["normalization"],
        layernorm_epsilon=1e-5, gated_linear_unit=m["gated_linear_unit"], activation_func=m["act"],
        add_bias_linear=m["bias"], add_qkv_bias=m["bias"], hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=torch.float32, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, sequence_parallel=False, init_method_std=0.02,
    )
    model = GPTModel(
        config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization=m["normalization"]),
        vocab_size=mc.padded_vocab_size(VOCAB, 32, 1), max_sequence_length=SEQ, pre_process=True,
        post_process=True, parallel_output=False, share_embeddings_and_output_weights=m["tied"],
        position_embedding_type=m["pos"], **m["rope"],
    )
    model.eval()
    return model


def randomize_(model, seed):
    g = torch.Generator().manual_seed(seed)
    new = {}
    for k, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        if "layernorm" in k and k.endswith("weight"):
            v = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        elif k.endswith(".bias"):
            v = 0.1 * torch.randn(t.shape, generator=g)
        elif k == "embedding.word_embeddings.weight":
            v = (0.25 if model.share_embeddings_and_output_weights else 1.0) * torch.randn(t.shape, generator=g)
        elif k == "embedding.position_embeddings.weight":
            v = 0.3 * torch.randn(t.shape, generator=g)
        else:
            v = torch.randn(t.shape, generator=g) / (t.shape[1] ** 0.5)
        new[k] = v.to(t.dtype)
    missing, unexpected = model.load_state_dict(new, strict=False)
    assert not unexpected, unexpected
    assert all(m.endswith("_extra_state") for m in missing), missing


def main(out, v):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    mc.init_mp(1)
    model = build(v)
    randomize_(model, 4321)
    d = os.path.join(out, v)
    os.makedirs(d, exist_ok=True)
    sd = collections.OrderedDict(("model." + k, t) for k, t in model.state_dict().items())
    torch.save(sd, os.path.join(d, "model_weights.ckpt"))
    with open(os.path.join(d, "model_config.yaml"), "w") as f:
        f.write("mcore_gpt: true\nnum_layers: 2\nhidden_size: 64\nffn_hidden_size: 96\n"
                "num_attention_heads: 8\nkv_channels: 8\nlayernorm_epsilon: 1.0e-05\n"
                "make_vocab_size_divisible_by: 32\nmax_position_embeddings: 32\n"
                "tensor_model_parallel_size: 1\npipeline_model_parallel_size: 1\n"
                "transformer_engine: false\nprecision: 32\n" + VARIANTS[v]["nemo"])
    tokens = mc.fixed_tokens()
    logits = mc.forward_logits(model, tokens)
    open(os.path.join(d, "tokens.i64"), "wb").write(tokens.to(torch.int64).numpy().tobytes())
    open(os.path.join(d, "logits.f32"), "wb").write(logits.float().contiguous().numpy().tobytes())
    print(v, tuple(logits.shape), "absmax", float(logits.abs().max()))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
