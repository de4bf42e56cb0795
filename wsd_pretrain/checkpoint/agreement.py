"""The ranks agree on one plan: each describes what it holds; a digest of it, not the list, crosses the collective.

:func:`~.layout.plan_save` computes the same plan on every rank without communication, which is only right when
every rank's adapter describes the same training state: the same items (group, name, global shape, dtype) with the
same partition. A job whose ranks hold different things breaks that silently: pipeline-parallel stages (each rank
its own layers under the whole model's names, torchtitan-style) made a checkpoint of stage 0 alone; stages
renumbered from 0 on every rank (the same names and shapes, different values) mixed the stages' weights and
optimizer state. So when the manager is built (and again when each save is planned, for the structure) every rank:

1. **describes** what it holds: the adapter's items (which also refuses any layout the adapter does not
   understand, such as a Partial DTensor placement) and a fingerprint of the values of every parameter the adapter
   calls replicated (written once, by one rank, so every rank must hold the same bytes: DDP and DeepSpeed broadcast
   rank 0's parameters when they are built);
2. **agrees**: one all-reduce (max) of a flag and two fixed-size digests with their negations on the checkpoint's
   gloo group (17 integers, 136 bytes per rank, at any world size and model size): the maximum and the minimum of
   every digest word are equal exactly when every rank holds the same description;
3. only when some rank failed or the digests differ, learns why (every rank's error and digests, then the
   description of one rank of each distinct kind, at most :data:`SHOWN` kinds) and raises the same
   :class:`~wsd_pretrain.errors.CheckpointError` on every rank, naming what differs and the fix. No rank is left
   waiting: a rank whose description failed still takes part in every collective of the agreement.

**Pipeline stages** (:mod:`.pipeline`, the manager's ``pipeline=``) hold different tensors on purpose: before
describing, the stages' descriptions are exchanged inside each pipeline group (one all-gather there: about the
whole model's description per rank, whatever the world size) and every rank describes the union; the digest
all-reduce above then checks that every pipeline group (one per data-/tensor-parallel coordinate) built the same
union with the same replicated values. Without ``pipeline=`` such a job is refused here, naming that fix.

Cost at build: one pass over the local replicated parameters on their own device (exact sums of their bits, see
:func:`fingerprints`; to the host go 16 bytes per chunk of 2-8 MB), and hashing the items' descriptions (kilobytes).
FSDP2 and ZeRO-3 hold no replicated parameters; DDP and ZeRO-0/1/2 pay about 17 bytes of memory traffic per byte
of weights (a second or so for 140 GB at an H200's bandwidth; 0.2-0.4 GB/s on one core of the 2-core test VM).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import distributed as D
from ..errors import CheckpointError
from . import coord
from .layout import Item

__all__ = ["Description", "agree_on_items", "agree_on_plan", "describe", "fingerprints"]

WORDS = 4
"""31-bit words per digest (124 bits)."""
SHOWN = 4
"""Distinct descriptions whose details a failed agreement fetches (one broadcast each)."""
_CHUNK = 1 << 20
"""16-bit words per chunk of a fingerprint on a CPU (the float64 buffer stays in cache)."""
_CHUNK_DEVICE = 1 << 22
"""On an accelerator: fewer kernel launches (about 17,000 for a 140 GB replica), 96 MB of scratch."""

PIPELINE_FIX = (
    "the checkpoint holds one model that every rank describes alike (data parallelism: DDP, FSDP2, DeepSpeed ZeRO "
    "0-3); pipeline-parallel stages (each rank its own layers) are saved as one model when the manager is told: "
    "CheckpointManager(..., pipeline=Pipeline(group=mesh['pp'])) on every rank, with a name map "
    "(Pipeline(names=...)) for stages renumbered from 0 (docs/manager.md, 'Pipeline parallelism')"
)
REPLICA_FIX = (
    "the checkpoint writes a replicated parameter once, from one rank, so every rank must hold the same values. "
    "Data-parallel replicas: wrap the model in DDP (it broadcasts rank 0's parameters when built) or seed every rank "
    "alike before building the model, then build the manager. Pipeline stages named from 0 on every rank: "
    + PIPELINE_FIX.split("; ", 1)[1]
)


@dataclass(frozen=True)
class Description:
    """What one rank holds: every item as ``[group, name, shape, dtype, placement]`` and the value fingerprint of
    every replicated parameter (``{name: hex}``), in plain JSON."""

    items: list[list[Any]]
    values: dict[str, str]

    def structure_digest(self) -> list[int]:
        return _digest(self.items)

    def values_digest(self) -> list[int]:
        return _digest(sorted(self.values.items()))


def _digest(obj: Any) -> list[int]:
    raw = hashlib.blake2b(json.dumps(obj, separators=(",", ":")).encode(), digest_size=16).digest()
    return [int.from_bytes(raw[4 * i : 4 * i + 4], "little") & 0x7FFFFFFF for i in range(WORDS)]


def item_rows(items: list[Item]) -> list[list[Any]]:
    """The items as plain JSON rows: what must be identical on every rank for the plan to be one."""
    rows = []
    for it in items:
        placement = "replicated" if it.partition.replicated else it.partition.to_json()
        rows.append([it.group, it.name, list(it.shape), str(it.dtype).removeprefix("torch."), placement])
    return rows


def describe(adapter: Any, *, values: bool = True) -> Description:
    """This rank's description (local: no communication). Raises what the adapter raises for a layout it does not
    understand."""
    items = adapter.items()
    prints: dict[str, str] = {}
    union_values = getattr(adapter, "values_description", None)  # pipeline stages: the union's (pipeline.py)
    if values and union_values is not None:
        prints = union_values()
    elif values:
        params = set(adapter.param_names)
        replicated = [it for it in items if it.group == "model" and it.name in params and it.partition.replicated]
        prints = fingerprints({it.name: adapter.local(it) for it in replicated})
    return Description(item_rows(items), prints)


def fingerprints(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """A value fingerprint of each tensor, exact: equal bytes give equal fingerprints on any device, in any reduction
    order. The tensor's bits, read as 16-bit integers, are cut into chunks of :data:`_CHUNK` (:data:`_CHUNK_DEVICE`
    on an accelerator); each chunk gives its sum and its position-weighted sum (weights 1-1024: the top 10 bits of
    Knuth's multiplicative hash of the position, so no short period), computed in float64 as one matrix-vector
    product on the tensor's own device: every partial sum is an integer below 2**47, so float64 holds it exactly whatever the
    order (integer reductions would be exact too, but torch's run 20-100 times slower on a CPU). The chunks' sums,
    in order, go to the host in one transfer per device and are hashed there."""
    names, sums = [], []
    scratch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, t in tensors.items():
        if t.is_meta:
            continue  # nothing to compare (a model not materialised yet)
        names.append(name)
        sums.append(_chunk_sums(t.detach(), scratch))
    by_device: dict[torch.device, list[int]] = {}
    for i, c in enumerate(sums):
        by_device.setdefault(c.device, []).append(i)
    host: list[bytes] = [b""] * len(sums)
    for idx in by_device.values():  # one transfer per device
        flat = torch.cat([sums[i].reshape(-1) for i in idx]).cpu().numpy()
        pos = 0
        for i in idx:
            n = sums[i].numel()
            host[i] = flat[pos : pos + n].tobytes()
            pos += n
    return {n: hashlib.blake2b(b, digest_size=16).hexdigest() for n, b in zip(names, host)}


def _chunk_sums(t: torch.Tensor, scratch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``[chunks, 2]`` float64 on the tensor's device: each chunk's sum and weighted sum of its 16-bit words."""
    flat = t.reshape(-1)
    if flat.dtype.is_complex:
        flat = torch.view_as_real(flat).reshape(-1)
    words = flat.view(torch.int16) if flat.element_size() >= 2 else flat.view(torch.uint8)
    n = words.numel()
    chunk = _CHUNK if words.device.type == "cpu" else _CHUNK_DEVICE  # partial sums below 2**15 * 2**10 * chunk
    out = torch.zeros(max(1, math.ceil(n / chunk)), 2, dtype=torch.float64, device=words.device)
    if n == 0:
        return out
    size = min(n, chunk)
    have = scratch.get(words.device)
    if have is None or have[1].numel() < size:  # [ones; weights] and a float64 buffer, reused within one call
        i = torch.arange(size, dtype=torch.int64)
        weights = torch.stack([torch.ones(size, dtype=torch.float64), ((i * 2654435761) % 2**32 // 2**22 + 1).double()])
        scratch[words.device] = have = (
            weights.to(words.device),
            torch.empty(size, dtype=torch.float64, device=words.device),
        )
    weights, buf = have
    for k, start in enumerate(range(0, n, chunk)):
        part = words[start : start + chunk]
        m = part.numel()
        b = buf[:m]
        b.copy_(part)
        torch.mv(weights[:, :m], b, out=out[k])
    return out


# ---------------------------------------------------------------------------------------------- agreeing


def agree_on_plan(build: Callable[[], Any], what: str, *, exchange: bool = False) -> Any:
    """``build()`` makes this rank's adapter (and may refuse the engine); every rank then describes what it holds
    (structure and replicated values) and all agree, or every rank raises the same error naming what differs and
    the fix. Returns the adapter. The manager calls this when it is built: a rank that fails alone, in ``build`` or
    in describing, makes every rank raise instead of leaving the others waiting in a later collective.

    ``exchange`` (pipeline stages, every rank alike): once every rank has built its adapter (one agreement), the
    stages' descriptions are exchanged inside each pipeline group (:meth:`.pipeline.PipelineAdapter.exchange`) and
    the union is what every rank describes."""
    adapter, desc, error = None, None, None
    try:
        adapter = build()
    except Exception as exc:
        error = _message(exc)
    if exchange:
        coord.agree(error, what)  # a rank that could not build would leave the others in the exchange
        error = adapter.exchange()
    if error is None:
        try:
            desc = describe(adapter)
        except Exception as exc:
            error = _message(exc)
    _agree(desc, error, what)
    return adapter


def agree_on_items(items: list[Item] | None, error: str | None, what: str) -> None:
    """A save's plan phase: every rank planned from the same items, or every rank raises (structure only: the
    values have changed since the manager was built, identically on every replica)."""
    _agree(Description(item_rows(items), {}) if items is not None and error is None else None, error, what)


def _message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"


def _agree(desc: Description | None, error: str | None, what: str) -> None:
    if not D.is_distributed():
        if error:
            raise CheckpointError(f"{what}: {error}")
        return
    s = desc.structure_digest() if desc is not None else [0] * WORDS
    v = desc.values_digest() if desc is not None else [0] * WORDS
    flag = 1 if error or desc is None else 0
    got = coord.all_reduce_max([flag, *s, *(-x for x in s), *v, *(-x for x in v)])
    hi_s, lo_s = got[1 : 1 + WORDS], [-x for x in got[1 + WORDS : 1 + 2 * WORDS]]
    hi_v, lo_v = got[1 + 2 * WORDS : 1 + 3 * WORDS], [-x for x in got[1 + 3 * WORDS :]]
    if not got[0] and hi_s == lo_s and hi_v == lo_v:
        return
    raise CheckpointError(f"{what}: {_explain(desc, error, s, v)}")


def _explain(desc: Description | None, error: str | None, s: list[int], v: list[int]) -> str:
    """Why the agreement failed, the same text on every rank (every rank takes part in each collective here)."""
    group = coord.groups().coord
    reports = D.all_gather_object({"error": error, "s": s, "v": v}, group=group)
    if any(r["error"] for r in reports):
        return coord.describe_errors([r["error"] for r in reports])
    key = "s" if len({tuple(r["s"]) for r in reports}) > 1 else "v"
    kinds: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(reports):
        kinds.setdefault(tuple(r[key]), []).append(i)
    shown = list(kinds.values())[:SHOWN]
    details = []
    rank = D.get_rank()
    for ranks in shown:  # one description per distinct kind, from its first rank (JSON both ways: the same values)
        mine = json.loads(json.dumps(desc.items if key == "s" else desc.values)) if rank == ranks[0] else None
        details.append(coord.broadcast(mine, src=ranks[0]))
    more = f" ({len(kinds) - SHOWN} more kinds of rank not shown)" if len(kinds) > SHOWN else ""
    if key == "s":
        return _structure_text(shown, details) + more
    return _values_text(shown, details) + more


def _spans(ranks: list[int]) -> str:
    """``ranks 0-3, 8`` / ``rank 5``: consecutive ranks as one span."""
    spans, start = [], ranks[0]
    for prev, cur in zip(ranks, [*ranks[1:], -1]):
        if cur != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(spans)


def _verb(ranks: list[int]) -> str:
    return "holds" if len(ranks) == 1 else "hold"


def _do(ranks: list[int]) -> str:
    return "does" if len(ranks) == 1 else "do"


def _names(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _structure_text(kinds: list[list[int]], details: list[list[list[Any]]]) -> str:
    base = {(row[0], row[1]): row for row in details[0]}
    parts = []
    for ranks, rows in zip(kinds[1:], details[1:]):
        other = {(row[0], row[1]): row for row in rows}
        # parameters first: a difference in optimizer state follows from one in the parameters
        for group in ("model", "master", "optimizer"):
            only_a = [n for g, n in base if g == group and (g, n) not in other]
            only_b = [n for g, n in other if g == group and (g, n) not in base]
            changed = [
                f"{n}: {base[(g, n)][2:]} vs {other[(g, n)][2:]}"
                for g, n in base
                if g == group and (g, n) in other and base[(g, n)] != other[(g, n)]
            ]
            if only_a or only_b or changed:
                break
        a, b = _spans(kinds[0]), _spans(ranks)
        bits = []
        if only_a:
            bits.append(f"{a} {_verb(kinds[0])} {group} tensors that {b} {_do(ranks)} not: {_names(only_a)}")
        if only_b:
            bits.append(f"{b} {_verb(ranks)} {group} tensors that {a} {_do(kinds[0])} not: {_names(only_b)}")
        if changed:
            bits.append(
                f"{group} tensors whose [shape, dtype, placement] differ between {a} and {b}: {_names(changed, 3)}"
            )
        if not bits:
            bits.append(f"{a} and {b} list the same tensors in a different order")
        parts.append("; ".join(bits))
    return (
        "the ranks hold different training states, and no partition the checkpoint understands explains it: "
        + "; ".join(parts)
        + ". "
        + PIPELINE_FIX
    )


def _values_text(kinds: list[list[int]], details: list[dict[str, str]]) -> str:
    base = details[0]
    parts = []
    for ranks, other in zip(kinds[1:], details[1:]):
        differ = [n for n in base if other.get(n) != base[n]]
        parts.append(f"{_spans(kinds[0])} and {_spans(ranks)} hold different values of {_names(differ)}")
    return (
        "parameters the checkpoint holds as replicated (the same names and shapes on every rank, no partition) have "
        "different values on different ranks: " + "; ".join(parts) + ". " + REPLICA_FIX
    )
