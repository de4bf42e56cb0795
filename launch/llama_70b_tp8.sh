#!/usr/bin/env bash
# Llama 3 70B's shape, TP 8 x FSDP2 32 on 32 nodes of 8 GPUs (configs/llama_70b_tp8.yaml).
#   bash launch/llama_70b_tp8.sh --run-dir /shared/runs/llama70b                       # SLURM (sbatch)
#   LAUNCHER=torchrun MASTER_ADDR=node0 RUN_ID=llama70b bash launch/llama_70b_tp8.sh --run-dir ...   # every node
#   LAUNCHER=deepspeed HOSTFILE=hostfile MASTER_ADDR=node0 bash launch/llama_70b_tp8.sh --run-dir ...
set -euo pipefail
NNODES=${NNODES:-32} exec bash "$(dirname "$0")/recipe.sh" configs/llama_70b_tp8.yaml "$@"
