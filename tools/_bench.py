"""Shared helpers of the benchmarks in tools/: the machine's description, medians, peak memory of a child
process, and writing one section of docs/benchmarks.md (each script owns the section between its markers)."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Every figure here is measured by a script in `tools/` that anyone can rerun (`python tools/bench_<name>.py`); each
script rewrites its own section below (`--out FILE` writes it elsewhere). Ratios compare things measured side by
side in the same run, on the machine described in the section; times are medians of several runs.
"""


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def median_time(fn: Callable[[], Any], repeat: int = 3, setup: Callable[[], Any] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def disk_write_speed(directory: Path, nbytes: int, repeat: int = 3) -> float:
    """Sequential write speed (bytes/s) of the disk under ``directory``: 16 MB blocks, fsync included."""
    block = os.urandom(16 << 20)
    path = directory / f".disk-probe-{os.getpid()}"

    def write() -> None:
        with open(path, "wb") as f:
            for _ in range(max(1, nbytes // len(block))):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())

    try:
        return (
            max(1, nbytes // len(block))
            * len(block)
            / median_time(write, repeat, setup=lambda: path.unlink(missing_ok=True))
        )
    finally:
        path.unlink(missing_ok=True)


def run_child(code: str, *args: str, timeout: float = 1800) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter (so its memory is its own); it prints one JSON line last."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
    try:
        env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
        res = subprocess.run([sys.executable, f.name, *args], capture_output=True, text=True, timeout=timeout, env=env)
    finally:
        os.unlink(f.name)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


PEAK_RSS = """
def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
def reset_peak():
    open("/proc/self/clear_refs", "w").write("5")
"""


def write_section(name: str, body: str, path: Path = DOC) -> None:
    """Replace (or add) the section between ``<!-- bench:name -->`` markers in ``path`` (docs/benchmarks.md
    unless a script's ``--out`` says otherwise; a file that does not exist yet starts with the header)."""
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def add_out_argument(ap: Any) -> None:
    """``--out FILE``: the markdown file whose section the benchmark rewrites (default docs/benchmarks.md)."""
    ap.add_argument(
        "--out", type=Path, default=DOC, help="markdown file to write the section into (default: docs/benchmarks.md)"
    )


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def table(rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(str(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows[1:]]
    return "\n".join(out)
