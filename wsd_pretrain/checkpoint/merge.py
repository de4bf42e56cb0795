"""Checkpoint merging (WSM: Tian et al., "WSM: Decay-Free Learning Rate Schedule via Checkpoint Merging for LLM
Pre-training", arXiv 2507.17634): a weighted average of checkpoints' model weights, written as a Hugging Face folder.

``wsd-pretrain ckpt merge CKPT... --out DIR --coefficients uniform|ema|decay``. The checkpoints are ordered by
their trajectory position (the units trained into the model); ``c_0 .. c_k`` are the coefficients of the oldest to
the newest, summing to 1. The three rules (derivation in docs/schedules.md, "Decay-free WSD by merging"):

* ``uniform``: ``c_j = 1 / (k + 1)``.
* ``ema``: the exponential moving average ``m <- a m + (1 - a) theta_j`` started at the oldest checkpoint:
  ``c_0 = a^k``, ``c_j = (1 - a) a^(k - j)`` for ``j >= 1``.
* ``decay``: the merge that emulates a decay of a given shape over the window. With ``theta_j = theta_0 + sum of
  the updates up to p_j``, the merge is ``theta_0 + sum_j W_j U_j`` where ``U_j`` is the sum of the updates between
  ``p_(j-1)`` and ``p_j`` and ``W_j = c_j + ... + c_k``: each update is taken with weight ``W_j`` instead of 1. A decay
  over the ``D = p_k - p_0`` units of the window would have taken update ``i`` (1-based) at ``f(i / D)`` times the
  stable LR (``f`` the decay shape, read at the end of each update as the schedule's default ``progress="end"``,
  from :func:`wsd_pretrain.shapes.decay_factor`). So ``W_j`` is the mean of ``f(i / D)`` over the updates of segment
  ``j``, and ``c_j = W_j - W_(j+1)`` (``W_(k+1) = 0``), ``c_0 = 1 - W_1``. Above ``MAX_DECAY_POINTS`` units (token
  positions) the mean runs over that many evenly spaced points instead.

The merge streams: one output tensor at a time is accumulated in fp32 (``acc += c_j * theta_j`` from the oldest to
the newest; each checkpoint's tensor read through :class:`~.store.CheckpointStore`, any format and layout, full
checkpoints and model-only snapshots alike) and written straight into its shard by a streaming writer, so the
memory is about one fp32 tensor plus one input tensor. The output folder is staged and renamed into place; a
non-empty output, or an output inside an input, is refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..shapes import POSITIVE_FLOOR_SHAPES, canonical_decay_shape, decay_factor
from . import format as F
from .layout import Item, plan_save
from .safetensors_io import StreamingWriter, read_json, write_json
from .storage import ObjectURL, parse_location
from .store import CheckpointStore

__all__ = ["COEFFICIENTS", "MAX_DECAY_POINTS", "merge_checkpoints", "merge_coefficients", "snapshot_window"]

COEFFICIENTS = ("uniform", "ema", "decay")
MAX_DECAY_POINTS = 1_000_000
MERGE_INFO = "wsd_pretrain_merge.json"


def merge_coefficients(
    positions: Sequence[int],
    method: str,
    *,
    shape: str = "1-sqrt",
    min_lr_ratio: float = 0.0,
    ema_decay: float = 0.9,
) -> list[float]:
    """The merge coefficients of checkpoints at ``positions`` (oldest first; see the module docstring)."""
    k = len(positions) - 1
    if k < 0:
        raise CheckpointError("merge: no checkpoints given")
    if method not in COEFFICIENTS:
        raise CheckpointError(f"merge coefficients {method!r}: one of {', '.join(COEFFICIENTS)}")
    if method != "uniform" and any(b <= a for a, b in zip(positions, positions[1:])):
        raise CheckpointError(
            f"merge: {method} coefficients need checkpoints at increasing positions, oldest first, got "
            f"{list(positions)} (merge_checkpoints sorts them; for two checkpoints of the same position use "
            "--coefficients uniform, or leave one out)"
        )
    if method == "uniform":
        return [1.0 / (k + 1)] * (k + 1)
    if method == "ema":
        a = ema_decay
        if not (isinstance(a, (int, float)) and 0.0 <= a < 1.0):
            raise CheckpointError(f"merge: --ema-decay {a!r} must be in [0, 1)")
        return [a**k] + [(1.0 - a) * a ** (k - j) for j in range(1, k + 1)]
    name = canonical_decay_shape(shape) if isinstance(shape, str) else None
    if name is None:
        raise CheckpointError(f"merge: decay shape {shape!r}: one of 1-sqrt, linear, cosine, inverse, exponential")
    if not (isinstance(min_lr_ratio, (int, float)) and 0.0 <= min_lr_ratio <= 1.0):
        raise CheckpointError(f"merge: --min-lr-ratio {min_lr_ratio!r} must be in [0, 1]")
    if name in POSITIVE_FLOOR_SHAPES and min_lr_ratio <= 0:
        raise CheckpointError(f"merge: the {name} shape needs a floor above 0: give --min-lr-ratio (e.g. 0.01)")
    if k == 0:
        return [1.0]
    span = positions[-1] - positions[0]
    n = min(span, MAX_DECAY_POINTS)
    # segment j (1..k) holds the points i in (n * (p_(j-1) - p_0) / span, n * (p_j - p_0) / span]; with n == span,
    # exactly the updates between the two checkpoints
    bounds = [(p - positions[0]) * n // span for p in positions]
    means = []
    for j in range(1, k + 1):
        lo, hi = bounds[j - 1], bounds[j]
        if hi <= lo:
            raise CheckpointError(
                f"merge: positions {positions[j - 1]} and {positions[j]} are too close to weigh apart"
            )
        means.append(sum(decay_factor(name, i / n, min_lr_ratio) for i in range(lo + 1, hi + 1)) / (hi - lo))
    coeffs = [1.0 - means[0]]
    coeffs += [means[j] - means[j + 1] for j in range(k - 1)]
    coeffs.append(means[-1])
    return coeffs


def _position(manifest: dict[str, Any]) -> int:
    return int(manifest.get("trajectory_position", manifest["position"]))


def snapshot_window(run_dir: str | os.PathLike[str], last: int) -> list[Path]:
    """The newest ``last`` model-only snapshots of a run (``<run>/snapshots/``), oldest first."""
    infos = [i for i in F.list_snapshots(Path(run_dir)) if i.state == "complete"]
    if not infos:
        raise CheckpointError(
            f"{run_dir}: no snapshots (set checkpoint.snapshot_every in the job config to write them during the "
            "stable phase)"
        )
    if last > len(infos):
        raise CheckpointError(f"{run_dir}: --last {last} asked, the run has {len(infos)} snapshot(s)")
    return [i.path for i in infos[-last:]]


def _remote_resolve(target: ObjectURL) -> ObjectURL:
    from .objstore import resolve

    return resolve(target)


def _remote_manifest(ckpt: ObjectURL) -> dict[str, Any]:
    from .objstore import load_manifest
    from .storage import store_for

    return load_manifest(store_for(ckpt), ckpt)[0]


def _open_store(ckpt: Path | ObjectURL, manifest: dict[str, Any]) -> CheckpointStore:
    if isinstance(ckpt, ObjectURL):
        from .objread import RemoteCheckpoint, RemoteStore

        return RemoteStore(RemoteCheckpoint(ckpt, manifest), Path(str(ckpt)))
    return CheckpointStore(ckpt, manifest)


def _read(store: CheckpointStore, group: str, name: str) -> torch.Tensor:
    """One whole tensor. From a checkpoint on object storage: the byte ranges it covers fetched first with
    ranged GETs of 8 to 64 MiB, 8 in flight (:meth:`.objread.RemoteCheckpoint.prefetch`), instead of one GET
    of the whole tensor; only this tensor's bytes are held."""
    source = getattr(store, "source", None)
    if source is None:
        return store.read(group, name)
    needs = store.record(lambda: store.read(group, name))  # type: ignore[attr-defined]
    kept, problems = source.prefetch(needs, [], 1 << 62)
    if problems:
        raise CheckpointError(f"merge: {source.url}: " + "; ".join(problems))
    store.keep(kept)  # type: ignore[attr-defined]
    return store.read(group, name)


def _check_output(out: Path, inputs: Sequence[Path]) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not empty: give a new output folder")
    real = out.resolve()
    for src in inputs:
        s = src.resolve()
        if real == s or s in real.parents:
            raise CheckpointError(f"{out} is inside the input checkpoint {src}: give an output folder outside it")
    probe = real.parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise CheckpointError(f"{out}: {probe} is not writable: give an output folder on a writable filesystem")


def merge_checkpoints(
    ckpts: Sequence[str | os.PathLike[str] | ObjectURL],
    out: str | os.PathLike[str],
    *,
    coefficients: str | Sequence[float] = "uniform",
    shape: str = "1-sqrt",
    min_lr_ratio: float = 0.0,
    ema_decay: float = 0.9,
    source: str = "model",
    dtype: str | None = None,
    max_shard_size: int = 5 * 10**9,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Merge checkpoints' weights into the Hugging Face folder ``out`` (see the module docstring).

    ``ckpts``: checkpoint folders (full checkpoints or snapshots, format 1 or 2) or run directories (their newest
    checkpoint), local or on object storage (``s3://``/``az://``: read in place by ranged GETs, one tensor at a
    time). ``coefficients``: "uniform", "ema", "decay", or explicit numbers (oldest first, summing to 1).
    ``source``: "model" (the model's weights) or "master" (the fp32 master weights where a checkpoint has them, its
    model weights elsewhere). ``dtype``: the output's (default: the newest checkpoint's model dtype per tensor).
    Returns ``out``.
    """
    from .tools import _atomic_output, _dtype, write_hf_index

    if source not in ("model", "master"):
        raise CheckpointError(f"merge: source={source!r}: 'model' or 'master'")
    if not ckpts:
        raise CheckpointError("merge: give at least one checkpoint")
    # a checkpoint on object storage (an ObjectURL) is read in place: its manifest validated, its tensors fetched
    # by ranged GETs (objread.RemoteStore), its JSON files checked against their manifest checksums
    ckpts = [parse_location(c) if isinstance(c, str) else c for c in ckpts]
    paths: list[Any] = [_remote_resolve(c) if isinstance(c, ObjectURL) else F.resolve_checkpoint(c) for c in ckpts]
    if len({str(p) if isinstance(p, ObjectURL) else p.resolve() for p in paths}) != len(paths):
        raise CheckpointError("merge: a checkpoint is given twice")
    out = Path(out)
    _check_output(out, [p for p in paths if not isinstance(p, ObjectURL)])
    target = _dtype(dtype)
    manifests = [_remote_manifest(p) if isinstance(p, ObjectURL) else F.load_manifest(p) for p in paths]
    order = sorted(range(len(paths)), key=lambda i: _position(manifests[i]))
    paths, manifests = [paths[i] for i in order], [manifests[i] for i in order]
    positions = [_position(m) for m in manifests]
    if isinstance(coefficients, str):
        method = coefficients
        coeffs = merge_coefficients(
            positions, coefficients, shape=shape, min_lr_ratio=min_lr_ratio, ema_decay=ema_decay
        )
    else:
        method = "explicit"
        coeffs = [float(c) for c in coefficients]
        if len(coeffs) != len(paths):
            raise CheckpointError(f"merge: {len(coeffs)} coefficients for {len(paths)} checkpoints")
        if not all(math.isfinite(c) for c in coeffs) or abs(sum(coeffs) - 1.0) > 1e-6:
            raise CheckpointError(f"merge: coefficients {coeffs} must be finite numbers summing to 1")
    stores = [_open_store(p, m) for p, m in zip(paths, manifests)]
    try:
        names = stores[-1].names("model")

        def group_of(store: CheckpointStore, name: str) -> str:
            return "master" if source == "master" and store.has("master", name) else "model"

        specs = []
        for name in names:
            e = stores[-1].entry("model", name)
            for p, store in zip(paths, stores):
                if not store.has("model", name):
                    raise CheckpointError(
                        f"merge: {p} has no model tensor {name!r}: the checkpoints are of other models"
                    )
                other = store.entry(group_of(store, name), name)
                if other.shape != e.shape:
                    raise CheckpointError(
                        f"merge: {name!r} is {list(other.shape)} in {p}, {list(e.shape)} in {paths[-1]}: the "
                        "checkpoints are of other models"
                    )
            for p, store in zip(paths, stores):
                extra = set(store.names("model")) - set(names)
                if extra:
                    raise CheckpointError(
                        f"merge: {p} has model tensors {sorted(extra)[:3]} that {paths[-1]} lacks: the checkpoints are "
                        "of other models"
                    )
            specs.append(Item("model", name, e.shape, target or e.dtype))

        def merged(name: str) -> torch.Tensor:
            acc: torch.Tensor | None = None
            for c, store in zip(coeffs, stores):
                t = _read(store, group_of(store, name), name)
                if acc is None:
                    acc = torch.zeros(t.shape, dtype=torch.float32)
                acc.add_(t.to(torch.float32), alpha=c)
                del t
            assert acc is not None
            return acc

        newest = paths[-1]
        if isinstance(newest, ObjectURL):
            has_config = "config.json" in manifests[-1]["files"]
            config = stores[-1].source.json("config.json", "model config") if has_config else None  # type: ignore[attr-defined]
        else:
            config = (
                read_json(F.safe_path(newest, "config.json", "model config"))
                if (newest / "config.json").exists()
                else None
            )
        if config is not None and not isinstance(config, dict):
            raise CheckpointError(f"{newest / 'config.json'}: not a JSON object (a Hugging Face config is one)")
        if config is not None and target is not None:
            config = {**config, "torch_dtype": str(target).removeprefix("torch.")}
        with _atomic_output(out) as staging:
            shards = plan_save(specs, 1, max_shard_size).model_shards
            for shard in shards:
                writer = StreamingWriter(staging / shard.relpath, [(i.name, i.dtype, i.shape) for i in shard.items])
                try:
                    for item in shard.items:
                        writer.add(item.name, merged(item.name).to(item.dtype))  # one tensor in memory at a time
                        if progress:
                            progress(1)
                    writer.close()
                except BaseException:
                    writer.sync()
                    raise
            write_hf_index(staging, shards, config)
            write_json(
                staging / MERGE_INFO,
                {
                    "format": "wsd_pretrain.merge",
                    "coefficients": method,
                    "shape": canonical_decay_shape(shape) if method == "decay" else None,
                    "min_lr_ratio": min_lr_ratio if method == "decay" else None,
                    "ema_decay": ema_decay if method == "ema" else None,
                    "source": source,
                    "inputs": [
                        {"path": str(p), "name": m["name"], "position": pos, "coefficient": c}
                        for p, m, pos, c in zip(paths, manifests, positions, coeffs)
                    ],
                },
            )
    finally:
        for store in stores:
            store.close()
    return out
