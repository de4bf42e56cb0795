#!/usr/bin/env bash
# torchrun on one or several nodes, c10d rendezvous. Run the same command on every node:
#
#   NNODES=2 NPROC_PER_NODE=8 MASTER_ADDR=node0.cluster MASTER_PORT=29500 RUN_ID=llama1b \
#       bash launch/torchrun_multinode.sh --config configs/llama_1b_2x8.yaml --run-dir /shared/runs/llama1b
#
#   NNODES          nodes in the job (default 1)
#   NPROC_PER_NODE  processes per node, one per GPU (default: GPUs visible, else 1)
#   NODE_RANK       this node's rank; with c10d rendezvous it is assigned automatically, so it is optional
#                   (default: SLURM_NODEID, else 0)
#   MASTER_ADDR/PORT the rendezvous endpoint: a host every node reaches (default 127.0.0.1:29500)
#   RUN_ID          rendezvous id, the same on every node (default: wsd)
#   MAX_RESTARTS    elastic restarts after a worker failure; each restart resumes from the newest checkpoint
#
# On GPU clusters also export NCCL_SOCKET_IFNAME (the interface between nodes) and, for InfiniBand,
# NCCL_IB_HCA; the run directory must be on a filesystem every node sees (or set checkpoint.write_mode=rank0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() or 1)" 2>/dev/null || echo 1)
exec "$PY" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --nproc-per-node="${NPROC_PER_NODE:-$GPUS}" \
    --node-rank="${NODE_RANK:-${SLURM_NODEID:-0}}" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
    --rdzv-id="${RUN_ID:-wsd}" \
    --max-restarts="${MAX_RESTARTS:-0}" \
    -m wsd_pretrain.train "$@"
