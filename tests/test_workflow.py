"""The WSD workflow as users run it with the main job (issue 22): cooldown and continuation from every pre-decay
checkpoint, decay data, changed settings on resume, and the errors a new user meets. The runs are single-process
and in this process (``wsd_pretrain.train.main``), on a very small model, so each takes about a second."""

from __future__ import annotations

import glob
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wsd_pretrain import train

SMALL = [
    "train.progress=false",
    "train.eval_every=null",
    "train.eval_batches=1",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "data.max_bytes=200000",
    "data.seq_len=32",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.max_seq_len=32",
]
MULTI = ["schedule.milestones=geometric", "schedule.num_milestones=3", "schedule.mode=wsd-s"]


@pytest.fixture
def out(capsys, caplog):
    """What a user sees of a command: its output and its log."""
    caplog.set_level(logging.INFO, logger="wsd_pretrain")

    def read() -> str:
        captured = capsys.readouterr()
        text = captured.out + captured.err + caplog.text
        caplog.clear()
        return text

    return read


def run(out, run_dir: Path, *args: str, rc: int = 0, overrides: tuple[str, ...] = ()) -> str:
    code = train.main(["--run-dir", str(run_dir), *args, *overrides, *SMALL])
    text = out()
    assert code == rc, text[-3000:]
    return text


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(str(ckpt / "model*.safetensors"))):
        out.update(load_file(f))
    return out


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def ckpts(run_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((run_dir / "checkpoints").glob("step-*"))}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 24-update WSD-S run with three milestones (a decay before each): its pre- and post-decay checkpoints."""
    run_dir = tmp_path_factory.mktemp("wf") / "base"
    code = train.main(["--run-dir", str(run_dir), "--total-steps", "24", *MULTI, *SMALL])
    assert code == 0
    return run_dir


def test_cooldown_and_continuation_from_every_pre_decay_checkpoint(base, tmp_path, out):
    found = ckpts(base)
    pre = sorted(n for n in found if "pre-decay" in n)
    post = sorted(n for n in found if "post-decay" in n)
    assert len(pre) == 3 and len(post) == 3, sorted(found)
    for pre_name, post_name in zip(pre, post):
        at = json.loads((found[pre_name] / "manifest.json").read_text())["position"]
        end = json.loads((found[post_name] / "manifest.json").read_text())["position"]
        # a cooldown from the pre-decay checkpoint, as long as the run's own decay, is that decay: bit for bit
        cool = tmp_path / f"cool-{at}"
        run(out, cool, "--cooldown-from", str(found[pre_name]), "--cooldown-steps", str(end - at))
        (final,) = [p for n, p in ckpts(cool).items() if "final" in n]
        assert final.name.startswith(f"step-{end:09d}")
        assert same_weights(final, found[post_name]), f"cooldown from {pre_name} differs from the run's own decay"
        steps = [m for m in metrics(cool) if "loss" in m]
        assert [m["position"] for m in steps] == list(range(at + 1, end + 1))
        assert {m["phase"] for m in steps} == {"decay"}
        # a continuation from it: the stable LR again (no re-warmup, no decay yet), a new decay at the new end
        cont = tmp_path / f"cont-{at}"
        run(out, cont, "--total-steps", str(at + 10), "--continue-from", str(found[pre_name]))
        steps = [m for m in metrics(cont) if "loss" in m]
        assert steps[0]["position"] == at + 1 and steps[0]["phase"] == "stable"
        assert steps[-1]["position"] == at + 10 and steps[-1]["phase"] == "decay"
        assert any("final" in n for n in ckpts(cont))


def test_continue_in_the_finished_runs_own_directory_names_run_dir(base, tmp_path, out, annealing_text):
    run_dir = tmp_path / "own"
    shutil.copytree(base, run_dir)
    pre = sorted(p for n, p in ckpts(run_dir).items() if "pre-decay" in n)[-1]
    err = run(out, run_dir, "--total-steps", "60", "--continue-from", str(pre), rc=2, overrides=MULTI)
    assert "--run-dir" in err and "new run" in err
    err = run(out, run_dir, "--total-steps", "30", rc=2, overrides=MULTI)  # a plain resume to a longer total
    assert "--continue-from" in err and "--total-steps N --run-dir" in err and "schedule.continued" not in err
    # other data on a plain resume: refused, naming the flag (in data:, or a decay_data: the run did not have)
    text = ("data.source=text", f"data.paths=[{annealing_text}]")
    err = run(out, run_dir, "--total-steps", "24", rc=2, overrides=(*MULTI, *text))
    assert "resume with the same data: section" in err and "--allow-data-change" in err
    err = run(out, run_dir, "--total-steps", "24", rc=2, overrides=(*MULTI, *_decay_data(annealing_text)))
    assert "had no decay_data: section" in err and "--allow-data-change" in err
    # rerunning the finished run: nothing to train, and no NaN in the done line
    err = run(out, run_dir, "--total-steps", "24", overrides=MULTI)
    assert "already finished" in err and "NaN" not in err and '"loss": null' in err


def test_replayed_steps_are_logged_once(base, tmp_path, out):
    """A run killed after step 24 but before its final save resumes from its last checkpoint (the pre-decay one at
    step 20-something) and trains the rest again: metrics.jsonl holds each step once."""
    run_dir = tmp_path / "killed"
    shutil.copytree(base, run_dir)
    names = sorted(ckpts(run_dir))
    shutil.rmtree(run_dir / "checkpoints" / names[-1])  # the final checkpoint was never written
    (run_dir / "checkpoints" / "latest").unlink(missing_ok=True)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"position": 24, "lo')  # the kill cut a line short
    run(out, run_dir, "--total-steps", "24", overrides=MULTI)
    steps = [m["position"] for m in metrics(run_dir) if "loss" in m]
    assert steps == list(range(1, 25))


def test_changed_optimizer_settings_on_resume(base, tmp_path, out):
    run_dir = tmp_path / "changed"
    shutil.copytree(base, run_dir)
    err = run(out, run_dir, "--total-steps", "24", rc=2, overrides=(*MULTI, "optimizer.lr=0.03"))
    assert "lr (param group 0): 0.003 -> 0.03" in err and "--allow-optimizer-change" in err
    err = run(out, run_dir, "--total-steps", "24", rc=2, overrides=(*MULTI, "optimizer.betas=[0.8,0.9]"))
    assert "betas (param group 0): [0.9, 0.95] -> [0.8, 0.9]" in err
    err = run(
        out,
        run_dir,
        "--total-steps",
        "24",
        "--allow-optimizer-change",
        overrides=(*MULTI, "optimizer.lr=0.03", "optimizer.eps=1.0e-6", "train.grad_clip=0.5"),
    )
    assert "lr (param group 0): 0.003 -> 0.03 (checkpoint -> this job) applied" in err
    assert "eps (param group 0): 1e-08 -> 1e-06 (checkpoint -> this job) applied" in err
    assert "grad_clip: 1.0 -> 0.5 (checkpoint -> this job) applied" in err


def test_new_user_errors_name_the_fix(tmp_path, out):
    err = run(out, tmp_path / "r", rc=2, overrides=("optimizer.lr=3e-4",))
    assert "lr='3e-4': expected float (YAML reads 3e-4 as a string: write 3.0e-4" in err
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "checkpoints").write_text("")
    err = run(out, tmp_path / "f", rc=2)
    assert "checkpoints (its checkpoints folder) is a file, not a folder" in err and "--run-dir" in err
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    err = run(out, tmp_path / "e", rc=2, overrides=("data.source=tokens", f"data.paths=[{empty}]"))
    assert f"{empty} is empty" in err and "cannot mmap" not in err


@pytest.fixture(scope="module")
def annealing_text(tmp_path_factory) -> Path:
    """Other data for the decays: text unlike the standard library's Python."""
    path = tmp_path_factory.mktemp("anneal") / "anneal.txt"
    words = ["warmup", "stable", "decay", "cooldown", "checkpoint", "anneal", "mixture", "quality"]
    path.write_text("\n".join(" ".join(words[(i * 7 + j) % 8] for j in range(i % 11 + 3)) for i in range(4000)))
    return path


def _decay_data(text: Path) -> tuple[str, ...]:
    return ("decay_data.source=text", f"decay_data.paths=[{text}]", "decay_data.seed=7")


def test_decay_data_switch_resumed_mid_decay_bitwise(tmp_path, annealing_text, out):
    """The run's own decays read decay_data (switched at each pre-decay point); a run stopped inside a decay resumes
    to the same final weights, bit for bit, and its checkpoints record which data each phase read."""
    full = tmp_path / "full"
    run(out, full, "--total-steps", "24", "--save-every", "22", overrides=(*MULTI, *_decay_data(annealing_text)))
    steps = [m for m in metrics(full) if "loss" in m]
    assert [m["data"] for m in steps] == ["decay" if m["phase"] == "decay" else "main" for m in steps]
    assert {m["data"] for m in steps} == {"main", "decay"}
    found = ckpts(full)
    (mid,) = [p for n, p in found.items() if "periodic" in n]
    state = json.loads((mid / "train_state" / "trainer.json").read_text())["data"]
    decay_updates = sum(1 for m in steps if m["data"] == "decay" and m["position"] <= 22)
    assert state["decay"]["samples_seen"] == decay_updates * 2  # micro batch 2, one rank
    assert state["decay"]["data"]["source"] == "text" and state["decay"]["data"]["paths"] == [str(annealing_text)]
    assert state["data"]["source"] == "stdlib" and state["samples_seen"] == (22 - decay_updates) * 2
    # stopped inside the last decay (after its checkpoint at 22): the resumed run ends on the same weights
    stopped = tmp_path / "stopped"
    shutil.copytree(full, stopped)
    (final,) = [n for n in found if "final" in n]
    shutil.rmtree(stopped / "checkpoints" / final)
    run(out, stopped, "--total-steps", "24", overrides=(*MULTI, *_decay_data(annealing_text)))
    assert same_weights(ckpts(stopped)[final], found[final])
    # another decay_data on a plain resume: refused, naming the flag; with the flag it starts at its beginning
    shutil.rmtree(stopped / "checkpoints" / final)
    other = ("decay_data.source=text", f"decay_data.paths=[{annealing_text}]", "decay_data.seed=8")
    err = run(out, stopped, "--total-steps", "24", rc=2, overrides=(*MULTI, *other))
    assert "decay_data: is text" in err and "--allow-data-change" in err
    run(out, stopped, "--total-steps", "24", "--allow-data-change", overrides=(*MULTI, *other))


def test_cooldown_on_new_data(base, tmp_path, annealing_text, out):
    pre = sorted(p for n, p in ckpts(base).items() if "pre-decay" in n)[1]
    # the cooldown's data in data: is a change of the training data: refused, naming both ways to do it on purpose
    err = run(
        out,
        tmp_path / "c0",
        "--cooldown-from",
        str(pre),
        "--cooldown-steps",
        "3",
        rc=2,
        overrides=("data.source=text", f"data.paths=[{annealing_text}]"),
    )
    assert "decay_data: section" in err and "--allow-data-change" in err
    cool = tmp_path / "c1"
    run(out, cool, "--cooldown-from", str(pre), "--cooldown-steps", "3", overrides=_decay_data(annealing_text))
    steps = [m for m in metrics(cool) if "loss" in m]
    assert [m["data"] for m in steps] == ["decay"] * 3
    (final,) = [p for n, p in ckpts(cool).items() if "final" in n]
    state = json.loads((final / "train_state" / "trainer.json").read_text())["data"]
    assert state["decay"]["samples_seen"] == 3 * 2, "the new data from its beginning"
    before = json.loads((pre / "train_state" / "trainer.json").read_text())["data"]
    assert state["samples_seen"] == before["samples_seen"], "the main data did not move"
    # a continuation on new decay data: its stable phase goes on in data:, its decay reads decay_data:
    at = json.loads((pre / "manifest.json").read_text())["position"]
    cont = tmp_path / "c2"
    run(out, cont, "--continue-from", str(pre), "--total-steps", str(at + 10), overrides=_decay_data(annealing_text))
    steps = [m for m in metrics(cont) if "loss" in m]
    assert [m["data"] for m in steps] == ["decay" if m["phase"] == "decay" else "main" for m in steps]
    assert steps[0]["data"] == "main" and steps[-1]["data"] == "decay"


def _ckpt_cli(out, *args: str) -> tuple[int, str]:
    from wsd_pretrain.cli import main as cli

    code = cli(["ckpt", *args])
    return code, out()


def test_ckpt_tools_as_a_new_user_meets_them(base, tmp_path, out):
    code, err = _ckpt_cli(out, "list", str(tmp_path / "no-such-run"))
    assert code == 2 and "no-such-run does not exist" in err
    # the newest checkpoint of a run damaged: every tool names it, the file and the reason
    run_dir = tmp_path / "damaged"
    shutil.copytree(base, run_dir)
    newest = sorted(ckpts(run_dir).values(), key=lambda p: p.name)[-1]
    shard = sorted(newest.glob("model*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 8)
    for tool in (["inspect", str(run_dir)], ["export-hf", str(run_dir), str(tmp_path / "hf")]):
        code, err = _ckpt_cli(out, *tool)
        assert code == 2 and f"the newest checkpoint {newest.name} is damaged" in err and shard.name in err, err
        assert "name an older one" in err
    code, text = _ckpt_cli(out, "verify", str(run_dir))
    assert code == 1 and shard.name in text and newest.name in text
    # outputs: inside the input checkpoint, or where nothing can be written (sysfs refuses new folders)
    good = sorted(ckpts(base).values(), key=lambda p: p.name)[-1]
    code, err = _ckpt_cli(out, "export-hf", str(good), str(good / "hf"))
    assert code == 2 and "is inside the input" in err and not (good / "hf").exists()
    if Path("/sys/kernel").is_dir():
        for tool in ("export-hf", "to-dcp"):
            code, err = _ckpt_cli(out, tool, str(good), "/sys/wsd-pretrain-out")
            assert code == 2 and "cannot write the output /sys/wsd-pretrain-out" in err, err
            assert "Traceback" not in err and "writable filesystem" in err
