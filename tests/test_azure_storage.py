"""Checkpoints on Azure Blob storage (``az://container/prefix``, checkpoint/azure_store.py) against a real Blob
service: Azurite on 127.0.0.1 (the ``azure_server`` fixture). The store's operations the commit protocol rests on
(conditional create, compare-and-swap, ranged reads, listings, deletes, staged-block uploads and their abort), then
the manager in a user's loop on an az:// run (save, verify, resume from the container alone) and `ckpt cp` from
Azure to S3 (moto) and back to a local run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_object_storage import CFG, _job, _step  # the same tiny job on either store

from wsd_pretrain.checkpoint import objstore, objstore_tier, storage
from wsd_pretrain.checkpoint.azure_store import AzureStore
from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager
from wsd_pretrain.checkpoint.safetensors_io import new_hasher
from wsd_pretrain.checkpoint.storage import ObjectURL, PreconditionFailed, parse_location
from wsd_pretrain.cli import main as cli
from wsd_pretrain.errors import CheckpointError, ConfigError


def _uncommitted(azure_server, container: str) -> list[str]:
    c = azure_server.service().get_container_client(container)
    committed = {b.name for b in c.list_blobs()}
    return sorted({b.name for b in c.list_blobs(include=["uncommittedblobs"])} - committed)


def test_azure_locations(monkeypatch):
    """az://container/prefix is an object URL; a bad container name or '..' is refused saying why; without any
    account settings the store says which variables to set."""
    assert parse_location("az://ckpt/runs/a/") == ObjectURL("az", "ckpt", "runs/a")
    for bad, says in (
        ("az://Bad_Name/a", "not a valid Azure container name"),
        ("az://a--b/a", "container"),
        ("az://ckpt/runs/../a", "'..'"),
    ):
        with pytest.raises(ConfigError, match=says):
            parse_location(bad)
    for k in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_SERVICE_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="AZURE_STORAGE_CONNECTION_STRING"):
        storage.store_for(parse_location("az://ckpt/runs/a"))


def test_azure_store_operations(azure_server, monkeypatch):
    """Each operation of the seam on the Blob service: a conditional create loses to an existing blob
    (PreconditionFailed, the S3 path's class; also on a staged upload's block-list commit); compare-and-swap on
    `latest` with a stale ETag loses; ranged reads; listings with and without the delimiter; deletes (a missing blob
    is no error); a staged upload of several blocks with our checksum on the way; an aborted one and the leftovers
    of an interrupted one leave no uncommitted blocks; a racing writer of a claimed name is refused; the lease's
    age is read on the service's clock."""
    monkeypatch.setattr(storage, "PART_SIZE", 1024 * 1024)
    container = azure_server.container()
    store = storage.store_for(parse_location(f"az://{container}/runs/a"))
    assert isinstance(store, AzureStore)

    etag = store.put("runs/a/x.json", b'{"a": 1}', if_none_match=True)
    with pytest.raises(PreconditionFailed, match=rf"az://{container}/runs/a/x.json: PUT: the precondition failed"):
        store.put("runs/a/x.json", b"again", if_none_match=True)
    assert store.get("runs/a/x.json") == (b'{"a": 1}', etag)
    assert store.head("runs/a/x.json") == {"size": 8, "etag": etag}
    assert store.head("runs/a/none") is None
    with pytest.raises(FileNotFoundError):
        store.get("runs/a/none")

    # compare-and-swap on latest: moves forward only, a stale ETag loses
    run = parse_location(f"az://{container}/runs/a")
    objstore.set_latest(store, run, "step-000000004-pre-decay")
    _, first = objstore.read_latest(store, run)
    objstore.set_latest(store, run, "step-000000006-post-decay+final")
    objstore.set_latest(store, run, "step-000000005-periodic")  # older: stays
    assert objstore.read_latest(store, run)[0] == "step-000000006-post-decay+final"
    with pytest.raises(PreconditionFailed):
        store.put((run / "checkpoints" / "latest").key, b"{}", if_match=first)

    # a staged upload of several blocks, hashed on the way; ranged reads; a create-only commit loses
    data = os.urandom(3 * 1024 * 1024 + 4321)
    w = store.writer("runs/a/big.bin", "xxh3_128", if_none_match=True)
    for i in range(0, len(data), 300_000):
        w.write(data[i : i + 300_000])
    h = new_hasher("xxh3_128")
    h.update(data)
    assert w.close() == (len(data), h.hexdigest())
    assert store.get("runs/a/big.bin")[0] == data
    assert store.get_range("runs/a/big.bin", 1_500_000, 10) == data[1_500_000:1_500_010]
    assert store.get_range("runs/a/big.bin", len(data) - 5, 100) == data[-5:]
    body, size = store.stream("runs/a/big.bin")
    assert size == len(data) and b"".join(body.iter_chunks(1_000_000)) == data
    w = store.writer("runs/a/big.bin", "xxh3_128", if_none_match=True)
    w.write(data)
    with pytest.raises(PreconditionFailed, match="PUT-BLOCK-LIST"):
        w.close()
    assert store.get("runs/a/big.bin")[0] == data  # untouched

    # aborted and interrupted staged uploads leave nothing behind
    w = store.writer("runs/a/dropped.bin", "xxh3_128")
    w.write(data)
    w.abort()
    assert store.head("runs/a/dropped.bin") is None
    w = store.writer("runs/a/checkpoints/step-000000009-periodic/left.bin", "xxh3_128")
    w.write(data)  # blocks staged, never committed nor aborted: a killed writer
    assert _uncommitted(azure_server, container) == ["runs/a/checkpoints/step-000000009-periodic/left.bin"]
    assert store.abort_uploads("runs/a/") == 1
    assert _uncommitted(azure_server, container) == []
    w._pool.shutdown()

    # listings and deletes
    objects, prefixes = store.list("runs/a/", delimiter="/")
    assert sorted(o["key"] for o in objects) == ["runs/a/big.bin", "runs/a/x.json"]
    assert prefixes == ["runs/a/checkpoints/"]
    assert {o["key"]: o["size"] for o in store.list("runs/a/")[0]}["runs/a/big.bin"] == len(data)
    store.delete(["runs/a/x.json", "runs/a/never-there"])
    store.delete(["runs/a/big.bin"])
    assert [o["key"] for o in store.list("runs/a/")[0]] == ["runs/a/checkpoints/latest"]

    # a claimed name refuses a second writer; the run lease's age is on the service's clock
    ckpt = run / "checkpoints" / "step-000000002-periodic"
    objstore._claim(store, ckpt, replace_unfinished=False)
    with pytest.raises(CheckpointError, match="another writer claimed this name"):
        objstore._claim(store, ckpt, replace_unfinished=False)
    lease = objstore_tier.Lease(run)
    try:
        with pytest.raises(CheckpointError, match=rf"in use by another run .*lease az://{container}/runs/a/"):
            objstore_tier.Lease(run)
        _, _, age = store.get_aged(lease.key, max_bytes=4096)
        assert -2 <= age < 60
    finally:
        lease.release()
    assert store.head(lease.key) is None


def test_manager_on_azure_and_cp(azure_server, s3_server, tmp_path, capsys, monkeypatch):
    """A user's loop on an az:// run (one process, through the staging tier): the checkpoints are committed on
    the container (manifest last, latest by CAS), `ckpt verify` passes on the URL; a new job with an empty staging
    folder resumes from the container alone (read in place: ranged downloads) and continues exactly like the job that was not stopped; `ckpt cp`
    copies the run from Azure to S3 and a checkpoint back to a local run, verified on the way."""
    container = azure_server.container()
    url = f"az://{container}/runs/a"
    model, opt, sched = _job()
    cfg = CheckpointConfig(every_steps=2, keep_last=2, staging_dir=str(tmp_path / "stage-a"), max_shard_size=60_000)
    mgr = CheckpointManager(url, model, opt, sched, config=cfg, hf_config=CFG.hf_config())
    for _ in range(4):
        _step(model, opt, sched)
        mgr.maybe_save()
    mgr.close()
    infos = objstore.list_run(parse_location(url))
    assert [(i.name, i.state, i.latest) for i in infos] == [
        ("step-000000002-periodic", "complete", False),
        ("step-000000004-pre-decay+periodic", "complete", True),
    ]
    assert _uncommitted(azure_server, container) == []
    assert cli(["ckpt", "verify", url]) == 0
    assert "OK" in capsys.readouterr().out

    model2, opt2, sched2 = _job(seed=1)
    cfg2 = CheckpointConfig(every_steps=100, staging_dir=str(tmp_path / "stage-b"), max_shard_size=60_000)
    mgr2 = CheckpointManager(url, model2, opt2, sched2, config=cfg2)
    ranged: list[tuple[str, int, int]] = []
    get_range = AzureStore.get_range
    monkeypatch.setattr(
        AzureStore,
        "get_range",
        lambda self, key, start, n: ranged.append((key, start, n)) or get_range(self, key, start, n),
    )
    assert mgr2.resume("auto") and sched2.position == 4
    assert any(k.endswith(".safetensors") for k, _, _ in ranged)  # read in place with ranged downloads
    monkeypatch.undo()
    for _ in range(2):
        _step(model, opt, sched)
        _step(model2, opt2, sched2)
    mgr2.close()
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n

    # Azure -> S3 (every object checked on the way), then S3 -> a local run that lists it as complete
    s3 = f"s3://{s3_server.bucket()}/runs/a"
    assert cli(["ckpt", "cp", url, s3]) == 0
    assert "2 checkpoint(s) copied" in capsys.readouterr().out
    assert [(i.name, i.state) for i in objstore.list_run(parse_location(s3))] == [(i.name, "complete") for i in infos]
    back = tmp_path / "back"
    assert cli(["ckpt", "cp", f"{s3}/checkpoints/step-000000004-pre-decay+periodic", str(back)]) == 0
    assert cli(["ckpt", "verify", str(back)]) == 0
    m = json.loads((back / "checkpoints" / "step-000000004-pre-decay+periodic" / "manifest.json").read_text())
    assert m["position"] == 4
    assert not any(p.name.startswith(("az:", "s3:")) for p in Path.cwd().iterdir())


def test_azure_service_that_stops_answering_fails_within_the_limit(azure_server, monkeypatch):
    """The same bounds as S3 through the same knob ($WSD_STORAGE_TIMEOUT_S here, a manager's storage_timeout_s):
    Azurite stopped (SIGSTOP: connections open, no answer) fails a request with StorageTimeout naming the blob,
    within a bound a hang would blow; a save's store then sends nothing more for that save (each request fails at
    once with the first error) and its writer's abort is tried once; once the service answers again, a store
    works."""
    import signal
    import time

    from wsd_pretrain.checkpoint.storage import StorageTimeout

    container = azure_server.container()
    monkeypatch.setenv(storage.TIMEOUT_ENV, "1")
    monkeypatch.setattr(storage, "PART_SIZE", 4096)
    store = AzureStore(container, save=True)
    store.put("a/x", b"1")
    w = store.writer("a/big", "xxh3_128")
    w.write(b"\0" * 4096)  # one block staged
    pid = azure_server.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageTimeout, match=r"az://.*/a/big: .*the object store stopped answering: no answer"):
            w.write(b"\0" * 8192)
            w.close()
        with pytest.raises(StorageTimeout, match=r"a/big"):  # the save's next request: refused at once
            store.put("a/y", b"2")
        assert time.monotonic() - t0 < 60  # 3 tries of 1 s and the backoffs: about 15 s at most; a hang, minutes
    finally:
        os.kill(pid, signal.SIGCONT)
    assert AzureStore(container).get("a/x")[0] == b"1"
