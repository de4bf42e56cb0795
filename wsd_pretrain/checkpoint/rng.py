"""Every random stream of a rank as plain JSON (no pickles): python's ``random``, numpy's global generator, torch's
CPU generator and, when present, each CUDA device's."""

from __future__ import annotations

import base64
import random
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["capture_rng", "restore_rng", "seed_everything"]


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.contiguous().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as a JSON-ready dict."""
    version, keys, gauss_next = random.getstate()
    state: dict[str, Any] = {"python": {"version": version, "state": list(keys), "gauss_next": gauss_next}}
    try:
        import numpy as np

        kind, key, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "kind": kind,
            "key": key.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    except ImportError:
        pass
    state["torch"] = _b64(torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` captured; a malformed state raises CheckpointError."""
    try:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        if "numpy" in state:
            import numpy as np

            n = state["numpy"]
            np.random.set_state(
                (n["kind"], np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
            )
        torch.set_rng_state(_unb64(state["torch"]))
        if "cuda" in state and torch.cuda.is_available():
            saved = [_unb64(s) for s in state["cuda"]]
            if len(saved) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(saved)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"RNG state is malformed: {exc}") from None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    torch.manual_seed(seed)
