"""Save and resume on S3, side by side in one run against one local S3 server (moto, 127.0.0.1): our manager on an
``s3://`` run (each rank streaming the files it writes straight to parallel multipart uploads, rank 0's manifest
last; ``--staging``: through the local staging tier instead) against
torch.distributed.checkpoint's fsspec writer (s3fs) at its best settings (``thread_count`` threads,
``sync_files=False``: with it, DCP falls back to a machine-wide ``os.sync()`` per file). Rewrites the ``s3`` section
of docs/benchmarks.md.

moto is not a speed reference (it holds every object in memory and reads a whole object for a ranged GET): the
numbers compare the two writers against the same server in the same run, never against a number from elsewhere.

    python tools/bench_s3.py --sizes-mb 1 100 --ranks 1 2
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import add_out_argument, fmt_bytes, machine, table, write_section

KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int | None = None) -> tuple[subprocess.Popen, str]:
    """moto's server on ``port`` (a free one by default) of 127.0.0.1, once it answers; its process and endpoint."""
    port = _free_port() if port is None else port
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)


def _model(mb: float):
    import torch

    width = 64 if mb < 4 else 1024
    layers = max(1, round(mb * 1e6 / 4 / (width * width // 2)))
    torch.manual_seed(0)
    return torch.nn.Sequential(
        *[torch.nn.Linear(width, width // 2, bias=False) for _ in range(layers)]
    ).requires_grad_()


def _worker(
    rank: int, world: int, port: int, mb: float, bucket: str, endpoint: str, threads: int, out: str, staging: bool
) -> None:
    os.environ.update(KEYS, AWS_ENDPOINT_URL_S3=endpoint, OMP_NUM_THREADS="1")
    tempfile.tempdir = str(Path(out).parent)  # the direct path's resume cache goes under the run's temp folder
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import json

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    from wsd_pretrain import CheckpointConfig, CheckpointManager, WSDSchedule, WSDScheduler
    from wsd_pretrain import distributed as D

    D.init_distributed(backend="gloo", timeout_s=600)
    model = _model(mb)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=100, decay_length=10))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    nbytes = sum(p.numel() * 4 * 3 for p in model.parameters())  # weights, exp_avg, exp_avg_sq
    res: dict = {"bytes": nbytes}
    tag = uuid.uuid4().hex[:6] if rank == 0 else None
    tag = D.broadcast_object(tag, src=0)
    tmp = str(Path(out).parent)  # one staging folder for every rank (as a run directory is)
    url = f"s3://{bucket}/ours-{tag}"
    cfg = CheckpointConfig(staging_dir=f"{tmp}/stage" if staging else None, on_preemption=False)
    mgr = CheckpointManager(url, model, opt, sched, config=cfg)
    dist.barrier()
    t = time.perf_counter()
    mgr.save(["periodic"])
    mgr.wait()  # committed on the bucket
    dist.barrier()
    res["ours_save"] = time.perf_counter() - t
    mgr.close()
    fresh = CheckpointConfig(staging_dir=f"{tmp}/fresh" if staging else None, on_preemption=False)
    mgr = CheckpointManager(url, model, opt, sched, config=fresh)
    dist.barrier()
    t = time.perf_counter()
    mgr.resume("latest")  # from the bucket in place: each rank's ranges and verification share by ranged GETs
    dist.barrier()
    res["ours_load"] = time.perf_counter() - t
    mgr.close()
    storage = {
        "key": KEYS["AWS_ACCESS_KEY_ID"],
        "secret": KEYS["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    path = f"s3://{bucket}/dcp-{tag}"
    dist.barrier()
    t = time.perf_counter()
    dcp.save(state, storage_writer=FsspecWriter(path, thread_count=threads, sync_files=False, **storage))
    dist.barrier()
    res["dcp_save"] = time.perf_counter() - t
    t = time.perf_counter()
    dcp.load(state, storage_reader=FsspecReader(path, **storage))
    dist.barrier()
    res["dcp_load"] = time.perf_counter() - t
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    D.teardown()
    os._exit(0)


def run(mb: float, ranks: int, bucket: str, endpoint: str, threads: int, staging: bool = False) -> dict:
    import json

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/r.json"
        port = _free_port()
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_worker, args=(r, ranks, port, mb, bucket, endpoint, threads, out, staging))
            for r in range(ranks)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(1800)
        if not Path(out).exists():
            raise RuntimeError(f"the {ranks}-rank run of {mb} MB failed (exit codes {[p.exitcode for p in procs]})")
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[1.0, 100.0], help="model weights, MB (fp32)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=4, help="DCP FsspecWriter thread_count (its best: 4)")
    ap.add_argument("--staging", action="store_true", help="ours through the local staging tier (staging_dir)")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    proc, endpoint = start_server()
    load_before = os.getloadavg()[0]
    try:
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        rows = [
            [
                "state (weights + AdamW)",
                "ranks",
                "ours: save",
                f"DCP fsspec ({args.threads} threads): save",
                "save ratio",
                "ours: resume",
                "DCP: load",
            ]
        ]
        for mb in args.sizes_mb:
            for ranks in args.ranks:
                r = run(mb, ranks, bucket, endpoint, args.threads, args.staging)
                b = r["bytes"]

                def speed(s: float, b: float = b) -> str:
                    return f"{s:.2f} s ({b / s / 1e6:.0f} MB/s)"

                rows.append(
                    [
                        fmt_bytes(b),
                        ranks,
                        speed(r["ours_save"]),
                        speed(r["dcp_save"]),
                        f"{r['dcp_save'] / r['ours_save']:.2f}x",
                        speed(r["ours_load"]),
                        speed(r["dcp_load"]),
                    ]
                )
                print(rows[-1], flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    how = (
        "with a local staging folder (save = written and committed locally, each rank uploading the files it wrote "
        "in parallel multipart parts)"
        if args.staging
        else "with no staging folder (save = each rank streaming the files it writes straight to parallel multipart "
        "uploads, xxh3 on the way, no local copy, no fsync)"
    )
    fresh = "with an empty staging folder" if args.staging else "with no staging folder"
    body = f"""## Save and resume on S3 against DCP's fsspec writer (`tools/bench_s3.py`)

{machine()} ({load}: a shared machine, so
the numbers are noisy); one local S3 server (moto on 127.0.0.1) for both writers, in one run. Ours: the manager on
an `s3://` run {how} (rank 0 committing on the bucket once every rank reported: `save()` then
`wait()`); resume = a new manager {fresh}
(listing, then each rank reads in place from the bucket). DCP: `dcp.save` with `FsspecWriter(thread_count={args.threads},
sync_files=False)` over s3fs, and `dcp.load` with `FsspecReader`. The save ratio is DCP's time over ours (higher:
ours faster). moto keeps objects in memory and is not a speed reference: compare the columns, not with other
numbers. Our resume: each rank fetches with ranged GETs (8 in flight) exactly the byte ranges its restore
needs plus its verification share (the files it wrote, checksummed), and restores from those bytes; nothing is
copied to local disk.

{table(rows)}
"""
    write_section("s3", body, args.out)
    print(f"wrote the s3 section of {args.out}")


if __name__ == "__main__":
    main()
