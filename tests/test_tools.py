"""Every script in tools/ runs, at a tiny size, the way a user starts it (``python tools/<script>.py ...``), and writes
what it should: the benchmarks their sections (to a file of the test's, never docs/), the schedule comparison its
report and plots, the checkpoint scripts their outputs, the mutation check its verdicts. The scripts run two at a
time in one fixture; each test checks one script's result. Each runs as ``__main__`` (runpy, as the interpreter runs
a script) in a process forked from the session's fork server (tests/distributed_helpers.py ``run_script``), which
imported torch, DeepSpeed and transformers once, instead of twelve fresh interpreters importing them again; the
processes the scripts start themselves are fresh interpreters, as before. (``tools/from_deepspeed.py`` runs in
tests/test_checkpoint_tools.py, beside a real DeepSpeed checkpoint; ``tools/reliability.py`` in
tests/test_reliability.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_helpers import _context, run_script

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))

import mutation_check as MC  # noqa: E402

TINY_TRAINING = [
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "data.seq_len=32",
    "data.max_bytes=200000",
    "train.micro_batch_size=4",
    "train.eval_batches=2",
]


def _docs() -> dict[str, str]:
    return {
        str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (ROOT / "docs").rglob("*")
        if p.is_file()
    }


def _make_run(run: Path) -> Path:
    """A small Llama run with its checkpoints (the final one is what the checkpoint scripts work on)."""
    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager
    from wsd_pretrain.model import LlamaLM, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
    model = LlamaLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=3, decay_length=1))
    mgr = CheckpointManager(
        run, model, opt, sched, config=CheckpointConfig(on_preemption=False), hf_config=cfg.hf_config()
    )
    while not sched.finished:
        x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(sched.position))
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        mgr.maybe_save()
    mgr.close()
    return run / "checkpoints" / "step-000000003-post-decay+final"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Runs every script once; returns {name: (CompletedProcess, output path)} and checks docs/ is untouched."""
    tmp = tmp_path_factory.mktemp("tools")
    ckpt = _make_run(tmp / "run")
    jobs: dict[str, tuple[list[str], Path]] = {
        "bench_memory": (["--sizes", "0.002", "--width", "256", "--dir", str(tmp / "m")], tmp / "memory.md"),
        "compare_schedules": (
            ["--in-process", "--seeds", "0", "--steps", "20", "--workdir", str(tmp / "cs")]
            + [a for o in TINY_TRAINING for a in ("--override", o)],
            tmp / "schedules" / "schedules.md",
        ),
        "bench_overhead": (
            ["--steps", "2", "--rounds", "1", "--batch", "2", "--seq-len", "16", "--ranks", "2"],
            tmp / "overhead.md",
        ),
        "bench_save": (
            ["--sizes", "0.002", "--width", "256", "--repeat", "1", "--warm-cache", "--dir", str(tmp / "s")],
            tmp / "save.md",
        ),
        "bench_async": (["--sizes", "0.002", "--width", "256", "--saves", "1", "--dir", str(tmp / "a")], tmp / "a.md"),
        "bench_scheduler": (["--steps", "200"], tmp / "scheduler.md"),
        "bench_s3": (["--sizes-mb", "0.2", "--ranks", "1", "--rounds", "2", "--threads", "1", "4"], tmp / "s3.md"),
        "bench_s3_floor": (
            "--put-mb 1 6 --part-mib 5 --object-mb 11 --range-mib 5 --total-mb 11 --rounds 1 --in-memory".split(),
            tmp / "s3_floor.md",
        ),
        "bench_scale": (
            ["--worlds", "2", "--tp-worlds", "2", "--width", "64", "--layers", "2", "--engines", "fsdp2", "fsdp2+tp"],
            tmp / "scale.md",
        ),
        "scale_report": (["--small"], tmp / "scale_report.md"),
        "mutation_check": (["--only", "retention-imported-rotates", "--no-baseline"], tmp / "unused"),
        "ckpt": (["verify", str(ckpt)], tmp / "unused"),
        "export_hf": ([str(ckpt), str(tmp / "hf"), "--max-shard-size", "20000"], tmp / "hf"),
    }
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    before = _docs()

    def run(name: str) -> subprocess.CompletedProcess:
        args, out = jobs[name]
        if name.startswith(("bench_", "compare_", "scale_")):
            args = [*args, "--out", str(out)]
        return run_script(TOOLS / f"{name}.py", args, cwd=tmp, env=env, timeout=600)

    _context()  # the fork server, started once before the two threads use it
    with ThreadPoolExecutor(2) as pool:  # the scripts are mostly one thread each: two at a time on two cores
        done = dict(zip(jobs, pool.map(run, jobs)))
    results = {name: (done[name], jobs[name][1]) for name in jobs}
    results["_ckpt"] = (None, ckpt)
    results["_docs_changed"] = (None, sorted(k for k, v in _docs().items() if before.get(k) != v))
    return results


def _ok(smoke, name: str) -> Path:
    res, out = smoke[name]
    assert res.returncode == 0, f"tools/{name}.py failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return out


def _tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text``: a list of rows (the header first) of stripped cells."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(---\|)+", line.strip()):
                current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def _section(path: Path, name: str) -> str:
    text = path.read_text()
    assert text.startswith("# Benchmarks"), "a new file starts with the benchmarks header"
    match = re.search(rf"<!-- bench:{name} -->\n(.*?)\n<!-- /bench:{name} -->", text, re.S)
    assert match, f"no {name} section in {path}"
    return match.group(1)


def _number(cell: str) -> float:
    return float(re.match(r"[-+]?[\d.]+", cell).group())


def test_no_script_wrote_into_docs(smoke):
    assert smoke["_docs_changed"][1] == []


def test_bench_scheduler(smoke):
    (table,) = _tables(_section(_ok(smoke, "bench_scheduler"), "scheduler"))
    assert table[0] == ["scheduler", "milestones", "µs per step()", "relative to ours (1 milestone)"]
    assert [(r[0], r[1]) for r in table[1:]] == [
        ("wsd_pretrain WSDScheduler", "1"),
        ("wsd_pretrain WSDScheduler", "10"),
        ("wsd_pretrain WSDScheduler", "100"),  # 1000 milestones do not fit 200 steps: left out, not a crash
        ("seed: pytorch_accelerated WSDLrScheduler", "1"),
        ("seed: pytorch_accelerated WSDLrScheduler", "3"),
        ("wsd_pretrain.compat WSDLrScheduler", "3"),
        ("transformers get_wsd_schedule (LambdaLR)", "1"),
    ]
    assert all(_number(r[2]) > 0 for r in table[1:]) and table[1][3] == "1.00"


def test_bench_save(smoke, tmp_path):
    out = _ok(smoke, "bench_save")
    save, load = _tables(_section(out, "save"))
    methods = [r[1] for r in save[1:]]
    assert methods[:2] == ["the disk (sequential write + fsync)", "ours (wsd_pretrain)"]
    assert {
        "torch.save",
        "safetensors.save_file",
        "DCP + HuggingFaceStorageWriter",
        "DeepSpeed save_checkpoint",
    } <= set(methods)
    assert all(_number(r[2]) >= 0 and r[3].endswith("GB/s") for r in save[1:])
    # the load step (it crashed on trainer.json validation before) ran both ways against torch.load
    assert [r[1] for r in load[1:]] == [
        "ours, checksums verified (xxh3_128)",
        "ours, sizes verified",
        "torch.load + load_state_dict",
    ]
    assert not (out.parent / "s").exists() or not any((out.parent / "s").iterdir()), "its scratch is removed"


def test_bench_async(smoke):
    (table,) = _tables(_section(_ok(smoke, "bench_async"), "async"))
    assert [r[1] for r in table[1:]] == ["sync", "async, blocking copy", "async, overlapped copy"]
    assert table[1][3] == "100%" and all(_number(r[2]) > 0 and _number(r[7]) > 0 for r in table[1:])
    # the stall is what save() took plus what the optimizer step waited for the copy
    for row in table[1:]:
        assert abs(_number(row[2]) - _number(row[4]) - _number(row[5])) < 0.002
    # only the overlapped copy runs on a thread of its own, so only its time is a column of its own
    assert table[1][6] == table[2][6] == "" and _number(table[3][6]) >= 0, "the overlapped copy was timed"


def test_bench_s3(smoke):
    table, cpu = _tables(_section(_ok(smoke, "bench_s3"), "s3"))
    assert table[0][1:5] == ["ranks", "ours: save", "DCP fsspec (fastest thread_count): save", "save ratio"]
    ((_, ranks, ours, dcp, ratio, resume, load),) = table[1:]
    assert ranks == "1" and all(c.endswith("MB/s)") for c in (ours, resume, load)) and _number(ratio) > 0
    assert re.fullmatch(r"[\d.]+ s \(\d+ MB/s\), [14] threads", dcp)
    # where the save's time goes: each round's ratio, the CPU seconds of the ranks and of the server
    assert cpu[0][:3] == ["state", "ranks", "save ratio per round"]
    ((_, ranks, rounds, by_threads, *cpus),) = cpu[1:]
    assert len(cpus) == 4 and cpu[0][-2:] == ["resume: ours, ranks' / server's CPU", "load: DCP, ranks' / server's CPU"]
    assert ranks == "1" and rounds.count("x") >= 2 and all(c.count(" s") == 2 for c in cpus), cpus
    assert [t.split(":")[0] for t in by_threads.split(", ")] == ["1", "4"]  # each thread_count tried, in order


def test_bench_s3_floor(smoke):
    """Each request shape on each server: the server's and client's CPU per GB, and the floor for the write shapes."""
    (table,) = _tables(_section(_ok(smoke, "bench_s3_floor"), "s3-floor"))
    assert table[0][:4] == ["request shape", "server", "server CPU per GB", "client CPU per GB"]
    shapes = [(r[0], r[1]) for r in table[1:]]
    assert [s for s, srv in shapes if srv == "spooled"] == [s for s, srv in shapes if srv == "in memory"]
    kinds = [s.split(",")[0].split(" of ")[0] for s, srv in shapes if srv == "spooled"]
    assert kinds == ["PUT", "PUT", "multipart", "GET", "ranged GETs"], kinds
    for shape, _, server, client, _, floor in table[1:]:
        assert _number(server) >= 0 and _number(client) > 0, shape  # /proc counts in ticks: a tiny GET may read 0
        assert (_number(floor) > 0) if shape.startswith(("PUT", "multipart")) else floor == "", shape


def test_bench_scale(smoke):
    (table,) = _tables(_section(_ok(smoke, "bench_scale"), "scale"))
    assert table[0][:4] == ["engine", "ranks", "state", "save: moved (x model)"]
    assert [(row[0], row[1]) for row in table[1:]] == [("FSDP2 fp32", "2"), ("FSDP2 1 x TP 2 fp32", "2")]
    for engine, _, _, moved, resumed, balance, read, *_ in table[1:]:
        assert float(re.search(r"\(([\d.]+)x\)", resumed).group(1)) < 0.5, engine  # the tiny model: messages only
        # a save moves no FSDP2 weight (each holder writes its rows in place); under TP only the RowwiseParallel
        # column blocks travel, to the one rank of their TP group that puts each together; a resume moves only
        # small messages
        ratio, predicted = (float(x) for x in re.findall(r"([\d.]+)x", moved))
        assert ratio < (0.05 if engine == "FSDP2 fp32" else 1.0) and abs(ratio - predicted) < 0.05, (engine, moved)
        assert _number(balance) <= 1.5 and "/" in read, engine


def test_scale_report(smoke):
    text = _ok(smoke, "scale_report").read_text()
    (table, tools) = _tables(text)
    assert [r[0] for r in table[1:]] == ["fsdp2", "zero3", "zero2", "fsdp2 + TP 8 (dp 1)", "fsdp2 + TP 2 + PP 2 (dp 2)"]
    moved = {r[0]: float(re.search(r"\(([\d.]+)x the model\)", r[2]).group(1)) for r in table[1:]}
    # partitioned weights are written in place by their holders; under TP only the dim-1 shards move, once
    assert moved["zero2"] < 0.05 and moved["fsdp2"] < 0.05 and moved["zero3"] < 0.05
    assert 0.1 < moved["fsdp2 + TP 8 (dp 1)"] <= 0.5
    # pipeline stages move nothing more than their TP groups' dim-1 shards, and each stage's ranks write their rows
    assert 0.05 < moved["fsdp2 + TP 2 + PP 2 (dp 2)"] <= 0.5
    pp_row = table[-1]
    assert float(re.search(r"\(([\d.]+)\)", pp_row[3]).group(1)) < 1.25, pp_row
    assert "torch.distributed.checkpoint (`dcp.save`)" in {r[0] for r in tools}


def test_bench_memory(smoke):
    saves, conversions = _tables(_section(_ok(smoke, "bench_memory"), "memory"))
    assert [r[0] for r in saves[1:]] == ["ours", "torch.save", "safetensors.save_file"]
    assert [r[0] for r in conversions[1:]] == [
        "from-deepspeed (model + full training state)",
        "DeepSpeed zero_to_fp32 (fp32 weights only)",
    ]
    assert all(_number(r[3]) > 0 for r in conversions[1:])


def test_bench_overhead(smoke):
    (table,) = _tables(_section(_ok(smoke, "bench_overhead"), "overhead"))
    assert [r[0] for r in table[1:]] == ["2"]
    assert all(_number(r[1]) > 0 and _number(r[4]) > 0 for r in table[1:])


def test_compare_schedules(smoke):
    report = _ok(smoke, "compare_schedules")
    text = report.read_text()
    table, wsm = _tables(text)
    assert [r[0] for r in table[1:]] == ["cosine"] + [
        f"WSD {shape} {pct}%" for shape in ("linear", "1-sqrt", "inverse") for pct in (10, 20)
    ]
    assert all(_number(r[1]) > 0 for r in table[1:])
    # WSM beside WSD and cosine: several windows of merged snapshots, each evaluated
    assert [r[0] for r in wsm[1:4]] == ["cosine", "WSD 1-sqrt 20%", "stable (no decay, no merge)"]
    assert {r[0] for r in wsm[4:]} >= {"WSM 1-sqrt 10%", "WSM 1-sqrt 20%", "WSM 1-sqrt 40%", "WSM uniform 20%"}
    assert all(_number(r[1]) > 0 for r in wsm[1:])
    assert "c_j = W_j - W_(j+1)" in text and "byte for byte" in text
    assert "## Continuation and cooldown branch" in text and "model.hidden_size=32" in text
    for png in ("schedules_compare.png", "schedules_continuation.png"):
        assert (report.parent / "img" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ckpt_script(smoke):
    res, _ = smoke["ckpt"]
    _ok(smoke, "ckpt")
    assert res.stdout.startswith("OK   step-000000003-post-decay+final: ") and "(xxh3_128)" in res.stdout


def test_export_hf_script(smoke):
    out = _ok(smoke, "export_hf")
    ckpt = smoke["_ckpt"][1]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "--max-shard-size was applied"
    exported = {}
    for f in set(index["weight_map"].values()):
        exported.update(load_file(str(out / f)))
    source = load_file(str(next(ckpt.glob("model-*.safetensors"))))
    assert exported.keys() == source.keys()
    assert all(torch.equal(exported[k], source[k]) for k in source)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1


def test_mutation_check_script(smoke):
    res, _ = smoke["mutation_check"]
    _ok(smoke, "mutation_check")
    assert "caught  retention-imported-rotates" in res.stdout and "1 of 1 caught." in res.stdout


def test_mutation_check_reports_a_missed_mutation_and_exits_nonzero(monkeypatch, capsys):
    harmless = MC.Mutation(
        "harmless",
        "wsd_pretrain/shapes.py",
        '"""Warmup and decay shapes: functions',
        '"""Warmup and decay shapes (a docstring changed): functions',
        ("tests/test_retention.py::test_bad_keep_last_is_refused",),
        "nothing",
    )
    monkeypatch.setattr(MC, "MUTATIONS", [harmless])
    assert MC.main(["--no-baseline"]) == 1
    out = capsys.readouterr().out
    assert "MISSED  harmless" in out and "0 of 1 caught." in out


def test_mutation_check_refuses_a_stale_list_before_running_anything():
    moved = MC.Mutation("moved", "wsd_pretrain/shapes.py", "text that is not there", "x", ("tests",), "?")
    twice = MC.Mutation("twice", "wsd_pretrain/shapes.py", "return", "return", ("tests",), "?")
    broken = MC.Mutation("broken", "wsd_pretrain/shapes.py", "def decay_factor(", "def decay_factor((", ("t",), "?")
    with pytest.raises(MC.StaleMutation) as info:
        MC.check_list([moved, twice, broken, moved])
    text = str(info.value)
    assert "update these entries in tools/mutation_check.py" in text
    assert "moved: the old text is not found in wsd_pretrain/shapes.py" in text
    assert "twice: the old text is found" in text and "twice: the new text is the old one" in text
    assert "broken: the mutated wsd_pretrain/shapes.py does not compile" in text
    assert "moved: the id is used twice" in text
    MC.check_list(MC.MUTATIONS)  # the shipped list matches the code
    assert len(MC.MUTATIONS) >= 20


def test_suite_table_rewrites_docs_tables_from_a_real_junit_report(tmp_path):
    """tools/suite_table.py (docs/testing.md's per-file tables): counts and seconds from a real pytest junit report,
    the prose column kept, a new file marked, the totals line rewritten, a missing marker refused."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_alpha.py").write_text(
        "import pytest\n\ndef test_a():\n    pass\n\ndef test_b():\n    pass\n\n"
        "@pytest.mark.skip(reason='x')\ndef test_c():\n    pass\n"
    )
    (tmp_path / "tests" / "test_beta.py").write_text("import time\n\ndef test_slowish():\n    time.sleep(1.2)\n")
    report = tmp_path / "junit.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", "tests"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=120,
    )
    doc = tmp_path / "testing.md"
    doc.write_text(
        "intro\n<!-- default-total -->old totals\n\n<!-- default-table -->\n"
        "| file | tests | seconds | what it checks |\n|---|---|---|---|\n"
        "| `test_alpha.py` | 9 | 99 | alpha's own prose |\n| `test_gone.py` | 1 | 5 | removed |\n"
        "<!-- /default-table -->\nafter\n"
    )
    cmd = [sys.executable, str(TOOLS / "suite_table.py"), "--junit", f"default={report}", "--markdown", str(doc)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = {r[0]: r for r in _tables(doc.read_text())[0][1:]}
    assert set(rows) == {"`test_alpha.py`", "`test_beta.py`"}  # a file no longer in the report is dropped
    assert rows["`test_alpha.py`"][1:] == ["3", "<1", "alpha's own prose"]
    assert rows["`test_beta.py`"][1] == "1" and _number(rows["`test_beta.py`"][2]) >= 1
    assert "say what it checks" in rows["`test_beta.py`"][3]
    text = doc.read_text()
    assert "<!-- default-total -->3 passed, 0 failed, 1 skipped;" in text and "old totals" not in text
    assert text.startswith("intro\n") and text.endswith("<!-- /default-table -->\nafter\n")
    # the slowest file first
    assert list(rows) == ["`test_beta.py`", "`test_alpha.py`"]
    bad = subprocess.run([*cmd[:3], f"slow={report}", *cmd[4:]], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "<!-- slow-table -->" in bad.stderr
