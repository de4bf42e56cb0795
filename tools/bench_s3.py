"""Save and resume on S3, side by side in one run against one local S3 server (moto, 127.0.0.1): our manager on
an ``s3://`` run (each rank streaming the files it writes straight to parallel multipart uploads, rank 0's manifest
last; ``--staging``: through the local staging tier instead) against torch.distributed.checkpoint's fsspec writer
(s3fs) at its best settings: ``sync_files=False`` (with it, DCP falls back to a machine-wide ``os.sync()`` per
file), botocore's per-request CRC32 off as in ours, and the fastest of several ``thread_count`` (each round saves
with each). Rounds are interleaved (ours, DCP, ..., then the reverse order); the figures are medians, with the CPU
seconds the ranks and the server spent per save. Rewrites the ``s3`` section of docs/benchmarks.md.

moto is not a speed reference (it holds every object in memory and reads a whole object for a ranged GET): the
numbers compare the two writers against the same server in the same run, never against a number from elsewhere.

    python tools/bench_s3.py --sizes-mb 1 500 --ranks 1 2 --rounds 3
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import add_out_argument, fmt_bytes, machine, table, write_section

KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int | None = None, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """moto's server on ``port`` (a free one by default) of 127.0.0.1, once it answers; its process and endpoint
    (``env``: more environment variables for the server, e.g. ``MOTO_S3_DEFAULT_KEY_BUFFER_SIZE``)."""
    port = _free_port() if port is None else port
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, **(env or {})),
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


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _worker(
    rank: int,
    world: int,
    port: int,
    mb: float,
    bucket: str,
    endpoint: str,
    threads: list[int],
    out: str,
    staging: bool,
    rounds: int,
    server_pid: int,
    dcp_crc: bool,
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
    from wsd_pretrain.checkpoint.storage import S3Store

    D.init_distributed(backend="gloo", timeout_s=600)
    model = _model(mb)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=100, decay_length=10))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    nbytes = sum(p.numel() * 4 * 3 for p in model.parameters())  # weights, exp_avg, exp_avg_sq
    storage = {
        "key": KEYS["AWS_ACCESS_KEY_ID"],
        "secret": KEYS["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    if not dcp_crc:  # DCP at its best: no per-request CRC32 (botocore computes one for every PUT by default)
        storage["config_kwargs"] = {"request_checksum_calculation": "when_required"}
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    tmp = str(Path(out).parent)  # one staging folder for every rank (as a run directory is)
    res: dict = {"bytes": nbytes, "rounds": []}

    def timed(fn: Any) -> dict:
        """Wall time of ``fn`` on every rank (barriers around it), with the CPU seconds of every rank and of the
        server spent meanwhile."""
        dist.barrier()
        server0, cpu0, t = _cpu_s(server_pid), time.process_time(), time.perf_counter()
        try:
            fn()
        except Exception as exc:  # a failed save (DCP's against moto at 1.5 GB, once) is reported, not fatal
            print(f"rank {rank}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            dist.barrier()
            return {"wall": None, "error": f"{type(exc).__name__}"}
        dist.barrier()
        wall, cpu, server = time.perf_counter() - t, time.process_time() - cpu0, _cpu_s(server_pid) - server0
        return {"wall": wall, "ranks_cpu": sum(D.all_gather_object(cpu)), "server_cpu": server}

    for i in range(rounds):
        tag = D.broadcast_object(uuid.uuid4().hex[:6] if rank == 0 else None, src=0)
        url = f"s3://{bucket}/ours-{tag}"
        path = f"s3://{bucket}/dcp{threads[-1]}-{tag}"  # DCP's load reads the checkpoint of the last thread count
        r: dict = {}
        cfg = CheckpointConfig(staging_dir=f"{tmp}/stage{i}" if staging else None, on_preemption=False)
        mgr = CheckpointManager(url, model, opt, sched, config=cfg)

        def ours_save(mgr: Any = mgr) -> None:
            mgr.save(["periodic"])
            mgr.wait()  # committed on the bucket

        def dcp_save(n: int, tag: str = tag) -> None:
            where = f"s3://{bucket}/dcp{n}-{tag}"
            dcp.save(state, storage_writer=FsspecWriter(where, thread_count=n, sync_files=False, **storage))

        # interleaved, the order reversed every round: neither writer always runs on a server that just worked
        order = [("ours_save", ours_save)] + [(f"dcp_save_{n}", lambda n=n: dcp_save(n)) for n in threads]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            r[name] = timed(fn)
        mgr.close()
        fresh = CheckpointConfig(staging_dir=f"{tmp}/fresh{i}" if staging else None, on_preemption=False)
        mgr = CheckpointManager(url, model, opt, sched, config=fresh)

        def ours_load(mgr: Any = mgr) -> None:
            mgr.resume("latest")  # from the bucket in place: each rank's ranges and verification share

        def dcp_load(path: str = path) -> None:
            dcp.load(state, storage_reader=FsspecReader(path, **storage))

        order = [("ours_load", ours_load), ("dcp_load", dcp_load)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            r[name] = timed(fn)
        mgr.close()
        res["rounds"].append(r)
        if rank == 0:  # moto holds every object in memory: empty the bucket between rounds
            s3 = S3Store(bucket)
            for prefix in (f"ours-{tag}/", *(f"dcp{n}-{tag}/" for n in threads)):
                s3.delete([o["key"] for o in s3.list(prefix)[0]])
        print(f"rank {rank} round {i}: " + ", ".join(f"{k} {v['wall']} s" for k, v in r.items()), flush=True)
        dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    D.teardown()
    os._exit(0)


def run(
    mb: float,
    ranks: int,
    bucket: str,
    endpoint: str,
    threads: list[int],
    staging: bool,
    rounds: int,
    server_pid: int,
    dcp_crc: bool = False,
) -> dict:
    import json

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/r.json"
        port = _free_port()
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(
                target=_worker,
                args=(r, ranks, port, mb, bucket, endpoint, threads, out, staging, rounds, server_pid, dcp_crc),
            )
            for r in range(ranks)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(3600)
        if not Path(out).exists():
            raise RuntimeError(f"the {ranks}-rank run of {mb} MB failed (exit codes {[p.exitcode for p in procs]})")
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> None:
    import statistics

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[1.0, 100.0], help="model weights, MB (fp32)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ours, DCP, DCP, ours, ...): medians")
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[4, 8, 16],
        help="DCP FsspecWriter thread_counts to try (each round saves with each; the table shows the fastest)",
    )
    ap.add_argument("--dcp-crc", action="store_true", help="leave botocore's per-request CRC32 on for DCP")
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
                "DCP fsspec (fastest thread_count): save",
                "save ratio",
                "ours: resume",
                "DCP: load",
            ]
        ]
        cpu_rows = [
            [
                "state",
                "ranks",
                "save ratio per round",
                "DCP save by thread_count (median)",
                "ours: ranks' CPU / server's CPU",
                "DCP (fastest): ranks' CPU / server's CPU",
                "resume: ours, ranks' / server's CPU",
                "load: DCP, ranks' / server's CPU",
            ]
        ]
        for mb in args.sizes_mb:
            for ranks in args.ranks:
                r = run(mb, ranks, bucket, endpoint, args.threads, args.staging, args.rounds, proc.pid, args.dcp_crc)
                b = r["bytes"]

                def med(name: str, what: str = "wall", r: dict = r) -> float:
                    xs = [x[name][what] for x in r["rounds"] if x[name]["wall"] is not None]
                    return statistics.median(xs) if xs else float("nan")

                def speed(s: float, b: float = b) -> str:
                    return f"{s:.2f} s ({b / s / 1e6:.0f} MB/s)"

                by_threads = {n: med(f"dcp_save_{n}") for n in args.threads}
                best = min(args.threads, key=lambda n: (by_threads[n] != by_threads[n], by_threads[n]))
                dcp_best = f"dcp_save_{best}"
                rows.append(
                    [
                        fmt_bytes(b),
                        ranks,
                        speed(med("ours_save")),
                        f"{speed(med(dcp_best))}, {best} threads",
                        f"{med(dcp_best) / med('ours_save'):.2f}x",
                        speed(med("ours_load")),
                        speed(med("dcp_load")),
                    ]
                )

                def ratio(x: dict, best: str = dcp_best) -> str:
                    if x[best]["wall"] is None or x["ours_save"]["wall"] is None:
                        return "failed"
                    return f"{x[best]['wall'] / x['ours_save']['wall']:.2f}x"

                failed = {n: sum(x[f"dcp_save_{n}"]["wall"] is None for x in r["rounds"]) for n in args.threads}
                cpu_rows.append(
                    [
                        fmt_bytes(b),
                        ranks,
                        " ".join(ratio(x) for x in r["rounds"]),
                        ", ".join(
                            f"{n}: {by_threads[n]:.2f} s" + (f" ({failed[n]} failed)" if failed[n] else "")
                            for n in args.threads
                        ),
                        f"{med('ours_save', 'ranks_cpu'):.2f} s / {med('ours_save', 'server_cpu'):.2f} s",
                        f"{med(dcp_best, 'ranks_cpu'):.2f} s / {med(dcp_best, 'server_cpu'):.2f} s",
                        f"{med('ours_load', 'ranks_cpu'):.2f} s / {med('ours_load', 'server_cpu'):.2f} s",
                        f"{med('dcp_load', 'ranks_cpu'):.2f} s / {med('dcp_load', 'server_cpu'):.2f} s",
                    ]
                )
                print(rows[-1], cpu_rows[-1], flush=True)
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
    crc = (
        "botocore's default per-request CRC32 left on"
        if args.dcp_crc
        else "botocore's per-request CRC32 off (`request_checksum_calculation='when_required'` in s3fs's "
        "`config_kwargs`, as ours)"
    )
    body = f"""## Save and resume on S3 against DCP's fsspec writer (`tools/bench_s3.py`)

{machine()} ({load}: a shared machine, so
the numbers are noisy); one local S3 server (moto on 127.0.0.1) for both writers, in one run. Ours: the manager on
an `s3://` run {how} (rank 0 committing on the bucket once every rank reported: `save()` then
`wait()`); resume = a new manager {fresh}
(listing, then each rank reads in place from the bucket). DCP: `dcp.save` with `FsspecWriter(thread_count=n,
sync_files=False)` over s3fs ({crc}) for each n in {args.threads} (the table shows the fastest), and `dcp.load` with
`FsspecReader` (of the checkpoint saved with {args.threads[-1]} threads). {args.rounds} rounds per row,
interleaved (ours then DCP, then DCP then ours, ...), the bucket emptied between rounds: each figure is the median
of its rounds. The save ratio is DCP's median time over ours (higher: ours faster). moto keeps objects in memory and
is not a speed reference: compare the columns, not with other numbers. Our resume: each rank fetches with ranged
GETs (8 in flight) exactly the byte ranges its restore needs plus its verification share (the files it wrote,
checksummed), and restores from those bytes; nothing is copied to local disk.

{table(rows)}

Where the time goes: the CPU seconds every rank (together) and the moto server used during each save, resume and
load (medians over the rounds; the machine has {os.cpu_count()} cores for the ranks and the server together), and
each round's save ratio.

{table(cpu_rows)}
"""
    write_section("s3", body, args.out)
    print(f"wrote the s3 section of {args.out}")


if __name__ == "__main__":
    main()
