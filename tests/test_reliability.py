"""The reliability suite's CI-sized subset (the full suite: ``python tools/reliability.py``, docs/reliability.md).

Real processes and real files throughout: 2-rank gloo jobs SIGKILLed mid-save, a file-size limit standing in for a
full disk, every file of a checkpoint damaged in turn, hostile checkpoints, torchrun restarting a killed worker,
SIGTERM to the launcher, and a second run on a directory in use."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import reliability as R

pytestmark = [pytest.mark.fault, pytest.mark.distributed]


@pytest.fixture(scope="module", autouse=True)
def _session_fork_server():
    """The 2-rank jobs fork their ranks from the session's fork server (tests/distributed_helpers.py), which has
    imported DeepSpeed and transformers too: started here first, so that the script's own smaller preload never
    becomes the server every later run_distributed test forks from."""
    from distributed_helpers import _context

    _context()


def _failures(trials: list[R.Trial]) -> list[str]:
    return [f"{t.case}: {t.detail}" for t in trials if not t.ok]


def test_sigkill_at_every_phase_of_a_save_loses_nothing(tmp_path):
    trials = R.kill_trials(tmp_path, n=6, seed=1, log=lambda s: None)
    assert len(trials) == 6
    assert not _failures(trials)
    assert sum(t.lost for t in trials) == 0
    aimed = {t.extra["aimed"] for t in trials if not t.extra["timed"]}
    assert aimed == {"staging", "shard writes", "manifest"}, aimed  # the kills aimed at protocol steps went there


def test_full_disk_stops_or_carries_on_and_keeps_older_checkpoints(tmp_path):
    trials = R.disk_trials(tmp_path, tmpfs=False, log=lambda s: None)
    assert len(trials) == 4
    assert not _failures(trials)


def test_every_kind_of_corrupt_file_is_named_and_fallback_resumes_the_previous(tmp_path):
    trials = R.corruption_trials(tmp_path, log=lambda s: None)
    assert len(trials) >= 20
    assert not _failures(trials)


def test_hostile_checkpoints_are_refused_without_reading_outside(tmp_path):
    trials = R.hostile_trials(tmp_path, log=lambda s: None)
    assert len(trials) == len(R.hostile_cases(tmp_path / "outside"))
    assert not _failures(trials)


@pytest.mark.slow  # four torchrun jobs (about two minutes here); `python tools/reliability.py` runs it too
def test_torchrun_restarts_a_killed_worker_and_sigterm_leaves_a_preempt_checkpoint(tmp_path):
    trials = R.elastic_trials(tmp_path, steps=20, victims=(1,), log=lambda s: None)
    trials += R.preemption_trials(tmp_path, steps=20, log=lambda s: None)
    assert not _failures(trials)


def test_a_second_run_on_a_directory_in_use_is_refused(tmp_path, capsys):
    # through the script's own entry point, its report written to a file of the test's (never docs/)
    report = tmp_path / "reliability.md"
    assert R.main(["--only", "lock", "--workdir", str(tmp_path / "work"), "--out", str(report)]) == 0
    text = report.read_text()
    assert "| two runs on one directory | 1 | 0 | 0 |" in text
    assert "- second training run on a run directory in use: ok" in text
    assert "lock: 1 trials, 0 failures" in capsys.readouterr().out


@pytest.mark.slow  # about 2.5 minutes here; the default suite runs the same paths in tests/test_object_storage.py
def test_object_storage_kills_restart_stale_listings_and_hostile_names(tmp_path):
    trials = R.s3_trials(tmp_path, log=lambda s: None)
    # the staging tier and the direct streaming save: kills, a server restart and stale listings on each
    assert len(trials) == len(R.S3_KILL_POINTS) + len(R.S3_DIRECT_KILL_POINTS) + 2 * (1 + 2) + 5
    assert sum("direct streaming" in t.case for t in trials) == len(R.S3_DIRECT_KILL_POINTS) + 1 + 2
    assert not _failures(trials)
    assert sum(t.lost for t in trials) == 0


@pytest.mark.slow  # 9 torchrun jobs, about 3.5 minutes here; the default suite: test_object_storage's rank kill
def test_object_storage_one_rank_of_a_torchrun_job_killed_mid_upload(tmp_path):
    trials = R.s3_rank_trials(tmp_path, log=lambda s: None)
    assert [t.case for t in trials] == [
        *(
            f"rank {v} of 2 SIGKILLed mid-upload, {'direct streaming' if m == 'direct' else 'staging tier'}"
            for m, v in R.S3_RANK_CASES
        ),
        "server stopped and restarted mid-upload, 2 ranks, direct streaming",
    ]
    assert not _failures(trials)
    assert sum(t.lost for t in trials) == 0


@pytest.mark.slow  # 6 torchrun jobs, about 3.5 minutes here; the default suite: test_object_storage's stopped server
def test_object_storage_server_that_stops_answering_mid_save(tmp_path):
    trials = R.hang_trials(tmp_path, log=lambda s: None)
    assert [t.case for t in trials] == [title for _, title in R.HANG_CASES]
    assert not _failures(trials)
    for t in trials[:2]:  # longer than the limit: both ranks raised the error, within the bound
        assert len(t.extra["errors"]) == 2 and max(t.extra["seconds"]) <= t.extra["bound"]
