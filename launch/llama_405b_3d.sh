#!/usr/bin/env bash
# Llama 3 405B's shape, TP 8 x PP 16 x FSDP2 128 on 2,048 nodes of 8 GPUs (configs/llama_405b_3d.yaml).
#   bash launch/llama_405b_3d.sh --run-dir /shared/runs/llama405b                      # SLURM (sbatch)
#   LAUNCHER=torchrun MASTER_ADDR=node0 RUN_ID=llama405b bash launch/llama_405b_3d.sh --run-dir ...  # every node
#   LAUNCHER=deepspeed HOSTFILE=hostfile MASTER_ADDR=node0 bash launch/llama_405b_3d.sh --run-dir ...
set -euo pipefail
NNODES=${NNODES:-2048} exec bash "$(dirname "$0")/recipe.sh" configs/llama_405b_3d.yaml "$@"
