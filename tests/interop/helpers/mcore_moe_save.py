"""megatron-core writes a mixture-of-experts GPT at several layouts, for the reshard tests: the
TP1 run (`--init`) builds the model from NEMO_CONFIG.yaml with its own random init (norm weights
moved away from 1), saves it with `dist_checkpointing.save` to DIST_DIR and its per-rank state
dict (`model.` keys, as NeMo stores it) to OUT_PREFIX_rank0.pt; a run at another layout (TP =
world / EP, expert parallelism `--ep EP`) builds that layout's model, loads DIST_DIR with
`dist_checkpointing.load` (megatron-core reshards it itself) and saves each rank's state dict to
OUT_PREFIX_rank{r}.pt: megatron-core's own shards of the same weights (at EP > 1 each rank holds
its experts, numbered locally). `--save DIR` saves that model again with
`dist_checkpointing.save` (megatron-core's own checkpoint written at this layout); `--logits
TOKENS.pt` saves its logits of TOKENS (rank 0) to OUT_PREFIX_logits.pt.
usage: torchrun --nproc_per_node=TP*EP mcore_moe_save.py NEMO_CONFIG.yaml DIST_DIR OUT_PREFIX
       [--init] [--ep EP] [--save DIR] [--logits TOKENS.pt]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import yaml  # noqa: E402

from mcore_family import logits_of, model_of  # noqa: E402  (also applies the CPU workarounds)
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("dist_dir")
    ap.add_argument("prefix")
    ap.add_argument("--init", action="store_true")
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--save")
    ap.add_argument("--logits")
    a = ap.parse_args()
    torch.distributed.init_process_group(backend="gloo")
    world = torch.distributed.get_world_size()
    tp = world // a.ep
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=a.ep)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    rank = torch.distributed.get_rank()
    c = yaml.safe_load(open(a.config).read())
    c["expert_model_parallel_size"] = a.ep
    torch.manual_seed(5 + rank)
    model = model_of(c, tp, c["padded_vocab"])
    if a.init:
        assert world == 1
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(0.1 * torch.randn_like(p))
        dist_checkpointing.save(model.sharded_state_dict(prefix="model."), a.dist_dir)
    else:
        loaded = dist_checkpointing.load(model.sharded_state_dict(prefix="model."), a.dist_dir)
        model.load_state_dict({k[len("model."):]: v for k, v in loaded.items()}, strict=True)
    sd = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save(sd, f"{a.prefix}_rank{rank}.pt")
    if a.save:
        if rank == 0:
            os.makedirs(a.save, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(model.sharded_state_dict(prefix="model."), a.save)
    if a.logits:
        logits = logits_of(model, torch.load(a.logits))
        if rank == 0:
            torch.save(logits.float(), f"{a.prefix}_logits.pt")
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
