"""The examples in docs/examples/ that the integration tests do not run: a plain DDP loop under torchrun (2 ranks)
and a DeepSpeed engine (slow: DeepSpeed builds its CPU communication op on first use). hf_trainer.py,
accelerate_loop.py, lightning_module.py and pytorch_accelerated_trainer.py run in tests/test_integration_*.py."""

from __future__ import annotations

import json

import pytest

from integration_helpers import EXAMPLES, checkpoints, child_env, finish, start, torchrun

pytestmark = pytest.mark.distributed


def test_plain_torchrun_loop_on_two_ranks(tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "log"
    finish(
        start([*torchrun(2), str(EXAMPLES / "plain_torchrun.py"), "--run-dir", str(run), "--every-steps", "10"], log),
        log,
    )
    assert checkpoints(run) == [
        "step-000000010-periodic",
        "step-000000018-pre-decay",
        "step-000000020-periodic",
        "step-000000024-post-decay+final",
    ]
    trainer = json.loads(
        (run / "checkpoints" / "step-000000018-pre-decay" / "train_state" / "trainer.json").read_text()
    )
    assert trainer["data"] == {"index": 18, "seed": 0}  # the data position, through data=
    manifest = json.loads((run / "checkpoints" / "step-000000024-post-decay+final" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["layout"]["engine"] == "ddp"


@pytest.mark.slow
def test_deepspeed_engine_on_two_ranks(tmp_path):
    pytest.importorskip("deepspeed")
    run, log = tmp_path / "run", tmp_path / "log"
    cmd = [*torchrun(2), str(EXAMPLES / "deepspeed_engine.py"), "--run-dir", str(run)]
    finish(start(cmd, log, child_env(DS_ACCELERATOR="cpu")), log, timeout=600)
    # 12 updates of 2 micro-batches each; maybe_save() is called on every micro-batch and saves once per point
    assert checkpoints(run) == ["step-000000009-pre-decay", "step-000000012-post-decay+final"]
    manifest = json.loads((run / "checkpoints" / "step-000000012-post-decay+final" / "manifest.json").read_text())
    assert manifest["layout"]["engine"] == "deepspeed" and manifest["layout"]["zero_stage"] == 2


def test_importing_the_package_and_its_integrations_imports_no_framework():
    # the frameworks are optional extras: `import wsd_pretrain` (and the integrations package, and compat) must work
    # without them and must not pay for them
    import subprocess
    import sys

    code = (
        "import sys, wsd_pretrain, wsd_pretrain.integrations, wsd_pretrain.compat, wsd_pretrain.checkpoint\n"
        "heavy = ('transformers', 'accelerate', 'lightning', 'pytorch_lightning', 'pytorch_accelerated', 'deepspeed')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
