#!/usr/bin/env bash
# The main job: set up .venv and train the tiny default on this machine's CPU (a few minutes), writing the
# pre-decay and post-decay checkpoints, metrics.jsonl and curves.png to runs/tiny. Run it again to resume (or to
# see that the run is finished); extra arguments go to `wsd-pretrain train`, e.g. --total-steps 60.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-deepspeed,plot} bash launch/setup.sh
exec .venv/bin/wsd-pretrain train --run-dir "${RUN_DIR:-runs/tiny}" "$@"
