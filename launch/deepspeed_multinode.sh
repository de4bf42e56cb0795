#!/usr/bin/env bash
# The DeepSpeed launcher, two ways.
#
# 1. ssh mode (one command, on the first node): a hostfile lists "hostname slots=8" per node.
#       HOSTFILE=hostfile MASTER_ADDR=node0 bash launch/deepspeed_multinode.sh --config configs/llama_1b_2x8.yaml
# 2. no ssh (run on every node, e.g. by a scheduler): NO_SSH=1 with NODE_RANK and NNODES set per node.
#       NO_SSH=1 NNODES=2 NODE_RANK=$i MASTER_ADDR=node0 bash launch/deepspeed_multinode.sh --config ...
#
#   NPROC_PER_NODE  processes per node (default: GPUs visible, else 1); on CPU set DS_ACCELERATOR=cpu
#   MASTER_ADDR/MASTER_PORT  rank 0's node and a free port (default 127.0.0.1:29500)
set -euo pipefail
cd "$(dirname "$0")/.."
DS=${DEEPSPEED:-.venv/bin/deepspeed}
PY=${PYTHON:-.venv/bin/python}
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() or 1)" 2>/dev/null || echo 1)
ARGS=(--master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" --no_local_rank --module)
if [ -n "${NO_SSH:-}" ]; then
    ARGS+=(--no_ssh --num_nodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --num_gpus "${NPROC_PER_NODE:-$GPUS}")
elif [ -n "${HOSTFILE:-}" ]; then
    ARGS+=(--hostfile "$HOSTFILE")
else
    ARGS+=(--num_gpus "${NPROC_PER_NODE:-$GPUS}")
fi
exec "$DS" "${ARGS[@]}" wsd_pretrain.train "$@"
