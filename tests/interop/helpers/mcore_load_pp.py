"""Loads each rank file of a `tp_rank_XX_pp_rank_YYY` student `.nemo` (written by
`nemo-tool distill` at PP > 1) into megatron-core's GPTModel stage of that rank, with
load_state_dict(strict=True), under megatron-core's own parallel_state at the same TP and PP
(CPU over gloo), and checks every loaded tensor equals the file's.
usage: torchrun --nproc_per_node=TP*PP mcore_load_pp.py STUDENT.nemo TP PP TIED

The model is the tiny student of tests/distill_train.rs (hidden 32, ffn 64, 4 heads, 2 query
groups, rope, RMSNorm, SwiGLU, no bias, vocab padded to 128); its layer count comes from the
archive's config. CPU workarounds as in fixtures/mcore/README.md ("Running megatron-core on CPU").
Prints one `stage P tp T: N tensors loaded` line per rank.
"""
import io
import sys
import tarfile

import torch

torch.cuda.current_device = lambda: torch.device("cpu")  # noqa: E731
torch.cuda.synchronize = lambda *a, **k: None  # noqa: E731
# the tied-embedding all-reduce at PP > 1 moves the weight to CUDA first: stay on the CPU
torch.Tensor.cuda = lambda self, *a, **k: self  # noqa: E731

import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402


def main():
    path, tp, pp, tied = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    torch.distributed.init_process_group(backend="gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    t, p = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    with tarfile.open(path) as tf:
        names = {m.name.lstrip("./"): m for m in tf.getmembers()}
        cfg_yaml = yaml.safe_load(tf.extractfile(names["model_config.yaml"]).read())
        member = f"tp_rank_{t:02d}_pp_rank_{p:03d}/model_weights.ckpt"
        sd = torch.load(io.BytesIO(tf.extractfile(names[member]).read()), weights_only=True)
    assert cfg_yaml["tensor_model_parallel_size"] == tp and cfg_yaml["pipeline_model_parallel_size"] == pp
    cfg = TransformerConfig(
        num_layers=cfg_yaml["num_layers"], hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        num_query_groups=2, kv_channels=8, normalization="RMSNorm", layernorm_epsilon=1e-5,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=False,
        pipeline_dtype=torch.float32, init_method_std=0.02,
    )
    model = GPTModel(
        config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=128, max_sequence_length=32,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=tied, position_embedding_type="rope", rotary_percent=1.0,
    )
    stripped = {k[len("model."):]: v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(stripped, strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    got = model.state_dict()
    n = 0
    for k, v in stripped.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), f"{member}: {k} differs after loading"
            n += 1
    print(f"stage {p} tp {t}: {n} tensors loaded", flush=True)
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
