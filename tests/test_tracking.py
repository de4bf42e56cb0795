"""Experiment tracking in the main job (issue 20, item 5): TensorBoard event files and an offline W&B run beside
metrics.jsonl, read back with TensorBoard's own reader and from W&B's own run file. One tiny single-process run in
this process (``wsd_pretrain.train.main``); rank 0 alone writing is checked in tests/test_train.py's 2-rank run."""

from __future__ import annotations

import glob
import json
import socket
import struct
import sys
from pathlib import Path

import pytest

from wsd_pretrain import train
from wsd_pretrain.checkpoint.format import disk_usage
from wsd_pretrain.config import load_config
from wsd_pretrain.errors import ConfigError
from wsd_pretrain.tracking import PHASE_CODES, Tracker, TrackingConfig

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

SMALL = [
    "train.progress=false",
    "train.eval_every=6",
    "train.eval_batches=1",
    "train.micro_batch_size=2",
    "train.log_every=4",
    "data.max_bytes=200000",
    "data.seq_len=32",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.max_seq_len=32",
]
TRACK = ["tracking.tensorboard=true", "tracking.wandb={project: wsd-test, name: tiny, tags: [t1], mode: offline}"]


def wandb_records(path: Path) -> list:
    """The records of a .wandb run file (W&B's own protobuf records in LevelDB's log format, after a 7-byte
    ``:W&B`` header: 32 KiB blocks of chunks, each with a 7-byte header: crc32c, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, chunks, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # the zero padding at a block's end
            pos += left
            continue
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            chunks.append(payload)
        elif kind == 2:  # first
            buf = payload
        elif kind == 3:  # middle
            buf += payload
        elif kind == 4:  # last
            chunks.append(buf + payload)
            buf = b""
    records = []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A 12-update WSD run with TensorBoard and an offline W&B run; no socket leaves this host meanwhile."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("WANDB_API_KEY", raising=False)
    remote: list = []
    real_connect = socket.socket.connect

    def connect(self, address):  # every connection this process opens: only loopback and unix sockets
        if self.family not in (socket.AF_INET, socket.AF_INET6) or address[0] in ("127.0.0.1", "::1", "localhost"):
            return real_connect(self, address)
        remote.append(address)
        raise OSError(f"test: no network ({address})")

    mp.setattr(socket.socket, "connect", connect)
    run_dir = tmp_path_factory.mktemp("track") / "run"
    try:
        code = train.main(["--run-dir", str(run_dir), "--total-steps", "12", *SMALL, *TRACK])
    finally:
        mp.undo()
    assert code == 0
    assert remote == [], f"the offline run tried the network: {remote}"
    return run_dir


def test_tensorboard_events_hold_the_metrics_the_schedule_and_the_checkpoints(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    assert len(glob.glob(str(tracked_run / "tensorboard" / "events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()

    def series(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in acc.Scalars(tag)}

    records = [json.loads(line) for line in (tracked_run / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if "loss" in r]
    assert [r["step"] for r in updates] == list(range(1, 13))
    assert series("train/loss") == pytest.approx({r["step"]: r["loss"] for r in updates})
    assert series("train/phase") == {r["step"]: PHASE_CODES[r["phase"]] for r in updates}
    assert set(series("train/phase").values()) == {0, 1, 2}
    assert series("train/tokens") == {r["step"]: r["tokens"] for r in updates}
    # tokens/s at the log_every steps and the last one, as metrics.jsonl has them
    assert series("train/tokens_per_s") == pytest.approx(
        {r["step"]: r["tokens_per_s"] for r in updates if "tokens_per_s" in r}
    )
    assert sorted(series("train/tokens_per_s")) == [4, 8, 12]
    assert all(v > 0 for v in series("train/tokens_per_s").values())
    # the LR each update used is the schedule's at the position it started from
    job = train.resolve_job(load_config(tracked_run / "config.yaml"))
    lr = series("train/lr")
    for r in updates:
        assert lr[r["step"]] == pytest.approx(job.optimizer.lr * job.schedule.factor(r["position"] - 1), rel=1e-6)
    assert min(lr.values()) < 0.5 * job.optimizer.lr  # the decay is on the curve
    assert sorted(series("eval/loss")) == [6, 12]
    # the decay points, marked on the LR curve where the checkpoints were written
    ckpts = {p.name: p for p in (tracked_run / "checkpoints").glob("step-*")}
    ((pre_name, pre),) = [(n, p) for n, p in ckpts.items() if "pre-decay" in n]
    ((post_name, post),) = [(n, p) for n, p in ckpts.items() if "post-decay" in n]
    at_pre, at_post = int(pre_name[5:14]), int(post_name[5:14])
    assert at_post == 12 and 1 < at_pre < 12
    assert series("lr/pre-decay") == {at_pre: lr[at_pre]} and lr[at_pre] == pytest.approx(job.optimizer.lr)
    assert series("lr/post-decay") == {at_post: lr[at_post]} and lr[at_post] < lr[at_pre]
    # every checkpoint: its bytes on disk, how long it took, its kinds
    assert series("checkpoint/bytes") == {at_pre: disk_usage(pre), at_post: disk_usage(post)}
    assert all(v > 10_000 for v in series("checkpoint/bytes").values())
    assert sorted(series("checkpoint/seconds")) == [at_pre, at_post]
    assert all(v > 0 for v in series("checkpoint/seconds").values())
    texts = {e.step: make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors("checkpoint/kind/text_summary")}
    assert sorted(texts) == [at_pre, at_post]
    assert texts[at_pre].startswith(f"pre-decay: {pre_name}") and texts[at_post].startswith(
        f"post-decay+final: {post_name}"
    )


def test_wandb_offline_run_holds_the_same_history(tracked_run):
    (path,) = glob.glob(str(tracked_run / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = wandb_records(Path(path))
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].project == "wsd-test" and runs[0].display_name == "tiny" and list(runs[0].tags) == ["t1"]
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records), "finished cleanly"
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    updates = [json.loads(line) for line in (tracked_run / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in updates if "loss" in r]
    logged = {h["step"]: h for h in history if "train/loss" in h}
    assert sorted(logged) == list(range(1, 13))
    for r in updates:
        h = logged[r["step"]]
        assert h["train/loss"] == pytest.approx(r["loss"]) and h["train/lr"] == pytest.approx(r["lr"])
        assert h["train/phase"] == PHASE_CODES[r["phase"]] and h["train/tokens"] == r["tokens"]
        assert ("train/tokens_per_s" in h) == ("tokens_per_s" in r)
    saves = {h["checkpoint/name"]: h for h in history if "checkpoint/bytes" in h}
    ckpts = {p.name: p for p in (tracked_run / "checkpoints").glob("step-*")}
    assert sorted(saves) == sorted(ckpts)
    for name, h in saves.items():
        assert h["checkpoint/bytes"] == disk_usage(ckpts[name]) and h["checkpoint/seconds"] > 0
        assert h["checkpoint/kind"] == name.split("-", 2)[2] and h["step"] == int(name[5:14])
    assert any("lr/pre-decay" in h for h in history) and any("lr/post-decay" in h for h in history)


def test_tracking_config_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown key 'tensorbord'.*did you mean 'tensorboard'"):
        train.resolve_job({"tracking": {"tensorbord": True}})
    with pytest.raises(ConfigError, match=r"wandb: unknown key 'projekt'"):
        train.resolve_job({"tracking": {"wandb": {"projekt": "x"}}})
    with pytest.raises(ConfigError, match=r"wandb.mode='offlne'.*offline"):
        train.resolve_job({"tracking": {"wandb": {"mode": "offlne"}}})
    with pytest.raises(ConfigError, match=r"wandb.tags=.*a list of strings"):
        train.resolve_job({"tracking": {"wandb": {"tags": "a"}}})
    # wandb not installed: refused when the job is resolved (before any process group, data or model)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"wandb package is not installed.*wsd_pretrain\[tracking\]"):
        train.resolve_job({"tracking": {"wandb": {"project": "x"}}})
    code = train.main(["--run-dir", str(tmp_path / "r"), "tracking.wandb={project: x}", *SMALL])
    assert code == 2 and not (tmp_path / "r").exists()


def test_a_tracker_that_raises_is_dropped_with_a_warning_or_stops_the_job(tmp_path, caplog):
    record = {"step": 1, "loss": 1.0, "lr": 0.1, "phase": "warmup", "tokens": 64}
    import shutil

    def broken(run_dir: Path, **kw) -> Tracker:
        """A tracker whose event folder became a file: its writer cannot reopen it, add_scalar raises."""
        tracker = Tracker(TrackingConfig(tensorboard=True, **kw), run_dir, active=True)
        tracker._tb.close()
        shutil.rmtree(run_dir / "tensorboard")
        (run_dir / "tensorboard").write_text("not a folder")
        return tracker

    tracker = broken(tmp_path / "a")
    tracker.log_update(record)  # warned, dropped; training goes on
    assert not tracker.active and "tensorboard is off for the rest of this run" in caplog.text
    tracker.close()
    stop = broken(tmp_path / "b", on_error="stop")
    with pytest.raises(OSError):
        stop.log_update(record)
    stop.close()
    # another rank's tracker writes nothing
    Tracker(TrackingConfig(tensorboard=True), tmp_path / "c", active=False).log_update(record)
    assert not (tmp_path / "c").exists()


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_preempted_async_run_and_a_failing_run_close_their_trackers(tmp_path, monkeypatch):
    """The other exit paths: a preemption (SIGUSR1, as SLURM sends) with async saves, whose checkpoint is reported
    once its writer committed it; and an error mid-run, after which the events written so far are on disk."""
    import os
    import signal

    from tensorboard.util.tensor_util import make_ndarray

    from wsd_pretrain.checkpoint.manager import CheckpointManager

    real = CheckpointManager.maybe_save
    state = {"signal_at": 5, "raise_at": None}

    def maybe_save(self):
        out = real(self)
        if self.scheduler.last_epoch == state["signal_at"]:
            os.kill(os.getpid(), signal.SIGUSR1)
        if self.scheduler.last_epoch == state["raise_at"]:
            raise RuntimeError("a fault mid-run")
        return out

    monkeypatch.setattr(CheckpointManager, "maybe_save", maybe_save)
    run_dir = tmp_path / "pre"
    # flushed only by the close on each exit path (not by the writer's timer)
    args = [
        "--total-steps",
        "12",
        *SMALL,
        "tracking.tensorboard=true",
        "tracking.flush_seconds=600",
        "checkpoint.async_save=true",
    ]
    assert train.main(["--run-dir", str(run_dir), *args]) == 0
    (ckpt,) = (run_dir / "checkpoints").glob("step-*-preempt")
    step = int(ckpt.name[5:14])
    acc = _events(run_dir)
    assert sorted(e.step for e in acc.Scalars("train/loss")) == list(range(1, step + 1))
    ((at, nbytes),) = [(e.step, e.value) for e in acc.Scalars("checkpoint/bytes")]
    assert (at, nbytes) == (step, disk_usage(ckpt))
    (seconds,) = [e.value for e in acc.Scalars("checkpoint/seconds")]
    (blocked,) = [e.value for e in acc.Scalars("checkpoint/blocked_seconds")]
    assert seconds > 0 and blocked >= 0
    (text,) = [make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors("checkpoint/kind/text_summary")]
    assert text.startswith(f"preempt: {ckpt.name}")
    # an error mid-run: the job raises; the events up to it are on disk and the W&B run was finished as failed
    state.update(signal_at=None, raise_at=3)
    failed = tmp_path / "failed"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.raises(RuntimeError, match="a fault mid-run"):
        train.main(["--run-dir", str(failed), *args, "tracking.wandb={project: wsd-test}"])
    assert sorted(e.step for e in _events(failed).Scalars("train/loss")) == [1, 2, 3]
    (path,) = glob.glob(str(failed / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = wandb_records(Path(path))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [1], kinds
    history = [r for r in records if r.WhichOneof("record_type") == "history"]
    assert len(history) == 3
