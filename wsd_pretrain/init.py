"""Layout-independent initial weights: every element of a parameter is a function of (the run's seed, the
parameter's name, the element's index in the full tensor), computed where it lives.

A sequential generator (``torch.manual_seed`` then ``normal_`` over the whole model) gives a rank's shard only by
drawing everything before it: at 405B every rank would generate the whole model to keep its 1/16,384th. Here each
element is drawn from a counter-based generator instead (Philox4x32-10, Salmon et al. 2011, the generator of
cuRAND and JAX; key = a hash of the seed and the name, counter = the element's linear index in the full tensor),
so a rank fills the box of each tensor it holds (its TP shard, its FSDP2 rows, its pipeline stage's layers) and
nothing else, and the values are the same bits on every layout: one process, DDP, FSDP2, TP, PP, any degree.

Bitwise across layouts and devices needs every step to be exactly rounded IEEE arithmetic: torch's ``log`` and
``cos`` are not (on CPU a vectorised loop body and its scalar tail use different implementations, so an element's
bits could depend on where it falls in a shard). The normal draw is Box-Muller with ``log`` and ``cos`` written as
float64 polynomials of ``+ - * /`` and ``sqrt`` (all correctly rounded, in torch's scalar, vector and CUDA kernels
alike), and the integer hash is int64 arithmetic kept below 2**63 (32-bit products split in 16-bit halves).
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["fill_box_", "init_tensor_", "philox4x32", "standard_normal_box", "tensor_key"]

_M32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_CHUNK = {"cpu": 1 << 15, "cuda": 1 << 22}
"""Elements drawn per pass: 32K on CPU (the temporaries stay in cache: 3x faster than 1M), 4M on a GPU (a few
hundred MB of int64/float64 temporaries, few kernel launches); either bounds the temporaries whatever the shard's
size, and the values do not depend on it."""


def tensor_key(seed: int, name: str) -> tuple[int, int]:
    """The Philox key of one parameter: 64 bits of SHA-256 over the seed and the name (the full model's name, the
    same on every layout)."""
    digest = hashlib.sha256(f"wsd_pretrain-init\0{int(seed)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``a * m`` for 32-bit ``a`` (int64 tensor) and a 32-bit constant, without int64
    overflow: ``m`` is split in 16-bit halves, each partial product stays below 2**48."""
    p1 = a * (m & 0xFFFF)
    p2 = a * (m >> 16)
    s = p1 + ((p2 & 0xFFFF) << 16)
    return (p2 >> 16) + (s >> 32), s & _M32


def philox4x32(counter: Sequence[torch.Tensor], key: tuple[int, int], rounds: int = 10) -> list[torch.Tensor]:
    """Philox4x32-``rounds`` of a counter of four 32-bit words (int64 tensors holding values below 2**32) under a
    64-bit key: four 32-bit words of output, elementwise (the Random123 reference; known-answer tested)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _M32, (k1 + _PHILOX_W[1]) & _M32
        hi0, lo0 = _mulhilo(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


_LN2 = 0.6931471805599453
_TWO_PI = 6.283185307179586


def _log_unit(u: torch.Tensor) -> torch.Tensor:
    """ln(u) for float64 ``u`` in (0, 1], from the exponent bits and an atanh series of the mantissa."""
    bits = u.view(torch.int64)
    e = ((bits >> 52) & 0x7FF) - 1023
    m = ((bits & ((1 << 52) - 1)) | (1023 << 52)).view(torch.float64)  # [1, 2)
    big = m > math.sqrt(2.0)  # move m to [sqrt(1/2), sqrt(2)): |s| < 0.172
    m = torch.where(big, m * 0.5, m)
    e = e + big.to(torch.int64)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    acc = torch.full_like(s, 1.0 / 23.0)
    for k in range(21, 0, -2):  # 2 * (s + s^3/3 + ... + s^23/23): the error is below 1e-18
        acc = acc * s2 + 1.0 / k
    return e.to(torch.float64) * _LN2 + 2.0 * s * acc


def _cos_turns(v: torch.Tensor) -> torch.Tensor:
    """cos(2 pi v) for float64 ``v`` in [0, 1): exact reduction to an eighth of a turn, then Taylor series."""
    w = torch.where(v > 0.5, 1.0 - v, v)  # [0, 0.5], cos symmetric
    neg = w > 0.25
    w = torch.where(neg, 0.5 - w, w)  # [0, 0.25]; cos(pi - x) = -cos(x)
    use_sin = w > 0.125
    w = torch.where(use_sin, 0.25 - w, w)  # [0, 0.125]; cos(pi/2 - x) = sin(x)
    x = w * _TWO_PI  # [0, pi/4]
    x2 = x * x
    cos = torch.zeros_like(x)
    sin = torch.zeros_like(x)
    for n in range(11, -1, -1):  # terms to x^22 / x^23: the error is below 1e-22
        cos = cos * x2 + (-1) ** n / math.factorial(2 * n)
        sin = sin * x2 + (-1) ** n / math.factorial(2 * n + 1)
    sin = sin * x
    out = torch.where(use_sin, sin, cos)
    return torch.where(neg, -out, out)


def _normal_rows(
    key: tuple[int, int], full_shape: Sequence[int], offset: Sequence[int], shape: Sequence[int], device: Any
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The box's standard-normal values by chunks of rows (all dims but the last flattened): ``(first row, end
    row, float64 values of shape (rows, last dim))``, so a caller writes each chunk and drops it."""
    device = torch.device(device)
    full_shape, offset, shape = tuple(full_shape), tuple(offset), tuple(shape)
    if not shape:  # a scalar: one row of one
        full_shape, offset, shape = (1,), (0,), (1,)
    if math.prod(shape) == 0:
        return
    strides = [1] * len(full_shape)
    for d in range(len(full_shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * full_shape[d + 1]
    lead = torch.zeros((), dtype=torch.int64, device=device)
    for d, n in enumerate(shape[:-1]):
        idx = (torch.arange(n, device=device, dtype=torch.int64) + offset[d]) * strides[d]
        lead = lead.unsqueeze(-1) + idx
    lead = lead.reshape(-1)
    last = shape[-1]
    cols = torch.arange(last, device=device, dtype=torch.int64) + offset[-1]
    rows_per = max(1, _CHUNK.get(device.type, 1 << 20) // last)
    for r0 in range(0, lead.numel(), rows_per):
        index = (lead[r0 : r0 + rows_per, None] + cols[None, :]).reshape(-1)
        zero = torch.zeros_like(index)
        w = philox4x32((index & _M32, index >> 32, zero, zero), key)
        # u1 in (0, 1): 52 bits, centred in their cell (never 0: ln is finite); u2 in [0, 1): 32 bits
        n52 = ((w[0] & 0xFFFFF) << 32) | w[1]
        u1 = (n52.to(torch.float64) + 0.5) * 2.0**-52
        u2 = w[2].to(torch.float64) * 2.0**-32
        z = torch.sqrt(_log_unit(u1) * -2.0) * _cos_turns(u2)
        yield r0, r0 + z.numel() // last, z.view(-1, last)


def standard_normal_box(
    key: tuple[int, int], full_shape: Sequence[int], offset: Sequence[int], shape: Sequence[int], device: Any
) -> torch.Tensor:
    """The float64 standard-normal values of the box ``[offset, offset + shape)`` of a tensor of ``full_shape``:
    element ``i`` (linear index in the full tensor) is Box-Muller of Philox(counter=(i_lo, i_hi, 0, 0), key)."""
    out = torch.empty(tuple(shape), dtype=torch.float64, device=device)
    flat = out.view(-1, out.shape[-1] if out.dim() else 1)
    for r0, r1, z in _normal_rows(key, full_shape, offset, shape, device):
        flat[r0:r1] = z
    return out


def fill_box_(
    local: torch.Tensor,
    seed: int,
    name: str,
    full_shape: Sequence[int],
    offset: Sequence[int],
    *,
    std: float | None,
) -> None:
    """Fill ``local`` (the box at ``offset`` of the full tensor ``name``) with N(0, std^2) draws, or with ones when
    ``std`` is None (norm weights). Written chunk by chunk: the temporaries are bounded (``_CHUNK``), never a
    float64 copy of the shard."""
    with torch.no_grad():
        if std is None:
            local.fill_(1.0)
            return
        target = local if local.is_contiguous() else torch.empty_like(local, memory_format=torch.contiguous_format)
        flat = target.view(-1, target.shape[-1] if target.dim() else 1)
        for r0, r1, z in _normal_rows(tensor_key(seed, name), full_shape, offset, local.shape, local.device):
            flat[r0:r1] = (z * std).to(local.dtype)
        if target is not local:
            local.copy_(target)


def init_tensor_(param: torch.Tensor, seed: int, name: str, *, std: float | None) -> None:
    """Initialise a parameter in place, plain or a DTensor (its local shard only: the box
    ``compute_local_shape_and_global_offset`` gives for its mesh and placements)."""
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    # no DTensor exists unless torch.distributed.tensor was imported (importing it costs seconds: skip it)
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(data, dtensor.DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = data.to_local()
        shape, offset = compute_local_shape_and_global_offset(data.shape, data.device_mesh, data.placements)
        if tuple(local.shape) != tuple(shape):
            raise RuntimeError(
                f"{name}: the local shard's shape {tuple(local.shape)} is not the box {tuple(shape)} its placements "
                f"{data.placements} give; cannot initialise it without the full tensor"
            )
        fill_box_(local, seed, name, data.shape, offset, std=std)
    else:
        fill_box_(data, seed, name, data.shape, (0,) * data.dim(), std=std)
