"""Settings for the whole test session (and every process it starts, which inherits the environment)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# DeepSpeed JIT-builds its CPU communication op (deepspeed_shm_comm) into TORCH_EXTENSIONS_DIR, by default
# ~/.cache/torch_extensions, shared by every Python environment of the user. The build records its environment's
# include paths, so two checkouts with virtual environments of their own rebuild it in turn: about a minute each on
# 2 cores, while every DeepSpeed test of the other checkout waits on the build lock. A directory per environment
# builds it once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
