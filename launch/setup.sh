#!/usr/bin/env bash
# Create .venv in the repository and install wsd_pretrain into it (idempotent: a second run is quick).
#
#   EXTRAS=dev   (default) everything the tests need; "deepspeed,plot" for training only
#   PYTHON=python3.11    the interpreter to build the venv with
#   TORCH_SPEC="torch==2.13.0"   installed first when the venv has no torch; a user who already has torch keeps it.
#                        On a CUDA cluster set TORCH_SPEC/PIP_INDEX_URL to the build you want before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # torch first and pinned: letting another package pull "torch" could fetch a multi-GB CUDA build
  "${PIP[@]}" install "$TORCH_SPEC"
fi
"${PIP[@]}" install -e ".[${EXTRAS}]"
