"""Streaming safetensors files: written tensor by tensor with the checksum computed on the way, read back only
after the header has been checked.

The writer never builds the file in memory: it writes the 8-byte little-endian header length, the JSON header
(``dtype``, ``shape``, ``data_offsets``; ``__metadata__`` holds strings only, ``{"format": "pt"}`` as transformers
expects), then each tensor's bytes straight from its storage. The result is byte-compatible with
``safetensors.torch.save_file`` and readable by ``safetensors`` alone.

The reader refuses a hostile or damaged file before any tensor is touched: a header length beyond the file or
above 100 MB, JSON that is not a header, unknown dtypes, negative or non-integer shapes, offsets outside the data,
overlapping or gapped tensors, a byte count that disagrees with the shape, or a file longer than its header says.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = [
    "DTYPE_TO_STR",
    "STR_TO_DTYPE",
    "RangeWriter",
    "SafetensorsHeader",
    "StreamingWriter",
    "TensorInfo",
    "read_header",
    "tensor_nbytes",
    "write_safetensors",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces
_CHUNK = 16 * 1024 * 1024

DTYPE_TO_STR: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("complex64", "C64"),
):
    if hasattr(torch, _name):
        DTYPE_TO_STR[getattr(torch, _name)] = _code
STR_TO_DTYPE: dict[str, torch.dtype] = {v: k for k, v in DTYPE_TO_STR.items()}


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * itemsize(dtype)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: its dtype, shape and byte range within the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: the tensors in file order, the metadata and where the data section starts."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


# ---------------------------------------------------------------------------------------------- writing


def _byte_view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (it must be a contiguous CPU tensor)."""
    if t.numel() == 0:
        return memoryview(b"")
    flat = t.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _validate_for_save(tensors: Mapping[str, torch.Tensor]) -> None:
    problems = []
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            problems.append(f"tensor name {name!r}: names are non-empty strings")
        elif name == "__metadata__":
            problems.append("'__metadata__' is reserved by the safetensors format; rename the tensor")
        if not isinstance(t, torch.Tensor):
            problems.append(f"{name}: a {type(t).__name__}, not a tensor; store it in the JSON side of the state")
            continue
        if t.dtype not in DTYPE_TO_STR:
            problems.append(f"{name}: dtype {t.dtype} has no safetensors code; cast it (e.g. .float())")
        if t.layout != torch.strided:
            problems.append(f"{name}: {t.layout} tensors cannot be saved; call .to_dense() first")
    if problems:
        raise CheckpointError("cannot write safetensors file: " + "; ".join(problems))


def header_bytes(
    tensors: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.dtype, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """The header (length prefix included) for tensors written in the given order: a mapping of tensors, or
    ``(name, dtype, shape)`` triples (a file streamed tensor by tensor)."""
    specs = (
        [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()] if isinstance(tensors, Mapping) else list(tensors)
    )
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, dtype, shape in specs:
        n = tensor_nbytes(shape, dtype)
        header[name] = {"dtype": DTYPE_TO_STR[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section, as safetensors writes it
    if len(raw) > MAX_HEADER_BYTES:
        raise CheckpointError(f"a safetensors header of {len(raw)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    return struct.pack("<Q", len(raw)) + raw


CHECKSUMS = ("xxh3_128", "sha256")
DEFAULT_CHECKSUM = "xxh3_128"


def new_hasher(algo: str) -> Any:
    """A hash object: ``xxh3_128`` (the default: about 20 GB/s, so checksums cost no time at disk speed; detects
    any accidental corruption) or ``sha256`` (cryptographic, about 1.5 GB/s per core)."""
    if algo == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    if algo == "sha256":
        return hashlib.sha256()
    raise CheckpointError(f"checksum {algo!r}: use one of {CHECKSUMS}")


def hex_length(algo: str) -> int:
    return {"xxh3_128": 32, "sha256": 64}[algo]


class StreamingWriter:
    """A safetensors file written tensor by tensor: the header first (every name, dtype and shape is known up front),
    then each tensor's bytes as it arrives, in header order, with the checksum computed on the way (on a second
    thread: hashing and file writes both release the GIL, so hashing costs no time while it is faster than the
    disk). Peak memory is one tensor's CPU copy (none for a CPU tensor)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
        *,
        fsync: bool = True,
        checksum: str = DEFAULT_CHECKSUM,
        sink: Any = None,
    ) -> None:
        if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise CheckpointError("safetensors __metadata__ holds strings only; put other values in the JSON state")
        self.path, self.fsync = Path(path), fsync
        self._specs = [(n, d, tuple(s)) for n, d, s in specs]
        self._next = 0
        self._digest = new_hasher(checksum)
        self._pending: Any = None
        head = header_bytes(self._specs, metadata)
        # exclusive: checkpoint files are written once, in a staging directory; or ``sink`` (an object's upload)
        self._f = sink if sink is not None else open(self.path, "xb")
        self.size = 0
        self._put(memoryview(head))

    def _put(self, view: memoryview) -> None:
        for lo in range(0, len(view), _CHUNK):
            chunk = view[lo : lo + _CHUNK]
            if self._pending is not None:
                self._pending.result()
            self._pending = _hash_pool().submit(self._digest.update, chunk)
            self._f.write(chunk)
        self.size += len(view)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor (it must be the next one the header lists, with its dtype and element count)."""
        if self._next >= len(self._specs):
            raise CheckpointError(f"{self.path}: more tensors than the header lists ({name!r})")
        want, dtype, shape = self._specs[self._next]
        if name != want or tensor.dtype != dtype or tensor.numel() != math.prod(shape):
            raise CheckpointError(
                f"{self.path}: got {name!r} ({tensor.dtype}, {tensor.numel()} elements), the header lists {want!r} "
                f"({dtype}, {math.prod(shape)} elements) next"
            )
        cpu = tensor.detach()
        if cpu.device.type != "cpu":
            cpu = cpu.to("cpu")
        if not cpu.is_contiguous():
            cpu = cpu.contiguous()
        self._put(_byte_view(cpu))
        self._next += 1

    def close(self) -> tuple[int, str]:
        """Finish the file (every tensor must have been added), fsync it; return ``(size, checksum hex)``."""
        try:
            result = self.finish()
        except BaseException:
            self._f.close()
            raise
        self.sync()
        return result

    def finish(self) -> tuple[int, str]:
        """Write out the last bytes (every tensor must have been added); return ``(size, checksum hex)``. The file
        stays open for :meth:`sync`, which another thread may run while the next file is written."""
        if self._next != len(self._specs):
            raise CheckpointError(f"{self.path}: {len(self._specs) - self._next} tensors never written")
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        self._f.flush()
        return self.size, self._digest.hexdigest()

    def sync(self) -> None:
        """fsync (when asked for) and close the file."""
        try:
            if self.fsync:
                os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._pending is not None:
                self._pending.result()
        (getattr(self._f, "abort", None) or self._f.close)()  # an upload is aborted, never completed


class RangeWriter:
    """Byte ranges of one safetensors file written in place (``pwrite`` at their offsets) by one rank, while other
    ranks write theirs: the file is created at its final size by whichever writer comes first (``O_CREAT``, then
    extended to ``size``; never shrunk, so a later writer keeps an earlier one's bytes). The writer hashes what it
    writes, in the order written, into ``digest`` (a shard owner's: its header and own tensors; a holder's: its
    ranges of every file, in the plan's order). :meth:`sync` fsyncs (each writer its own bytes) and closes."""

    def __init__(self, path: str | os.PathLike[str], size: int, *, fsync: bool = True) -> None:
        self.path, self.fsync = Path(path), fsync
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            if os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        self.size = size

    def put(self, offset: int, data: memoryview, digest: Any) -> None:
        """Write ``data`` at ``offset`` (inside the file's size) and add it to ``digest``."""
        if offset < 0 or offset + len(data) > self.size:
            raise CheckpointError(
                f"{self.path}: a range [{offset}, {offset + len(data)}) outside its {self.size} bytes"
            )
        from .faults import point

        point(f"range-write:{self.path.name}")
        done = 0
        while done < len(data):
            chunk = data[done : done + _CHUNK]
            n = os.pwrite(self._fd, chunk, offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: wrote nothing at byte {offset + done}")
            digest.update(chunk[:n])
            done += n

    def put_tensor(self, offset: int, tensor: torch.Tensor, digest: Any) -> int:
        cpu = tensor.detach()
        if cpu.device.type != "cpu":
            cpu = cpu.to("cpu")
        if not cpu.is_contiguous():
            cpu = cpu.contiguous()
        view = _byte_view(cpu)
        self.put(offset, view, digest)
        return len(view)

    def sync(self) -> None:
        try:
            if self.fsync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def tensor_offsets(
    specs: Sequence[tuple[str, torch.dtype, Sequence[int]]], metadata: Mapping[str, str] | None = None
) -> tuple[int, dict[str, int], int]:
    """Where each tensor's bytes start in the file :func:`header_bytes` heads: ``(header length, {name: absolute
    offset}, file size)``."""
    head = len(header_bytes(specs, metadata))
    offsets, cursor = {}, head
    for name, dtype, shape in specs:
        offsets[name] = cursor
        cursor += tensor_nbytes(shape, dtype)
    return head, offsets, cursor


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    fsync: bool = True,
    checksum: str = DEFAULT_CHECKSUM,
) -> tuple[int, str]:
    """Write ``tensors`` (any device; copied to CPU one at a time) to ``path``; return ``(size, checksum hex)``.

    The file is created exclusively (an existing file is an error: checkpoint files are written once, in a staging
    directory) and fsynced before returning when ``fsync`` is set.
    """
    _validate_for_save(tensors)
    writer = StreamingWriter(
        path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], metadata, fsync=fsync, checksum=checksum
    )
    try:
        for name, t in tensors.items():
            writer.add(name, t)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


_POOL: Any = None


def _hash_pool() -> Any:
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsd-checksum")
    return _POOL


# ---------------------------------------------------------------------------------------------- reading


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and check a safetensors header without loading any tensor; a bad file raises CheckpointError naming it."""
    p = Path(path)

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{p}: not a valid safetensors file: {why}")

    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise bad(f"header claims {n} bytes (more than the {MAX_HEADER_BYTES}-byte limit)")
            if 8 + n > size:
                raise bad(f"header claims {n} bytes but the file has {size - 8} after the length prefix")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot read: {exc.strerror or exc}") from None
    return parse_header(p, raw, size)


def parse_header(p: Any, raw: bytes, size: int) -> SafetensorsHeader:
    """A safetensors header's JSON bytes ``raw`` (after the 8-byte length) of a ``size``-byte file, checked as
    :func:`read_header` checks a file's (an object read by ranged GETs: the header fetched first)."""
    n = len(raw)

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{p}: not a valid safetensors file: {why}")

    if 8 + n > size:
        raise bad(f"header claims {n} bytes but the file has {size - 8} after the length prefix")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad("__metadata__ must map strings to strings")
    data_len = size - 8 - n
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {name!r} must have exactly dtype, shape and data_offsets")
        dtype = STR_TO_DTYPE.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise bad(f"tensor {name!r} has unknown dtype {entry['dtype']!r}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r} outside the {data_len}-byte data section")
        if offsets[1] - offsets[0] != tensor_nbytes(shape, dtype):
            raise bad(
                f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {entry['dtype']} "
                f"(which needs {tensor_nbytes(shape, dtype)})"
            )
        infos.append(TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1]))
    cursor = 0
    for info in sorted(infos, key=lambda i: (i.start, i.end)):
        if info.start != cursor:
            what = "overlaps the previous tensor" if info.start < cursor else "leaves a gap before it"
            raise bad(f"tensor {info.name!r} at byte {info.start} {what} (expected {cursor})")
        cursor = info.end
    if cursor != data_len:
        raise bad(f"the tensors cover {cursor} bytes but the data section has {data_len}")
    return SafetensorsHeader(
        tensors={i.name: i for i in infos}, metadata=dict(metadata), data_start=8 + n, file_size=size
    )


class SafetensorsReader:
    """Read tensors (whole or a dim-0 slice) from a file whose header :func:`read_header` has checked."""

    def __init__(self, path: str | os.PathLike[str], kept: Sequence[tuple[int, Any]] = ()) -> None:
        self.path = Path(path)
        self.header = read_header(self.path)
        self._handle: Any = None  # safetensors' own reader, opened when a whole tensor or rows are asked for
        self._fd: int | None = None
        self._kept = sorted(kept, key=lambda k: k[0])
        """``(file offset, bytes)`` already read (and checksummed) by the verification: ranges are served from
        them instead of the disk."""
        self.kept_hits = 0

    def _safe(self) -> Any:
        if self._handle is None:
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except Exception as exc:  # the Rust reader's own checks
                raise CheckpointError(f"{self.path}: safetensors refused the file: {exc}") from None
        return self._handle

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.header.tensors:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        return self._safe().get_tensor(name)

    def read_range(self, name: str, start: int, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of the flattened tensor, as a 1-D tensor (``out``: read straight into
        this contiguous CPU tensor of ``numel`` elements): only those bytes are read, with no copy."""
        info = self.header.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        total = math.prod(info.shape)
        if start < 0 or numel < 0 or start + numel > total:
            raise CheckpointError(f"{self.path}: {name!r} has {total} elements; [{start}, {start + numel}) refused")
        if out is not None and (
            out.dtype != info.dtype or out.numel() != numel or not out.is_contiguous() or out.device.type != "cpu"
        ):
            raise CheckpointError(f"internal: cannot read {name!r} into a {out.dtype} tensor of {out.numel()} elements")
        size = itemsize(info.dtype)
        offset = self.header.data_start + info.start + start * size
        if self._kept and numel:
            held = self._from_kept(offset, numel * size)
            if held is not None:
                self.kept_hits += 1
                if out is None:
                    if offset % size == 0:  # the element's own alignment: a view of the kept bytes, no copy
                        return torch.frombuffer(held, dtype=info.dtype, count=numel)
                    out = torch.empty(numel, dtype=info.dtype)
                _byte_view(out)[:] = held
                return out
        if out is None:
            out = torch.empty(numel, dtype=info.dtype)
        if numel == 0:
            return out
        self._pread(_byte_view(out), offset, name)
        return out

    def _pread(self, view: memoryview, offset: int, name: str) -> None:
        """``len(view)`` bytes at ``offset`` into ``view`` (an object reader: one ranged GET)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):  # slices are read front to back: let the kernel read ahead
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: ended while reading {name!r} (the file was truncated?)")
            done += n

    def _from_kept(self, offset: int, nbytes: int) -> memoryview | None:
        """The bytes ``[offset, offset + nbytes)`` from a kept range that holds all of them, else None."""
        import bisect

        i = bisect.bisect_right(self._kept, offset, key=lambda k: k[0]) - 1
        if i < 0:
            return None
        base, data = self._kept[i]
        if offset + nbytes > base + len(data):
            return None
        return memoryview(data)[offset - base : offset - base + nbytes]

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` along dim 0 (what one rank of a dim-0 sharded engine needs)."""
        if name not in self.header.tensors:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        return self._safe().get_slice(name)[start:stop]

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.tensors)

    def close(self) -> None:
        self._handle = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hash_file(path: str | os.PathLike[str], checksum: str = DEFAULT_CHECKSUM) -> tuple[int, str]:
    """``(size, checksum hex)`` of a file, read in 16 MB chunks."""
    digest = new_hasher(checksum)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def json_bytes(data: Any) -> bytes:
    """The bytes of a checkpoint's JSON file."""
    return (json.dumps(encode_floats(data), indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def write_json(
    path: str | os.PathLike[str], data: Any, *, fsync: bool = True, checksum: str = DEFAULT_CHECKSUM
) -> tuple[int, str]:
    """Write JSON exclusively (never over an existing file); return ``(size, checksum hex)``."""
    raw = json_bytes(data)
    with open(path, "xb") as f:
        f.write(raw)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    digest = new_hasher(checksum)
    digest.update(raw)
    return len(raw), digest.hexdigest()


def encode_floats(obj: Any) -> Any:
    """Plain JSON for any value of ours: a non-finite float becomes ``{"$float": "inf"}`` (JSON has no inf/nan)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"$float": repr(obj)}
    if isinstance(obj, dict):
        return {str(k): encode_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_floats(v) for v in obj]
    return obj


def decode_floats(obj: Any) -> Any:
    """The inverse of :func:`encode_floats`."""
    if isinstance(obj, dict):
        if set(obj) == {"$float"} and obj["$float"] in ("inf", "-inf", "nan"):
            return float(obj["$float"])
        return {k: decode_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_floats(v) for v in obj]
    return obj


def read_json(path: str | os.PathLike[str], *, max_bytes: int = 256 * 1024 * 1024) -> Any:
    """Read one of our JSON files (size-capped, non-finite floats decoded); errors name the file."""
    p = Path(path)
    try:
        if p.stat().st_size > max_bytes:
            raise CheckpointError(f"{p}: {p.stat().st_size} bytes, more than a checkpoint JSON file may hold")
        return decode_floats(json.loads(p.read_text(encoding="utf-8")))
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{p}: not valid JSON ({exc})") from None


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """Make every file under ``path`` and every folder's entries durable (a tree written by others, or copied in,
    before a rename commits it)."""
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)
