#!/usr/bin/env bash
# GPU acceptance check of the distill engine (issues 4 and 13). STATUS: prepared, NOT YET RUN on
# a GPU (the sessions that wrote it had none lent); record its output in docs/distill-engine.md
# when run.
#
# Two steps, because the GPU machine cannot install anything and has its own torch 2.11.0:
#   1. here (CPU box, repo venv):  scripts/gpu_check.sh build
#        builds tests/distill.rs with `--features cuda` against the venv's torch 2.11.0 and
#        copies the (debug-stripped) test binary to target/gpu-check/distill
#        (CUDA headers: NEMO_CUDA_INCLUDE=<dir with crt/ and nv/>, else
#        "cuda-toolkit[crt,cccl]==13.0.2" is pip-installed into target/cuda-hdrs)
#   2. there (repo copy + target/gpu-check):  scripts/gpu_check.sh run
#        runs the binary with that machine's torch libraries: CUDA fp32 logits of the mcore
#        fixture vs logits_tp1.pt (<= 1e-4), NCCL at world size 1 (all_reduce + every TP
#        mapping inside the forward), bf16 logits (<= 0.5) and a bf16 chunked KD backward;
#        prints the MFU peak the device's name gives. Then `nemo-tool distill` (built with
#        `--features cuda` too) on the fixture teacher over NCCL, fp32, 10 steps: TP1 on one GPU,
#        and with 2+ GPUs DP2, DP2 with the distributed optimizer, and TP1 x PP2, whose per-step
#        losses must equal the one-GPU run's within 1e-4 (GPU kernels are not bit-reproducible
#        across layouts). NCCL needs one GPU per rank: with one GPU the DP/PP runs are skipped
#        with a message.
#        Expected last line: "GPU CHECKS OK".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=target/gpu-check

# `nemo-tool distill` over NCCL at several layouts, each compared with the one-GPU run.
distill_runs() {
    local tool=$OUT/nemo-tool work=$OUT/distill-runs gpus
    [ -x "$tool" ] || { echo "$tool missing: run '$0 build' first" >&2; exit 1; }
    gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
    rm -rf "$work" && mkdir -p "$work"
    # 120 documents of ids in the fixture tokenizer's range, EOD 2
    awk 'BEGIN { for (d = 0; d < 120; d++) { n = 20 + (d * 37) % 60; t = (d * 13) % 97 + 3; s = "[";
        for (i = 0; i < n; i++) { t = (t * 7 + i % 4 + 1) % 97 + 3; s = s t "," } print s "2]" } }' \
        > "$work/docs.jsonl"
    "$tool" data make --input "$work/docs.jsonl" --output-prefix "$work/data" --vocab-size 100
    run() { # name world tp pp [overrides...]
        local name=$1 world=$2 tp=$3 pp=$4 port=$((29600 + RANDOM % 1000)) pids=() r
        shift 4
        for ((r = 0; r < world; r++)); do
            RANK=$r LOCAL_RANK=$r WORLD_SIZE=$world MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
                "$tool" distill \
                model.kd_teacher_restore_from_path=fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo \
                "model.data.data_prefix=[1.0,$work/data]" model.nemo_path="$work/$name.nemo" \
                exp_manager.explicit_log_dir="$work/$name" model.data.splits_string=90,10,0 \
                model.data.seq_length=32 model.num_layers=2 model.hidden_size=32 \
                model.ffn_hidden_size=64 model.num_attention_heads=4 model.num_query_groups=2 \
                model.make_vocab_size_divisible_by=32 model.global_batch_size=4 \
                model.micro_batch_size=1 trainer.max_steps=10 trainer.limit_val_batches=1 \
                trainer.precision=32 trainer.accelerator=gpu trainer.devices="$world" \
                model.tensor_model_parallel_size="$tp" model.pipeline_model_parallel_size="$pp" \
                "$@" > "$work/$name.rank$r.log" 2>&1 &
            pids+=($!)
        done
        for r in "${pids[@]}"; do wait "$r" || { cat "$work/$name".rank*.log; exit 1; }; done
        echo "$name: $(grep -h "\"kd_loss\"" "$work/$name/metrics.jsonl" | tail -1)"
    }
    run one 1 1 1
    if [ "$gpus" -lt 2 ]; then
        echo "DP/PP distill checks: skipped ($gpus GPU; NCCL needs one GPU per rank)"
        return
    fi
    run dp2 2 1 1
    run zero1 2 1 1 model.optim.name=distributed_fused_adam
    run pp2 2 1 2
    for name in dp2 zero1 pp2; do
        python3 - "$work/one/metrics.jsonl" "$work/$name/metrics.jsonl" "$name" <<'PY'
import json, sys
def losses(p):
    return [json.loads(l)["kd_loss"] for l in open(p) if '"kd_loss"' in l]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
worst = max(abs(x - y) for x, y in zip(a, b))
print(f"{sys.argv[3]} vs one GPU: {len(b)} steps, max loss diff {worst:.2e}")
assert len(a) == len(b) == 10 and worst <= 1e-4, (a, b)
PY
    done
}

case "${1:-}" in
build)
    PY=${PYTHON:-.venv/bin/python}
    LIBTORCH=$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__))')
    export LIBTORCH LIBTORCH_CXX11_ABI=1
    unset LIBTORCH_USE_PYTORCH
    mkdir -p "$OUT"
    if [ -z "${NEMO_CUDA_INCLUDE:-}" ]; then
        # cuda_runtime.h needs crt/ and nv/target, which torch's runtime deps lack
        HDRS=target/cuda-hdrs
        [ -d "$HDRS/nvidia/cu13/include/crt" ] ||
            "$PY" -m pip install -q --target "$HDRS" "cuda-toolkit[crt,cccl]==13.0.2"
        export NEMO_CUDA_INCLUDE=$PWD/$HDRS/nvidia/cu13/include
    fi
    exe=$(cargo test --features cuda --test distill --no-run --message-format=json 2>/dev/null |
        "$PY" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "distill" and m.get("executable"):
        print(m["executable"])' | tail -1)
    [ -n "$exe" ] || { echo "build failed: run cargo test --features cuda --test distill --no-run" >&2; exit 1; }
    objcopy --strip-debug "$exe" "$OUT/distill"
    cargo build --features cuda --bin nemo-tool
    objcopy --strip-debug "${CARGO_TARGET_DIR:-target}/debug/nemo-tool" "$OUT/nemo-tool"
    ls -l "$OUT/distill" "$OUT/nemo-tool"
    echo "glibc/glibcxx needed:"; objdump -T "$OUT/distill" | grep -oE 'GLIBC(XX)?_[0-9.]+' | sort -uV | awk -F_ '{m[$1]=$0} END {for (k in m) print m[k]}'
    ;;
run)
    [ -x "$OUT/distill" ] || { echo "$OUT/distill missing: run '$0 build' first" >&2; exit 1; }
    PY=${PYTHON:-python3}
    TORCH_LIB=$("$PY" -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')
    "$PY" -c 'import torch;print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
    { ldd --version 2>&1 || true; } | head -1 || true
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    NEMO_TOOL_ROOT=$PWD NEMO_DISTILL_WORKER=gpu RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 \
        MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29531} \
        "$OUT/distill" --exact worker_entry --nocapture --test-threads=1
    distill_runs
    echo "GPU CHECKS OK"
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
