"""Gemma 2 / Gemma 3 on megatron-core 0.16.1's GPTModel, the way NeMo 2 and Megatron-Bridge
build it: megatron-core ships no Gemma layer spec, so the few pieces it lacks are defined here on
top of its own modules, and everything else (SelfAttention, DotProductAttention with its per-layer
window, MLP, TransformerLayer / TransformerBlock, rotary embeddings, vocab-parallel embedding and
output layer) is megatron-core's:

* `ZeroCenteredRMSNorm`: RMSNorm applying `1 + w` (megatron-core's `layernorm_zero_centered_gamma`,
  which its local torch norm refuses);
* `RowParallelLinearPostNorm`: megatron-core's RowParallelLinear followed by a norm of its output,
  registered as `post_layernorm` (NeMo 2's TERowParallelLinearLayerNorm, without TE);
* `SoftcappedAttention`: megatron-core's DotProductAttention with the scores capped
  (`cap * tanh(scores / cap)`) before its masked softmax;
* `GemmaSelfAttention`: SelfAttention whose windowed layers take rotary tables of their own base
  (Gemma 3's `rope_local_base_freq`);
* embeddings scaled by `sqrt(hidden_size)` and logits soft-capped by forward hooks on
  megatron-core's embedding and output layer.

The NeMo keys read (`model_config.yaml`): `layernorm_zero_centered_gamma`, `post_layernorm`,
`scale_embedding`, `query_pre_attn_scalar`, `attn_logit_softcapping`, `final_logit_softcapping`,
`window_size`, `window_attn_skip_freq`, `rope_local_base_freq`, `qk_layernorm`,
`seq_len_interpolation_factor`.
"""
import math
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import is_layer_window_attention


class ZeroCenteredRMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size, eps=1e-5, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class RowParallelLinearPostNorm(RowParallelLinear):
    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.post_layernorm = ZeroCenteredRMSNorm(config, output_size, config.layernorm_epsilon)

    def forward(self, x, *args, **kwargs):
        out, bias = super().forward(x, *args, **kwargs)
        return self.post_layernorm(out), bias


class _Capped(torch.nn.Module):
    """megatron-core's scale-mask-softmax, given soft-capped scores."""

    def __init__(self, inner, cap):
        super().__init__()
        self.inner, self.cap = inner, cap

    def forward(self, scores, mask, *args, **kwargs):
        return self.inner(torch.tanh(scores / self.cap) * self.cap, mask, *args, **kwargs)


class SoftcappedAttention(DotProductAttention):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        cap = getattr(config, "gemma_attn_softcap", None)
        if cap:
            self.scale_mask_softmax = _Capped(self.scale_mask_softmax, cap)


class GemmaSelfAttention(SelfAttention):
    def __init__(self, config, submodules, layer_number, *args, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        local = getattr(config, "gemma_local_rope_base", None)
        windowed = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        # a list, so the tables are not a submodule (nothing for the strict load to expect)
        self._local_rope = (
            [RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=local)]
            if local and windowed else []
        )

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        if self._local_rope:
            rotary_pos_emb = self._local_rope[0](hidden_states.shape[0])
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)


def is_gemma(c):
    return bool(c.get("post_layernorm"))


def gemma_model(c, tp, vocab):
    """megatron-core's GPTModel with the Gemma modules above, for the NeMo config `c`."""
    window = c.get("window_size")
    skip = c.get("window_attn_skip_freq")
    cfg = TransformerConfig(
        num_layers=c["num_layers"], hidden_size=c["hidden_size"], ffn_hidden_size=c["ffn_hidden_size"],
        num_attention_heads=c["num_attention_heads"], num_query_groups=c["num_query_groups"],
        kv_channels=c["kv_channels"], normalization="RMSNorm", layernorm_epsilon=c["layernorm_epsilon"],
        gated_linear_unit=True, activation_func=partial(F.gelu, approximate="tanh"), add_bias_linear=False,
        qk_layernorm=bool(c.get("qk_layernorm")),
        window_size=tuple(window) if window is not None else None,
        window_attn_skip_freq=list(skip) if isinstance(skip, list) else skip,
        softmax_scale=1.0 / math.sqrt(c["query_pre_attn_scalar"]),
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, sequence_parallel=False,
        init_method_std=0.02,
    )
    cfg.gemma_attn_softcap = c.get("attn_logit_softcapping")
    cfg.gemma_local_rope_base = c.get("rope_local_base_freq")
    qk = ZeroCenteredRMSNorm if c.get("qk_layernorm") else IdentityOp
    layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=ZeroCenteredRMSNorm,
            self_attention=ModuleSpec(
                module=GemmaSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=SoftcappedAttention,
                    linear_proj=RowParallelLinearPostNorm, q_layernorm=qk, k_layernorm=qk,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=ZeroCenteredRMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinearPostNorm),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    block = TransformerBlockSubmodules(layer_specs=[layer] * c["num_layers"], layer_norm=ZeroCenteredRMSNorm)
    model = GPTModel(
        config=cfg, transformer_layer_spec=block, vocab_size=vocab,
        max_sequence_length=c["max_position_embeddings"], pre_process=True, post_process=True,
        parallel_output=False, share_embeddings_and_output_weights=c["share_embeddings_and_output_weights"],
        position_embedding_type="rope", rotary_percent=1.0, rotary_base=c["rotary_base"],
        seq_len_interpolation_factor=c.get("seq_len_interpolation_factor"),
    ).eval()
    if c.get("scale_embedding"):
        scale = math.sqrt(c["hidden_size"])
        model.embedding.register_forward_hook(lambda m, i, out: out * torch.tensor(scale, dtype=out.dtype))
    cap = c.get("final_logit_softcapping")
    if cap:
        model.output_layer.register_forward_hook(lambda m, i, out: (torch.tanh(out[0] / cap) * cap, *out[1:]))
    return model
