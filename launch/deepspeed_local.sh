#!/usr/bin/env bash
# The tiny default under the DeepSpeed launcher on this machine: 2 CPU ranks, ZeRO-2 (gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
NPROC_PER_NODE=${NPROC_PER_NODE:-2} exec bash launch/deepspeed_multinode.sh --config configs/tiny_cpu_deepspeed.yaml \
    --run-dir "${RUN_DIR:-runs/tiny-deepspeed}" "$@"
