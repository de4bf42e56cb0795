"""What moto's server charges for each request shape, and the fastest any writer could save on this machine.

One local moto server (127.0.0.1; with ``--in-memory`` a second one with ``MOTO_S3_DEFAULT_KEY_BUFFER_SIZE`` large,
so that objects stay in memory instead of being spooled to a temp file past 5 MiB) gets, shape by shape and
interleaved between the servers, the same bytes as: single PUTs of each ``--put-mb``; multipart uploads of
``--object-mb`` objects in parts of each ``--part-mib`` (4 in flight, ``CompleteMultipartUpload`` included); and,
for the resume, whole-object GETs and ranged GETs of ``--range-mib`` (moto reads the whole object for each range).
For each shape: the server's and this client's CPU seconds per GB (from /proc and ``process_time``; the client is
boto3 with botocore's per-request CRC32 off, as ours and DCP's in ``tools/bench_s3.py``), and the **floor**: the
lowest wall time any writer sending ``--state-gb`` in that shape could reach on this machine's cores, with the
server and the ranks sharing them perfectly: ``state x (server + client CPU per GB) / cores``. A real writer also
serializes and hashes its tensors, so the floor is optimistic. Rewrites the ``s3-floor`` section of
docs/benchmarks.md (inside the S3 section).

    python tools/bench_s3_floor.py --in-memory
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import add_out_argument, machine, table, write_section
from bench_s3 import KEYS, _cpu_s, start_server

MB, MIB = 1_000_000, 1 << 20
IN_MEMORY = {"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(4 << 30)}
"""moto keeps an object in a SpooledTemporaryFile of this many bytes before it spills to disk (default 5 MiB)."""


def _client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    settings: dict[str, Any] = {"max_pool_connections": 32}
    try:
        config = Config(**settings, request_checksum_calculation="when_required")
    except TypeError:  # an older botocore sends no per-request checksum anyway
        config = Config(**settings)
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
        config=config,
    )


def _shapes(args: argparse.Namespace) -> list[tuple[str, str, int, int]]:
    """``(label, kind, object bytes, request bytes)``: kind is put, multipart, get or ranged."""
    obj = int(args.object_mb * MB)
    out = [(f"PUT, one per {n:g} MB object", "put", int(n * MB), int(n * MB)) for n in args.put_mb]
    out += [
        (f"multipart, {p:g} MiB parts of a {args.object_mb:g} MB object", "multipart", obj, int(p * MIB))
        for p in args.part_mib
    ]
    out.append((f"GET of a whole {args.object_mb:g} MB object", "get", obj, obj))
    out.append(
        (
            f"ranged GETs of {args.range_mib:g} MiB of a {args.object_mb:g} MB object",
            "ranged",
            obj,
            int(args.range_mib * MIB),
        )
    )
    return out


def measure(c: Any, bucket: str, kind: str, obj: int, req: int, total: int, data: bytes, server_pid: int) -> dict:
    """Send (or read back) about ``total`` bytes in this shape: wall, server and client CPU seconds per GB."""
    count = max(1, math.ceil(total / obj))
    keys = [f"{kind}-{req}-{uuid.uuid4().hex[:8]}-{i}" for i in range(count)]
    body = data[:obj]
    pieces = [(i + 1, data[a : min(obj, a + req)]) for i, a in enumerate(range(0, obj, req))]
    if kind in ("get", "ranged"):  # the objects to read are written first, outside the measurement
        for key in keys:
            c.put_object(Bucket=bucket, Key=key, Body=body)
    pool = ThreadPoolExecutor(4)

    def put(key: str) -> None:
        c.put_object(Bucket=bucket, Key=key, Body=body)

    def multipart(key: str) -> None:
        upload = c.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]

        def part(p: tuple[int, bytes]) -> dict:
            r = c.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=p[0], Body=p[1])
            return {"PartNumber": p[0], "ETag": r["ETag"]}

        parts = list(pool.map(part, pieces))
        c.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})

    def get(key: str) -> None:
        got = c.get_object(Bucket=bucket, Key=key)["Body"].read()
        if len(got) != obj:
            raise RuntimeError(f"{key}: {len(got)} bytes read back, {obj} written")

    def ranged(key: str) -> None:
        def one(a: int) -> int:
            r = c.get_object(Bucket=bucket, Key=key, Range=f"bytes={a}-{min(obj, a + req) - 1}")
            return len(r["Body"].read())

        if sum(pool.map(one, range(0, obj, req))) != obj:
            raise RuntimeError(f"{key}: the ranges read back do not add up to {obj} bytes")

    fn = {"put": put, "multipart": multipart, "get": get, "ranged": ranged}[kind]
    server0, client0, t0 = _cpu_s(server_pid), time.process_time(), time.perf_counter()
    if kind == "put":
        list(pool.map(fn, keys))  # several single PUTs in flight, as DCP's writer threads send them
    else:
        for key in keys:
            fn(key)
    wall, client, server = time.perf_counter() - t0, time.process_time() - client0, _cpu_s(server_pid) - server0
    pool.shutdown()
    if kind in ("put", "multipart"):
        heads = [c.head_object(Bucket=bucket, Key=k)["ContentLength"] for k in keys]
        if heads != [obj] * count:
            raise RuntimeError(f"{kind}: objects of {heads} bytes stored, {obj} sent")
    c.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]})
    gb = count * obj / 1e9
    return {"wall": wall, "server": server / gb, "client": client / gb, "mbps": gb * 1e3 / wall}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--put-mb", type=float, nargs="+", default=[8, 16, 47, 192], help="single PUT object sizes")
    ap.add_argument("--part-mib", type=float, nargs="+", default=[8, 16, 64], help="multipart part sizes")
    ap.add_argument("--object-mb", type=float, default=192, help="object size for multipart uploads and GETs")
    ap.add_argument("--range-mib", type=float, default=64, help="ranged GET size (a resume's pieces)")
    ap.add_argument("--total-mb", type=float, default=384, help="bytes per shape and round (at least one object)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (the shapes interleaved in each): medians")
    ap.add_argument("--state-gb", type=float, default=1.5, help="the save the floor is computed for")
    ap.add_argument("--in-memory", action="store_true", help="also a server that keeps objects in memory")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    shapes = _shapes(args)
    data = os.urandom(int(max([args.object_mb, *args.put_mb]) * MB))
    servers = [("spooled", {})] + ([("in memory", IN_MEMORY)] if args.in_memory else [])
    started = [start_server(env=env) for _, env in servers]
    load_before = os.getloadavg()[0]
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        bucket = f"floor-{uuid.uuid4().hex[:8]}"
        clients = [_client(endpoint) for _, endpoint in started]
        for c in clients:
            c.create_bucket(Bucket=bucket)
        for i in range(args.rounds):
            order = shapes if i % 2 == 0 else shapes[::-1]
            for label, kind, obj, req in order:
                for (name, _), (proc, _), c in zip(servers, started, clients):
                    r = measure(c, bucket, kind, obj, req, int(args.total_mb * MB), data, proc.pid)
                    results.setdefault((label, name), []).append(r)
            print(f"round {i} done", flush=True)
    finally:
        for proc, _ in started:
            proc.terminate()
            proc.wait(10)
    cores = os.cpu_count() or 1
    rows = [
        [
            "request shape",
            "server",
            "server CPU per GB",
            "client CPU per GB",
            "speed (4 in flight)",
            f"floor for {args.state_gb:g} GB on {cores} cores",
        ]
    ]
    for label, kind, _, _ in shapes:
        for name, _ in servers:
            rs = results[(label, name)]
            server, client = (statistics.median(r[k] for r in rs) for k in ("server", "client"))
            mbps = statistics.median(r["mbps"] for r in rs)
            floor = f"{args.state_gb * (server + client) / cores:.2f} s" if kind in ("put", "multipart") else ""
            rows.append([label, name, f"{server:.2f} s", f"{client:.2f} s", f"{mbps:.0f} MB/s", floor])
    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    body = f"""### What moto charges per request shape (`tools/bench_s3_floor.py`)

`python tools/bench_s3_floor.py{" --in-memory" if args.in_memory else ""}`: {machine()}; {load}; {args.rounds} rounds, the shapes interleaved (reversed every other round){" and each sent to both servers in turn" if args.in_memory else ""}, about {args.total_mb:g} MB per shape and round; medians. Server CPU is
user + system seconds of the moto process per GB sent (or read back); client CPU is boto3's in the measuring
process. The floor is `{args.state_gb:g} GB x (server + client CPU per GB) / {cores} cores`: the lowest wall time any
writer sending that shape could reach here, with the server and the ranks sharing the cores perfectly and the
writer spending nothing on serializing or hashing. "spooled" is moto's default (an object past 5 MiB goes to a
temporary file); "in memory" sets `MOTO_S3_DEFAULT_KEY_BUFFER_SIZE` to 4 GiB.

{table(rows)}
"""
    write_section("s3-floor", body, args.out)
    print(table(rows))
    print(f"wrote the s3-floor section of {args.out}")


if __name__ == "__main__":
    main()
