#!/usr/bin/env bash
# Launch a multi-node recipe (configs/llama_70b_tp8.yaml, configs/llama_405b_3d.yaml, ...) with one of three
# launchers, after checking on this machine that the config's parallel: layout is the job's world size
# (NNODES x NPROC_PER_NODE): a wrong product is refused here, by the same validation every rank runs, before any
# node is allocated.
#
#   LAUNCHER=slurm    NNODES=32 bash launch/recipe.sh configs/llama_70b_tp8.yaml --run-dir /shared/runs/llama70b
#       submits launch/slurm.sbatch with --nodes=NNODES --ntasks-per-node=NPROC_PER_NODE (one task per GPU)
#   LAUNCHER=torchrun NNODES=32 MASTER_ADDR=node0 RUN_ID=llama70b bash launch/recipe.sh configs/... --run-dir ...
#       run on every node: launch/torchrun_multinode.sh (c10d rendezvous)
#   LAUNCHER=deepspeed NNODES=32 HOSTFILE=hostfile MASTER_ADDR=node0 bash launch/recipe.sh configs/... --run-dir ...
#       the DeepSpeed launcher (ssh to every host of the hostfile; NO_SSH=1 NODE_RANK=i to run per node instead):
#       it only starts the processes, the config's train.engine (fsdp2) trains
#
#   NPROC_PER_NODE  GPUs per node (default 8)
# Extra arguments go to wsd-pretrain train (key.sub=value overrides included).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/recipe.sh CONFIG [train arguments]}
shift
PY=${PYTHON:-.venv/bin/python}
NNODES=${NNODES:?set NNODES}
NPROC=${NPROC_PER_NODE:-8}
WORLD=$((NNODES * NPROC))
# the layout against this world size (and every other check of the config), as rank 0 will run it
WORLD_SIZE=$WORLD "$PY" -m wsd_pretrain.train --config "$CONFIG" --dry-run "$@" >/dev/null
case "${LAUNCHER:-slurm}" in
    slurm)
        exec sbatch --nodes="$NNODES" --ntasks-per-node="$NPROC" --job-name="$(basename "$CONFIG" .yaml)" \
            launch/slurm.sbatch --config "$CONFIG" "$@" ;;
    torchrun)
        NPROC_PER_NODE=$NPROC exec bash launch/torchrun_multinode.sh --config "$CONFIG" "$@" ;;
    deepspeed)
        NPROC_PER_NODE=$NPROC exec bash launch/deepspeed_multinode.sh --config "$CONFIG" "$@" ;;
    *)
        echo "LAUNCHER=${LAUNCHER}: slurm, torchrun or deepspeed" >&2
        exit 2 ;;
esac
