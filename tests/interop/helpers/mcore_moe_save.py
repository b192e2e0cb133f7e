"""megatron-core writes a mixture-of-experts GPT at two TP sizes, for the reshard tests: the
TP1 run (`--init`) builds the model from NEMO_CONFIG.yaml with its own random init (norm weights
moved away from 1), saves it with `dist_checkpointing.save` to DIST_DIR and its per-rank state
dict (`model.` keys, as NeMo stores it) to OUT_PREFIX_rank0.pt; a run at another TP builds that
TP's model, loads DIST_DIR with `dist_checkpointing.load` (megatron-core reshards it itself) and
saves each rank's state dict to OUT_PREFIX_rank{r}.pt: megatron-core's own TP shards of the same
weights.
usage: torchrun --nproc_per_node=TP mcore_moe_save.py NEMO_CONFIG.yaml DIST_DIR OUT_PREFIX [--init]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import yaml  # noqa: E402

from mcore_family import model_of  # noqa: E402  (also applies the CPU workarounds)
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402


def main():
    cfg_path, dist_dir, prefix = sys.argv[1], sys.argv[2], sys.argv[3]
    init = "--init" in sys.argv[4:]
    torch.distributed.init_process_group(backend="gloo")
    tp = torch.distributed.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    rank = parallel_state.get_tensor_model_parallel_rank()
    c = yaml.safe_load(open(cfg_path).read())
    torch.manual_seed(5 + rank)
    model = model_of(c, tp, c["padded_vocab"])
    if init:
        assert tp == 1
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(0.1 * torch.randn_like(p))
        dist_checkpointing.save(model.sharded_state_dict(prefix="model."), dist_dir)
    else:
        loaded = dist_checkpointing.load(model.sharded_state_dict(prefix="model."), dist_dir)
        model.load_state_dict({k[len("model."):]: v for k, v in loaded.items()}, strict=True)
    sd = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save(sd, f"{prefix}_rank{rank}.pt")
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
