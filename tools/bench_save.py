"""Save and resume speed: our checkpoint against the disk and the peers, side by side in one run.

For a model plus AdamW state of about 0.5 GB and 2 GB (fp32, one process), each method writes the same tensors
and makes them durable (fsync, or os.sync for methods that do not fsync) in the same directory:
(a) the disk's own sequential write, (b) torch.save, (c) DeepSpeed's save_checkpoint, (d) torch.distributed.checkpoint
with its Hugging Face storage writer, (e) safetensors.save_file, and ours (``CheckpointManager.save``: sharded
safetensors, xxh3_128 of every file, manifest, atomic commit). Resume: ``CheckpointManager.load`` (checksums
verified, or sizes only) against torch.load of the .pt file.

    python tools/bench_save.py [--sizes 0.5 2] [--repeat 3] [--dir runs/bench] [--out docs/benchmarks.md]
    python tools/bench_save.py --sizes 0.002 --width 256 --repeat 1 --out /tmp/b.md    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from _bench import add_out_argument, disk_write_speed, fmt_bytes, machine, median_time, table, write_section

from wsd_pretrain.checkpoint.safetensors_io import fsync_tree


def build(gb: float, width: int = 4096) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """Linear layers of ``width`` x ``width/2`` (fp32; 4096x2048 by default) with AdamW state after one step: 12
    bytes per parameter."""
    half = width // 2
    layers = max(1, round(gb * 1e9 / (12 * width * half)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[
            torch.nn.Linear(width, half, bias=False) if i % 2 == 0 else torch.nn.Linear(half, width, bias=False)
            for i in range(layers)
        ]
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    nbytes = sum(p.numel() * 4 * 3 for p in model.parameters())
    return model, opt, nbytes


def flat_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.detach()
        for k, v in opt.state[p].items():
            if v.dim():
                out[f"{name}/{k}"] = v
    return out


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bench_size(gb: float, args: argparse.Namespace, root: Path, cold: bool, rows: list, load_rows: list) -> None:
    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    model, opt, nbytes = build(gb, args.width)
    config = CheckpointConfig(at_milestones=False, at_end=False, on_preemption=False, max_shard_size=2 * 10**9)

    def manager(run: Path) -> CheckpointManager:
        """The public API, as a training job uses it (the same schedule every time: load accepts its state)."""
        return CheckpointManager(
            run, model, opt, WSDScheduler(opt, WSDSchedule(total=10, decay_length=2)), config=config
        )

    tensors = flat_tensors(model, opt)
    counter = iter(range(10**6))

    def fresh(name: str) -> Path:
        path = root / f"{name}-{next(counter)}"
        shutil.rmtree(path, ignore_errors=True)
        return path

    def ours() -> None:
        mgr = manager(fresh("ours"))
        try:
            mgr.save(["periodic"])
        finally:
            mgr.close()

    def torch_save() -> None:
        path = fresh("torch") / "state.pt"
        path.parent.mkdir()
        with open(path, "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())

    def safetensors_save() -> None:
        from safetensors.torch import save_file

        path = fresh("safetensors") / "state.safetensors"
        path.parent.mkdir()
        save_file(tensors, str(path))
        fsync_tree(path.parent)

    def dcp_hf() -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        path = fresh("dcp")
        dcp.save(dict(tensors), storage_writer=HuggingFaceStorageWriter(str(path)))
        fsync_tree(path)

    engine = None
    try:
        import deepspeed

        ds_model = model
        engine, *_ = deepspeed.initialize(
            model=ds_model,
            optimizer=opt,
            config={
                "train_micro_batch_size_per_gpu": 1,
                "zero_optimization": {"stage": 0},
                "steps_per_print": 10**9,
            },
        )
    except Exception as exc:  # pragma: no cover - DeepSpeed missing
        print(f"DeepSpeed unavailable: {exc}", file=sys.stderr)

    def ds_save() -> None:
        path = fresh("deepspeed")
        engine.save_checkpoint(str(path), tag="t")
        fsync_tree(path)

    methods = [
        ("ours (wsd_pretrain)", ours),
        ("torch.save", torch_save),
        ("safetensors.save_file", safetensors_save),
        ("DCP + HuggingFaceStorageWriter", dcp_hf),
    ]
    if engine is not None:
        methods.append(("DeepSpeed save_checkpoint", ds_save))
    # rounds of every method in turn (not all repeats of one method in a row), starting at a different one each
    # round: drifts of the disk hit all alike
    # A virtual disk writes slowly to blocks it has not held before: each output is deleted right after it is
    # timed (so every method reuses freed space alike) and a first, untimed round warms everything up.
    samples: dict[str, list[float]] = {name: [] for name, _ in methods}
    disk_samples = []
    keep = {"ours (wsd_pretrain)", "torch.save"}  # the last of these are read back by the resume benchmark
    disk = ("the disk", lambda: None)
    for round_ in range(args.repeat + 1):
        # each round starts at another method (the disk probe included): a disk that slows down after a burst
        # of writes does not always penalise the same method
        turn = [disk, *methods]
        turn = turn[round_ % len(turn) :] + turn[: round_ % len(turn)]
        for name, fn in turn:
            if name == "the disk":
                speed = disk_write_speed(root, nbytes, 1)
                if round_:
                    disk_samples.append(speed)
                continue
            before = set(root.iterdir())
            t = median_time(fn, 1)
            if round_:
                samples[name].append(t)
                print(f"{gb} GB {name}: {t:.2f}s", file=sys.stderr)
            if not (name in keep and round_ == args.repeat):
                for path in set(root.iterdir()) - before:
                    shutil.rmtree(path, ignore_errors=True)
    results = {name: sorted(v)[len(v) // 2] for name, v in samples.items()}
    disk = sorted(disk_samples)[len(disk_samples) // 2]
    label = f"{fmt_bytes(nbytes)}"
    rows.append(
        [label, "the disk (sequential write + fsync)", f"{nbytes / disk:.2f}", f"{disk / 1e9:.2f} GB/s", "100%", ""]
    )
    for name, t in results.items():
        speed = nbytes / t
        faster = "" if name.startswith("ours") else f"{t / results['ours (wsd_pretrain)']:.2f}x"
        rows.append([label, name, f"{t:.2f}", f"{speed / 1e9:.2f} GB/s", f"{100 * speed / disk:.0f}%", faster])

    # resume
    ckpt = [p for p in (sorted(root.glob("ours-*"))[-1] / "checkpoints").iterdir() if p.name.startswith("step")][0]
    pt = sorted(root.glob("torch-*"))[-1] / "state.pt"

    loader = manager(root / "loader")

    def our_load(verify: str) -> None:
        if cold:
            drop_caches()
        loader.load(ckpt, verify=verify)

    def torch_load() -> None:
        if cold:
            drop_caches()
        state = torch.load(pt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])

    t_torch = median_time(torch_load, args.repeat)
    for name, fn in (
        ("ours, checksums verified (xxh3_128)", lambda: our_load("checksum")),
        ("ours, sizes verified", lambda: our_load("size")),
        ("torch.load + load_state_dict", torch_load),
    ):
        t = t_torch if fn is torch_load else median_time(fn, args.repeat)
        load_rows.append([label, name, f"{t:.2f}", "" if fn is torch_load else f"{t_torch / t:.2f}x"])
    loader.close()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.5, 2.0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("runs/bench-save"))
    ap.add_argument("--width", type=int, default=4096, help="layer width (layers are width x width/2)")
    ap.add_argument(
        "--warm-cache",
        action="store_true",
        help="do not drop the page cache before each load (dropping needs root and slows every process on the machine)",
    )
    add_out_argument(ap)
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29000 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    from wsd_pretrain import distributed as D

    D.init_distributed(backend="gloo")
    root = args.dir.resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rows = [["state", "method", "time (s)", "throughput", "vs disk", "ours is faster by"]]
    load_rows = [["state", "method", "time (s)", "ours is faster by"]]
    cold = not args.warm_cache and drop_caches()
    for gb in args.sizes:
        bench_size(gb, args, root, cold, rows, load_rows)
    D.teardown()
    shutil.rmtree(root, ignore_errors=True)
    body = f"""## Save and resume speed (`tools/bench_save.py`)

Machine: {machine()}. Run on {time.strftime("%Y-%m-%d")}; median of {args.repeat} rounds after an untimed warm-up round,
the methods taking turns within each round; one process; model plus AdamW
state in fp32 (the bytes below), written to the same directory by every method; each method's time includes making
the files durable (our own fsyncs; `os.fsync` of every file and folder for the others). Page cache {
        "dropped before every load"
        if cold
        else ("warm (--warm-cache)" if args.warm_cache else "warm (could not drop it)")
    }.

{table(rows)}

"vs disk" is the method's throughput as a share of the disk's sequential write speed measured in the same run;
"ours is faster by" is the method's time divided by ours. Ours also hashes every byte (xxh3_128) and writes a
Hugging Face folder, a manifest and an index; the others write their files only. The disk row is one file written,
then fsynced; ours can beat it because it fsyncs each finished file while it writes the next (docs/decisions.md,
72), so the copy into the page cache and the flush to the device overlap, where the probe and the other methods do
one after the other. The VM's disk varies by 20-30% from minute to minute, which the probe's row shares.

Resume (load into the live model and optimizer):

{table(load_rows)}

Every method reads from a cold page cache. With sizes verified, ours reads each slice once, straight into its
place (`preadv` into the assembled tensor), as torch.load reads its file once: both are bound by the disk. With checksums verified (the default) each
byte is read once too: the verification reads and hashes the files this rank wrote (on the same layout, what it
restores) and keeps the bytes, and the restore, which waits until every check has passed (a corrupt checkpoint
must not leave a half-restored model), takes its tensors from them instead of the disk (docs/decisions.md, 105;
before, every file was read twice: 0.71-0.77x torch.load).
"""
    write_section("save", body, args.out)
    print(body)


if __name__ == "__main__":
    main()
