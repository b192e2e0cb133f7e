"""Loads a per-rank `.nemo` (TP = world size, PP 1) into megatron-core's own GPTModel with the
local layer spec, built from the archive's `model_config.yaml` (GQA, `bias`, `qkv_bias`,
`qk_layernorm`, `window_size`, rotary base, tied embeddings, and mixture-of-experts layers:
`num_moe_experts`, `moe_router_topk`, `moe_ffn_hidden_size`, `moe_router_pre_softmax`, with
SequentialMLP experts), with load_state_dict(strict=True) on every rank, and saves its logits of
TOKENS (gathered over TP) on rank 0.
usage: torchrun --nproc_per_node=TP mcore_family.py MODEL.nemo TOKENS.pt OUT.pt

The model is built with a random init first, so a tensor the archive lacks fails the strict
load and one that is not loaded shows in the logits. CPU workarounds as in fixtures/mcore/README.md
("Running megatron-core on CPU").
"""
import io
import sys
import tarfile

import torch

torch.cuda.current_device = lambda: torch.device("cpu")  # noqa: E731
torch.cuda.synchronize = lambda *a, **k: None  # noqa: E731

import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
import megatron.core.fusions.fused_softmax as fused_softmax  # noqa: E402
import megatron.core.transformer.moe.moe_utils as moe_utils  # noqa: E402
from mcore_gemma import gemma_model, is_gemma  # noqa: E402

# megatron-core 0.16.1 without TransformerEngine: the router's gating GEMM tests a name its
# failed TE import never bound
moe_utils.te_general_gemm = None


# megatron-core builds its attention masks on "cuda" (transformer/utils.py): the same masks on
# the CPU, for the unfused softmax that uses them.
def _causal_mask(sq):
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _sliding_window_causal_mask(sq, skv, window_size):
    m = torch.ones(sq, skv, dtype=torch.bool)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    return ~torch.tril(mu, diagonal=skv - sq + window_size[1])


fused_softmax.get_default_causal_mask = _causal_mask
fused_softmax.get_sliding_window_causal_mask = _sliding_window_causal_mask


def build(c, tp):
    """megatron-core's TransformerConfig for the NeMo config `c` at TP `tp`, and the expert
    count (None for dense MLPs)."""
    window = c.get("window_size")
    experts = c.get("num_moe_experts") or None
    moe = {}
    if experts:
        moe = dict(
            num_moe_experts=experts, moe_router_topk=c["moe_router_topk"],
            moe_ffn_hidden_size=c["moe_ffn_hidden_size"], moe_grouped_gemm=False,
            moe_router_pre_softmax=bool(c.get("moe_router_pre_softmax")),
            moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0, expert_model_parallel_size=c.get("expert_model_parallel_size") or 1,
            moe_shared_expert_intermediate_size=c.get("moe_shared_expert_intermediate_size"),
            moe_shared_expert_gate=bool(c.get("moe_shared_expert_gate")),
        )
    cfg = TransformerConfig(**moe,
        num_layers=c["num_layers"], hidden_size=c["hidden_size"], ffn_hidden_size=c["ffn_hidden_size"],
        num_attention_heads=c["num_attention_heads"], num_query_groups=c["num_query_groups"],
        kv_channels=c["kv_channels"], normalization="RMSNorm", layernorm_epsilon=c["layernorm_epsilon"],
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=c["bias"],
        add_qkv_bias=bool(c.get("qkv_bias")), qk_layernorm=bool(c.get("qk_layernorm")),
        window_size=tuple(window) if window is not None else None,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, sequence_parallel=False,
        init_method_std=0.02,
    )
    return cfg, experts


def model_of(c, tp, vocab):
    """megatron-core's GPTModel (local spec, SequentialMLP experts; Gemma's modules from
    mcore_gemma.py) for `c`, randomly initialised."""
    if is_gemma(c):
        return gemma_model(c, tp, vocab)
    cfg, experts = build(c, tp)
    return GPTModel(
        config=cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(
            num_experts=experts, moe_grouped_gemm=False, normalization="RMSNorm",
            qk_layernorm=bool(c.get("qk_layernorm")),
        ),
        vocab_size=vocab, max_sequence_length=c["max_position_embeddings"], pre_process=True,
        post_process=True, parallel_output=False,
        share_embeddings_and_output_weights=c["share_embeddings_and_output_weights"],
        position_embedding_type="rope", rotary_percent=1.0, rotary_base=c["rotary_base"],
    ).eval()


def logits_of(model, tokens):
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    with torch.no_grad():
        return model(tokens, pos, attention_mask=None)


def main():
    path, tokens_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.distributed.init_process_group(backend="gloo")
    tp = torch.distributed.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    rank = parallel_state.get_tensor_model_parallel_rank()
    with tarfile.open(path) as tf:
        names = {m.name.lstrip("./"): m for m in tf.getmembers()}
        c = yaml.safe_load(tf.extractfile(names["model_config.yaml"]).read())
        member = "model_weights.ckpt" if tp == 1 else f"mp_rank_{rank:02d}/model_weights.ckpt"
        sd = torch.load(io.BytesIO(tf.extractfile(names[member]).read()), weights_only=True)
    assert c["tensor_model_parallel_size"] == tp, (c["tensor_model_parallel_size"], tp)
    vocab = sd["model.embedding.word_embeddings.weight"].shape[0] * tp
    torch.manual_seed(1234 + rank)
    model = model_of(c, tp, vocab)
    missing, unexpected = model.load_state_dict({k[len("model."):]: v for k, v in sd.items()}, strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    logits = logits_of(model, torch.load(tokens_path))
    if rank == 0:
        torch.save(logits.float(), out)
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
