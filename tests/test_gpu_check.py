"""tools/gpu_check.py: without a GPU every check is skipped, saying why, and nothing is written; with one (marker
``gpu``) each check must pass. The CPU rehearsal of the same checks is ``slow``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "gpu_check.py"


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHECKS = list(_tool().CHECKS)


def test_without_a_gpu_every_check_is_skipped_and_nothing_is_written(tmp_path):
    out = tmp_path / "gpu.md"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, even on a machine that has one
    res = subprocess.run(
        [sys.executable, str(TOOL), "--json", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert [r["name"] for r in report["results"]] == CHECKS and len(CHECKS) == 7
    for r in report["results"]:
        assert r["status"] == "skipped" and r["detail"].startswith("no CUDA device"), r
    assert not out.exists() and "left as is" in res.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (python tools/gpu_check.py)")
@pytest.mark.parametrize("name", CHECKS)
def test_gpu_check(name):
    [result] = _tool().run_checks([name], "cuda")
    assert result["status"] == "passed", result["detail"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CHECKS)
def test_the_checks_rehearsed_on_the_cpu(name):
    [result] = _tool().run_checks([name], "cpu")
    assert result["status"] == "passed", result["detail"]
