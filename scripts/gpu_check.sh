#!/usr/bin/env bash
# GPU acceptance check of the distill engine (issue 4). STATUS: prepared, NOT YET RUN on a GPU
# (the session that wrote it had none); record its output in docs/distill-engine.md when run.
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
#        prints the MFU peak the device's name gives.
#        Expected last line: "GPU CHECKS OK".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=target/gpu-check

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
    ls -l "$OUT/distill"
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
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
