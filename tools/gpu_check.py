"""The paths only a GPU takes, checked on a GPU: results with the device go to docs/gpu.md.

    python tools/gpu_check.py                       # every check; writes docs/gpu.md when a GPU ran them
    python tools/gpu_check.py --only nccl-one-rank  # some checks; --json prints the results as JSON
    python tools/gpu_check.py --device cpu          # run the same checks on the CPU (gloo), to test this tool

Each check runs in its own process (a CUDA error cannot spoil the next) through the public API only
(CheckpointManager, WSDScheduler, deepspeed_initialize, distributed.init_distributed), and compares a resumed run
with the state it saved, bit for bit, then trains on and compares with the run that was never interrupted
(deterministic algorithms on). Without a CUDA device every check is reported as skipped and the exit status is 0;
docs/gpu.md is only rewritten by a run on a GPU. Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHECKS: dict[str, str] = {
    "save-resume-sync": "save and resume from CUDA tensors (synchronous save)",
    "save-resume-async-pinned": "async save: the copy into pinned host memory on a side stream while the next steps run (their optimizer step waits for it), then resume",
    "bf16-on-device": "bf16 parameters and AdamW state on the device, saved and resumed",
    "nccl-one-rank": "NCCL process group with one rank: DDP, per-step agreement, parallel and rank0 writes",
    "fsdp2-cuda": "FSDP2 (fully_shard) on CUDA under NCCL, saved and resumed",
    "deepspeed-zero2-bf16-fusedadam": "DeepSpeed ZeRO-2, bf16, FusedAdam from the ds_config, saved and resumed",
    "fused-adamw": "torch's fused AdamW: its restored 0-d step on the device, as Optimizer.load_state_dict puts it",
}
STEPS = 4  # updates before the save, and again after it


# ---------------------------------------------------------------------------------------------- the checks


def _env_for_group(device: str) -> str:
    """One-rank process-group variables; the backend for ``device``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return "nccl" if device == "cuda" else "gloo"


def _model(device: str, seed: int, dtype: Any = None) -> Any:
    import torch

    from wsd_pretrain.model import LlamaLM, ModelConfig

    torch.manual_seed(seed)
    model = LlamaLM(ModelConfig(hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2))
    return model.to(device=device, dtype=dtype)


def _batch(i: int, device: str) -> tuple[Any, Any]:
    import torch

    x = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(i)).to(device)
    return x[:, :-1], x[:, 1:]


def _snapshot(model: Any, optimizer: Any) -> dict[str, Any]:
    """Every parameter and optimizer-state tensor, as full CPU copies (DTensors gathered)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[f"param/{name}"] = t.detach().cpu().clone()
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if hasattr(value, "detach"):
                v = value.full_tensor() if hasattr(value, "full_tensor") else value
                out[f"state/{names.get(id(p), '?')}/{key}"] = v.detach().cpu().clone()
    return out


def _same(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    import torch

    if a.keys() != b.keys():
        raise AssertionError(f"{what}: different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    if bad:
        raise AssertionError(f"{what}: {len(bad)} tensor(s) differ, e.g. {bad[:3]}")


def _on_device(model: Any, optimizer: Any, device: str) -> None:
    wrong = [n for n, p in model.named_parameters() if p.device.type != device]
    for state in optimizer.state.values():
        for key, value in state.items():
            # torch keeps Adam's step on the CPU unless fused/capturable: that is its own placement
            if hasattr(value, "device") and key != "step" and value.device.type != device:
                wrong.append(key)
    if wrong:
        raise AssertionError(f"tensors not on {device} after resume: {wrong[:5]}")


def _torch_run(
    work: Path,
    device: str,
    *,
    async_save: bool = False,
    dtype: Any = None,
    wrap: Callable[[Any], Any] | None = None,
    fused: bool = False,
) -> str:
    """Train, save, train on; resume a fresh model from the save and train the same updates: same state twice."""
    import torch

    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    def build(seed: int) -> tuple[Any, Any, Any, Any]:
        module = _model(device, seed, dtype)
        model = wrap(module) if wrap is not None else module
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **({"fused": True} if fused else {}))
        return module, model, opt, WSDScheduler(opt, WSDSchedule(total=2 * STEPS, warmup=1, decay_length=2))

    def train(model: Any, opt: Any, sched: Any, start: int) -> None:
        for i in range(start, start + STEPS):
            model(*_batch(i, device)).backward()
            opt.step()
            opt.zero_grad()
            sched.step()

    cfg = CheckpointConfig(at_milestones=False, at_end=False, on_preemption=False, async_save=async_save)
    run = work / "run"
    _, model, opt, sched = build(0)
    mgr = CheckpointManager(run, model, opt, sched, config=cfg)
    train(model, opt, sched, 0)
    mgr.save(["periodic"])
    saved = _snapshot(model, opt)
    train(model, opt, sched, STEPS)  # with async_save, while the write may still be in flight
    mgr.close()
    straight = _snapshot(model, opt)
    _, model2, opt2, sched2 = build(1)
    mgr2 = CheckpointManager(run, model2, opt2, sched2, config=cfg)
    if not mgr2.resume("latest"):
        raise AssertionError("no checkpoint to resume from")
    _on_device(model2, opt2, device)
    if fused:  # the fused kernel reads step on the parameter's device, in fp32 (a CPU step would assert)
        steps = [st["step"] for st in opt2.state.values()]
        if any(s.device.type != device or s.dtype != torch.float32 for s in steps):
            raise AssertionError(f"fused AdamW's step restored on {steps[0].device} as {steps[0].dtype}")
    _same(_snapshot(model2, opt2), saved, "resumed vs saved")
    train(model2, opt2, sched2, STEPS)
    mgr2.close()
    _same(_snapshot(model2, opt2), straight, "resumed and trained on vs never interrupted")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model2.parameters()})
    return f"{len(saved)} tensors ({', '.join(dtypes)}) bitwise equal after resume and after {STEPS} more updates"


def check_save_resume_sync(work: Path, device: str) -> str:
    return _torch_run(work, device)


def check_fused_adamw(work: Path, device: str) -> str:
    return _torch_run(work, device, fused=True)


def check_save_resume_async_pinned(work: Path, device: str) -> str:
    return _torch_run(work, device, async_save=True)


def check_bf16_on_device(work: Path, device: str) -> str:
    import torch

    return _torch_run(work, device, dtype=torch.bfloat16)


def check_nccl_one_rank(work: Path, device: str) -> str:
    import torch

    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain import distributed as D
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    info = D.init_distributed(backend=_env_for_group(device), timeout_s=300)
    try:
        detail = []
        for mode in ("parallel", "rank0"):
            model = torch.nn.parallel.DistributedDataParallel(_model(device, 0))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            sched = WSDScheduler(opt, WSDSchedule(total=STEPS, warmup=1, decay_length=1))
            cfg = CheckpointConfig(every_steps=2, on_preemption=False, write_mode=mode)
            mgr = CheckpointManager(work / mode, model, opt, sched, config=cfg)
            while not sched.finished:  # maybe_save agrees with the other ranks after every update
                model(*_batch(sched.last_epoch, device)).backward()
                opt.step()
                opt.zero_grad()
                sched.step()
                mgr.maybe_save()
            saved = _snapshot(model.module, opt)
            mgr.close()
            model2 = torch.nn.parallel.DistributedDataParallel(_model(device, 1))
            opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
            sched2 = WSDScheduler(opt2, WSDSchedule(total=STEPS, warmup=1, decay_length=1))
            mgr2 = CheckpointManager(work / mode, model2, opt2, sched2, config=cfg)
            mgr2.resume("latest")
            mgr2.close()
            _same(_snapshot(model2.module, opt2), saved, f"write_mode={mode}: resumed vs saved")
            detail.append(f"{mode}: {len(mgr.saves)} saves, resumed bitwise")
        return f"backend {info.backend}, world {info.world_size}; " + "; ".join(detail)
    finally:
        D.teardown()


def check_fsdp2_cuda(work: Path, device: str) -> str:
    from torch.distributed.fsdp import fully_shard

    from wsd_pretrain import distributed as D

    info = D.init_distributed(backend=_env_for_group(device), timeout_s=300)

    def wrap(module: Any) -> Any:
        for layer in module.model.layers:
            fully_shard(layer)
        fully_shard(module)
        return module

    try:
        return f"backend {info.backend}: " + _torch_run(work, device, wrap=wrap)
    finally:
        D.teardown()


def check_deepspeed_zero2_bf16_fusedadam(work: Path, device: str) -> str:
    import torch

    from wsd_pretrain import WSDSchedule, WSDScheduler, deepspeed_initialize
    from wsd_pretrain import distributed as D
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    D.init_distributed(backend=_env_for_group(device), timeout_s=300)
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
    }
    schedule = WSDSchedule(total=2 * STEPS, warmup=1, decay_length=2)

    def build(seed: int) -> Any:
        module = _model(device, seed)
        engine, *_ = deepspeed_initialize(
            model=module,
            model_parameters=module.parameters(),
            config=ds_config,
            lr_scheduler=WSDScheduler.factory(schedule),
        )
        return engine

    def state(engine: Any) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out = {}
        for name, p in engine.module.named_parameters():
            out[f"bf16/{name}"] = p.detach().cpu().clone()
            out[f"fp32/{name}"] = safe_get_full_fp32_param(p).detach().cpu().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
        return out

    def train(engine: Any, start: int) -> None:
        for i in range(start, start + STEPS):
            loss = engine(*_batch(i, device))
            engine.backward(loss)
            engine.step()

    cfg = CheckpointConfig(at_milestones=False, at_end=False, on_preemption=False)
    try:
        engine = build(0)
        kind = type(engine.basic_optimizer).__name__
        if kind != "FusedAdam":
            raise AssertionError(f"DeepSpeed built {kind}, not FusedAdam, from the ds_config")
        mgr = CheckpointManager(work / "run", engine, None, engine.lr_scheduler, config=cfg)
        train(engine, 0)
        mgr.save(["periodic"])
        saved = state(engine)
        train(engine, STEPS)
        mgr.close()
        straight = state(engine)
        engine2 = build(1)
        mgr2 = CheckpointManager(work / "run", engine2, None, engine2.lr_scheduler, config=cfg)
        mgr2.resume("latest")
        if next(engine2.module.parameters()).dtype != torch.bfloat16:
            raise AssertionError("the resumed engine's weights are not bf16")
        _same(state(engine2), saved, "resumed vs saved")
        train(engine2, STEPS)
        mgr2.close()
        _same(state(engine2), straight, "resumed and trained on vs never interrupted")
        return f"{kind} under ZeRO-2 bf16: {len(saved)} tensors bitwise equal after resume and {STEPS} more updates"
    finally:
        D.teardown()


def _check_fn(name: str) -> Callable[[Path, str], str]:
    return globals()["check_" + name.replace("-", "_")]


# ---------------------------------------------------------------------------------------------- running


def _no_gpu_reason() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    built = torch.version.cuda or "none"
    return f"no CUDA device (torch.cuda.is_available() is False; torch {torch.__version__}, built with CUDA {built})"


def _child(name: str, device: str) -> dict[str, Any]:
    """Run one check here (the child process) and return its result."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    torch.use_deterministic_algorithms(True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            detail = _check_fn(name)(Path(tmp), device)
            status = "passed"
        except Exception as exc:
            status = "failed"
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
            traceback.print_exc()
    return {"name": name, "status": status, "detail": detail, "seconds": round(time.monotonic() - t0, 1)}


def run_checks(names: list[str], device: str, timeout: float = 900.0) -> list[dict[str, Any]]:
    """Each check in a fresh process; every check skipped (with the reason) when there is no GPU."""
    reason = _no_gpu_reason() if device == "cuda" else None
    results = []
    for name in names:
        if reason is not None:
            results.append({"name": name, "status": "skipped", "detail": reason, "seconds": 0.0})
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--device", device]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            results.append(
                {"name": name, "status": "failed", "detail": f"timed out after {timeout:.0f}s", "seconds": timeout}
            )
            continue
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:400]
            results.append(
                {"name": name, "status": "failed", "detail": f"exit {proc.returncode}: {tail}", "seconds": 0.0}
            )
            continue
        result = json.loads(lines[-1])
        if result["status"] == "failed":
            sys.stderr.write(proc.stderr[-4000:])
        results.append(result)
    return results


def _environment(device: str) -> dict[str, str]:
    import torch

    env = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if device == "cuda" and torch.cuda.is_available():
        env["device"] = f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)"
        env["CUDA"] = str(torch.version.cuda)
        env["NCCL"] = ".".join(map(str, torch.cuda.nccl.version()))
    else:
        env["device"] = "CPU" if device == "cpu" else "none"
    try:  # the version without importing it (its import logs to stdout)
        env["DeepSpeed"] = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        env["DeepSpeed"] = "not installed"
    return env


HOW_TO_RUN = """## How to run

On a machine with a CUDA GPU, torch with CUDA and DeepSpeed installed in `.venv` (see README):

```bash
.venv/bin/python tools/gpu_check.py                 # every check; rewrites this file
.venv/bin/python -m pytest -m gpu -q                # the same checks as tests (skipped without a GPU)
```

Each check runs in its own process and compares a resumed run with the state it saved, bit for bit, then trains
on and compares with a run that was never interrupted (`torch.use_deterministic_algorithms(True)`)."""


def render(results: list[dict[str, Any]], env: dict[str, str]) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# GPU checks",
        "",
        "Written by `tools/gpu_check.py`: the paths that only a GPU takes (CUDA tensors, pinned buffers, bf16 on the",
        "device, NCCL, FSDP2 on CUDA, DeepSpeed's fused optimizer). The default test suite never needs a GPU.",
        "",
        f"Last run: {when} on **{env['device']}**; " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "device"),
        "",
        "| check | what | result | seconds | detail |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        detail = r["detail"].replace("|", "\\|")
        lines.append(f"| `{r['name']}` | {CHECKS[r['name']]} | {r['status']} | {r['seconds']} | {detail} |")
    return "\n".join([*lines, "", HOW_TO_RUN, ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(CHECKS), default=None, help="run only these checks")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the checks on the CPU (gloo)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "gpu.md", help="where a GPU run writes its results")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--child", choices=list(CHECKS), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.device)), flush=True)
        return 0
    results = run_checks(args.only or list(CHECKS), args.device)
    env = _environment(args.device)
    if args.json:
        print(json.dumps({"environment": env, "results": results}, indent=2))
    else:
        for r in results:
            print(f"{r['status']:>7}  {r['name']:<32} {r['detail']}")
    ran = any(r["status"] != "skipped" for r in results)
    if ran and args.device == "cuda":
        args.out.write_text(render(results, env))
        print(f"results written to {args.out}", file=sys.stderr)
    elif not ran:
        print(
            f"no check ran ({results[0]['detail'] if results else 'none selected'}); {args.out} left as is",
            file=sys.stderr,
        )
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
