"""Extra memory of a save and of the converters, at two model sizes, and conversion time against zero_to_fp32.

Each measurement runs in its own process, which samples its memory every 5 ms: the peak of anonymous memory
(heap: what a save really needs) and of resident file pages (memory-mapped checkpoint files, which the kernel can
drop at will), minus the same figures just before the operation. The slope between the two sizes says whether
the extra memory grows with the model.

    python tools/bench_memory.py [--sizes 0.25 1.0] [--out docs/benchmarks.md]
    python tools/bench_memory.py --sizes 0.002 --width 256 --out /tmp/m.md      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _bench import add_out_argument, fmt_bytes, machine, run_child, table, write_section

SAMPLER = """
import json, sys, threading, time, os
def _read():
    anon = file = 0
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            anon = int(line.split()[1]) * 1024
        elif line.startswith("RssFile"):
            file = int(line.split()[1]) * 1024
    return anon, file
class Peak:
    def __enter__(self):
        self.base = _read(); self.peak = list(self.base); self.stop = False
        def run():
            while not self.stop:
                a, f = _read(); self.peak[0] = max(self.peak[0], a); self.peak[1] = max(self.peak[1], f)
                time.sleep(0.005)
        self.t = threading.Thread(target=run, daemon=True); self.t.start(); self.t0 = time.perf_counter()
        return self
    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.stop = True; self.t.join()
        a, f = _read(); self.peak[0] = max(self.peak[0], a); self.peak[1] = max(self.peak[1], f)
    def result(self):
        return {"anon": self.peak[0] - self.base[0], "file": self.peak[1] - self.base[1], "seconds": self.seconds}
"""

SAVE_CHILD = (
    SAMPLER
    + """
import os, sys, shutil, torch
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "tools"))
from bench_save import build, flat_tensors
gb, method, out, width = float(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
model, opt, nbytes = build(gb, width)
shutil.rmtree(out, ignore_errors=True); os.makedirs(out)
if method == "ours":
    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager
    config = CheckpointConfig(at_milestones=False, at_end=False, on_preemption=False)
    mgr = CheckpointManager(out, model, opt, WSDScheduler(opt, WSDSchedule(total=10, decay_length=2)), config=config)
    with Peak() as p:
        mgr.save(["periodic"])
    mgr.close()
elif method == "torch.save":
    with Peak() as p:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, out + "/state.pt")
elif method == "safetensors.save_file":
    from safetensors.torch import save_file
    tensors = flat_tensors(model, opt)
    with Peak() as p:
        save_file(tensors, out + "/state.safetensors")
print(json.dumps(p.result() | {"bytes": nbytes}))
"""
)

DS_SAVE = """
import os, sys, torch
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "tools"))
from bench_save import build
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
width = int(sys.argv[3])
model, _, nbytes = build(float(sys.argv[1]), width)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={"train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
x = torch.randn(2, width)
engine.backward(engine(x).pow(2).mean()); engine.step()
engine.save_checkpoint(sys.argv[2], tag="global_step1")
print(nbytes)
"""

CONVERT_CHILD = (
    SAMPLER
    + """
import os, sys, shutil
method, ds_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
shutil.rmtree(out, ignore_errors=True)
if method == "ours":
    from wsd_pretrain.checkpoint.tools import from_deepspeed
    with Peak() as p:
        from_deepspeed(ds_dir, out, max_shard_size=64 * 10**6)
else:
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
    with Peak() as p:
        convert_zero_checkpoint_to_fp32_state_dict(ds_dir, out, safe_serialization=True)
written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
print(json.dumps(p.result() | {"written": written}))
"""
)


def make_ds_checkpoint(gb: float, out: Path, width: int) -> None:
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = out.parent / "ds_save.py"
    script.write_text(DS_SAVE)
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(gb), str(out), str(width)],
            env=env
            | {
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": str(r),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=3600)
        if p.returncode:
            raise RuntimeError(err[-3000:])


def slope(xs: list[float], ys: list[float]) -> float:
    return (ys[-1] - ys[0]) / (xs[-1] - xs[0]) if len(xs) > 1 and xs[-1] != xs[0] else float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1.0])
    ap.add_argument("--dir", type=Path, default=Path("runs/bench-memory"))
    ap.add_argument("--width", type=int, default=4096, help="layer width (layers are width x width/2)")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    root = args.dir.resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    save_rows = [["method", *[f"extra heap at {s} GB" for s in args.sizes], "slope (extra bytes per state byte)"]]
    measured: dict[str, list[dict]] = {}
    nbytes = []
    for method in ("ours", "torch.save", "safetensors.save_file"):
        for gb in args.sizes:
            res = run_child(SAVE_CHILD, str(gb), method, str(root / "save"), str(args.width))
            measured.setdefault(method, []).append(res)
            if method == "ours":
                nbytes.append(res["bytes"])
            print(method, gb, res, file=sys.stderr)
    for method, results in measured.items():
        save_rows.append(
            [method, *[fmt_bytes(r["anon"]) for r in results], f"{slope(nbytes, [r['anon'] for r in results]):.3f}"]
        )
    conv_rows = [["method", "DeepSpeed files", "written", "time (s)", "extra heap", "extra resident file pages"]]
    conv: dict[str, list[dict]] = {}
    ds_bytes = []
    for gb in args.sizes:
        ds_dir = root / f"ds-{gb}"
        make_ds_checkpoint(gb, ds_dir, args.width)
        ds_bytes.append(sum(f.stat().st_size for f in ds_dir.rglob("*.pt")))
        for method in ("ours", "zero_to_fp32"):
            res = run_child(CONVERT_CHILD, method, str(ds_dir), str(root / f"out-{method}"))
            conv.setdefault(method, []).append(res)
            conv_rows.append(
                [
                    {
                        "ours": "from-deepspeed (model + full training state)",
                        "zero_to_fp32": "DeepSpeed zero_to_fp32 (fp32 weights only)",
                    }[method],
                    fmt_bytes(ds_bytes[-1]),
                    fmt_bytes(res["written"]),
                    f"{res['seconds']:.2f}",
                    fmt_bytes(res["anon"]),
                    fmt_bytes(res["file"]),
                ]
            )
            print(method, gb, res, file=sys.stderr)
        shutil.rmtree(ds_dir, ignore_errors=True)
    conv_slopes = {m: slope(ds_bytes, [r["anon"] for r in v]) for m, v in conv.items()}
    shutil.rmtree(root, ignore_errors=True)
    body = f"""## Memory of saves and conversions (`tools/bench_memory.py`)

Machine: {machine()}. Run on {time.strftime("%Y-%m-%d")}. One process per measurement; memory sampled every
5 ms; "extra heap" is the peak of anonymous memory minus its level just before the operation. States are fp32
models plus AdamW state of the sizes shown.

Synchronous save, one rank (state of {", ".join(fmt_bytes(b) for b in nbytes)}):

{table(save_rows)}

Ours writes every tensor straight from its storage into the file (with a sharded engine, one gathered parameter
at a time, kept only by its shard's owner until the shard is written), so its extra memory does not grow with the
model: the slope is the figure to read. Async saves need host memory for the snapshot of this rank's share, kept
between saves (see the async section).

Import of a DeepSpeed ZeRO-2 checkpoint written by 2 ranks, against DeepSpeed's own `zero_to_fp32` on the same
files:

{table(conv_rows)}

Slope of extra heap per byte of DeepSpeed files: from-deepspeed {conv_slopes.get("ours", float("nan")):.3f},
zero_to_fp32 {conv_slopes.get("zero_to_fp32", float("nan")):.3f}. from-deepspeed ran with `--max-shard-size 64MB`:
it memory-maps DeepSpeed's files and assembles one parameter at a time, so its heap holds about one output shard
and one parameter (the mapped file pages are cache the kernel can drop); with the default 2 GB shards, a model
smaller than that sits whole in the shard buffer. zero_to_fp32 loads every rank's optimizer file into memory and
writes the fp32 weights only, while from-deepspeed also writes the optimizer state (see "written").
"""
    write_section("memory", body, args.out)
    print(body)
    _ = json


if __name__ == "__main__":
    main()
