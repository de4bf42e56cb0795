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
# With the test extras (dev): Azurite, the Azure Blob emulator the az:// tests start on 127.0.0.1
# (tests/azure_helpers.py), into .cache/azurite (git-ignored; ~40 s and ~190 MB once, skipped when present).
# It is an npm package: without npm the az:// tests skip, saying so.
AZURITE_VERSION=${AZURITE_VERSION:-3.35.0}
if [[ ",${EXTRAS}," == *",dev,"* ]] && [ ! -x .cache/azurite/node_modules/.bin/azurite-blob ]; then
  if command -v npm >/dev/null 2>&1; then
    mkdir -p .cache/azurite
    npm install --prefix .cache/azurite --no-audit --no-fund --silent "azurite@${AZURITE_VERSION}" \
      || echo "setup: npm could not install Azurite; the az:// tests will skip" >&2
  else
    echo "setup: npm not found; Azurite (the az:// tests' emulator) is not installed and those tests will skip" >&2
  fi
fi
# With the test extras (dev) on a machine without CUDA, build DeepSpeed's CPU ops now (CPU Adam, FusedAdam's CPU
# kernel, the shared-memory communication op: about a minute each on 2 cores), once per environment, instead of
# inside the first tests that need each. They go where tests/conftest.py points DeepSpeed: a directory per
# environment. The tiny main job (launch/run_tiny.sh) runs DDP and needs none of them.
if [[ ",${EXTRAS}," == *",dev,"* ]] && .venv/bin/python -c "import deepspeed" >/dev/null 2>&1; then
  DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} .venv/bin/python - <<'PY' || echo "setup: DeepSpeed's CPU ops were not prebuilt; they build on first use" >&2
import os, sys
from pathlib import Path
import torch
if not torch.cuda.is_available():
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    from deepspeed.accelerator import get_accelerator
    for name in ("CPUAdamBuilder", "FusedAdamBuilder", "ShareMemCommBuilder"):
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)
PY
fi
