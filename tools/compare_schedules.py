"""Reproduce the WSD findings at small scale, side by side with cosine: writes docs/schedules.md and its plots.

    python tools/compare_schedules.py                    # 3 seeds, 300 updates per run: about 20 minutes on 2 cores
    python tools/compare_schedules.py --seeds 0 1 --steps 200 --jobs 2
    python tools/compare_schedules.py --in-process --seeds 0 --steps 20 --out /tmp/s.md \
        --override model.num_layers=1 --override model.hidden_size=32      # a smoke run (images in /tmp/img)
    python tools/compare_schedules.py --only-wsm         # cosine, WSD 1-sqrt 20% and WSM only: rewrites the report's
                                                         # WSM section, keeps the rest

Every run is the default tiny model (`wsd-pretrain train` with no config: byte-level Llama on the standard library's
sources, held-out validation blocks) with matched compute (the same number of updates, batch and tokens):
cosine decay over the whole run after the warmup, and WSD with linear, 1-sqrt and inverse-proportional decays over
the last 10% and 20%. Plus, from the WSD 1-sqrt 20% run: a continuation (WSD) from its pre-decay checkpoint to 1.5x
the length, against a fresh run of that length, and a cooldown branch from a stable checkpoint at half the run.
And WSM (decay-free WSD by checkpoint merging): one run per seed at the stable LR to the end (the job's ``wsm`` mode,
snapshots every 1/60 of the run), whose snapshots are merged over several windows (``ckpt merge``'s coefficients)
and evaluated on the same held-out blocks as the training runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
DOC = ROOT / "docs" / "schedules.md"

EVAL_EVERY = 30  # set by main(): a tenth of the run, so every pre-decay point is evaluated
WARMUP = 30  # set by main(): a tenth of the (base) run, the same in every run
MIN_LR = 0.01  # every schedule ends at 1% of the peak LR (the inverse-proportional shape needs a floor above 0)
EXTRA: list[str] = []  # set by main(): --override settings for every run
IN_PROCESS = False  # set by main(): --in-process
WSM_SECTION = "## Decay-free WSD by merging (WSM)"


def schedules(steps: int) -> dict[str, list[str]]:
    warm = steps // 10
    out = {"cosine": [f"schedule.decay_length={steps - warm}", "schedule.decay_shape=cosine"]}
    for shape in ("linear", "1-sqrt", "inverse"):
        for frac in (0.1, 0.2):
            out[f"WSD {shape} {int(frac * 100)}%"] = [
                f"schedule.decay_fraction={frac}",
                f"schedule.decay_shape={shape}",
            ]
    return out


def wsm_overrides(steps: int) -> list[str]:
    """The WSM run: the WSD 1-sqrt 20% schedule's settings, trained without its decay (the job's ``wsm`` mode, which
    also merges the last 20% at the end), snapshots every 1/60 of the run, enough kept for a 40% window."""
    every = max(1, steps // 60)
    return [
        "schedule.decay_fraction=0.2",
        "schedule.decay_shape=1-sqrt",
        "wsm.enabled=true",
        f"checkpoint.snapshot_every={every}",
        f"checkpoint.snapshot_keep={(steps * 4 // 10) // every + 1}",
    ]


def wsm_variants(steps: int) -> dict[str, dict[str, Any]]:
    """The merges compared: decay-emulating coefficients (1-sqrt, the WSD run's shape and floor) over 10%, 20% and
    40% of the run, uniform and EMA over 20% and 40%."""
    out: dict[str, dict[str, Any]] = {}
    for pct in (10, 20, 40):
        out[f"WSM 1-sqrt {pct}%"] = {"window": steps * pct // 100, "coefficients": "decay"}
    for pct in (20, 40):
        out[f"WSM uniform {pct}%"] = {"window": steps * pct // 100, "coefficients": "uniform"}
    out["WSM EMA 0.9 40%"] = {"window": steps * 40 // 100, "coefficients": "ema"}
    return out


def _job(seed: int, steps: int, overrides: list[str]) -> Any:
    from wsd_pretrain.config import apply_overrides, load_config
    from wsd_pretrain.train import resolve_job

    return resolve_job(apply_overrides(load_config(None, []), _settings(seed, steps, overrides)))


def _settings(seed: int, steps: int, overrides: list[str]) -> list[str]:
    """Every run's settings (the training runs' and the evaluation of merged models alike)."""
    return [
        f"train.seed={seed}",
        "train.progress=false",
        f"train.eval_every={EVAL_EVERY}",
        "train.eval_batches=16",
        f"schedule.total={steps}",
        f"schedule.warmup={WARMUP}",
        f"schedule.min_lr_ratio={MIN_LR}",
        "checkpoint.keep_last=10",
        *EXTRA,
        *overrides,
    ]


def evaluate_folder(folder: Path, job: Any, data: Any) -> float:
    """The validation loss of a Hugging Face folder's weights, computed as the training loop's ``evaluate`` does
    (one rank, ``train.eval_batches`` batches of held-out blocks)."""
    import torch
    from safetensors.torch import load_file

    from wsd_pretrain.model import LlamaLM

    torch.manual_seed(0)
    model = LlamaLM(job.model)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state: dict[str, Any] = {}
    for fname in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(folder / fname)))
    model.load_state_dict(state)
    model.eval()
    micro, n, total, batches = job.train.micro_batch_size, data.num_valid, 0.0, job.train.eval_batches
    with torch.no_grad():
        for b in range(batches):
            inputs, targets = data.valid_batch([(b * micro + j) % n for j in range(micro)])
            total += float(model(inputs, targets))
    return total / batches


def wsm_results(work: Path, seeds: list[int], steps: int, base_dir: Any) -> dict[str, Any]:
    """Merge each WSM run's snapshots over every window of :func:`wsm_variants` and evaluate the merged models; also
    evaluate the WSD 1-sqrt 20% run's final checkpoint the same way (it must agree with its logged loss)."""
    from wsd_pretrain.checkpoint import format as F
    from wsd_pretrain.checkpoint.merge import merge_checkpoints
    from wsd_pretrain.data import TokenData

    out: dict[str, Any] = {"final": {}, "check": [], "in_run_equal": []}
    for seed in seeds:
        run = work / f"wsm-s{seed}"
        job = _job(seed, steps, wsm_overrides(steps))
        data = TokenData(job.data)
        snaps = [i for i in F.list_snapshots(run) if i.state == "complete"]
        for name, v in wsm_variants(steps).items():
            folder = run / "merges" / name.replace(" ", "-").replace("%", "pct")
            if not folder.exists():
                window = [i.path for i in snaps if steps - v["window"] <= int(i.position or 0) <= steps]
                folder.parent.mkdir(exist_ok=True)
                merge_checkpoints(window, folder, coefficients=v["coefficients"], shape="1-sqrt", min_lr_ratio=MIN_LR)
            out["final"][(name, seed)] = evaluate_folder(folder, job, data)
        # the job's own merge at its milestone (the last 20%) is the same file as the offline one
        in_run = run / "merged" / f"step-{steps:09d}-wsm"
        offline = run / "merges" / "WSM-1-sqrt-20pct"
        out["in_run_equal"].append(
            any(offline.glob("*.safetensors"))
            and all((in_run / f.name).read_bytes() == f.read_bytes() for f in offline.glob("*.safetensors"))
        )
        wsd_final = F.resolve_checkpoint(base_dir(seed))
        logged = _evals(
            [json.loads(x) for x in (base_dir(seed) / "metrics.jsonl").read_text().splitlines() if x.startswith("{")]
        )[steps]
        wsd_job = _job(seed, steps, schedules(steps)["WSD 1-sqrt 20%"])
        out["check"].append(abs(evaluate_folder(wsd_final, wsd_job, data) - logged))
    return out


def _train(run_dir: Path, steps: int, seed: int, overrides: list[str], *extra: str) -> list[dict[str, Any]]:
    if not (run_dir / "done.json").exists():
        cmd = [
            sys.executable,
            "-m",
            "wsd_pretrain.train",
            "--run-dir",
            str(run_dir),
            "--resume",
            "auto",
            *extra,
            *_settings(seed, steps, overrides),
        ]
        if IN_PROCESS:
            from wsd_pretrain.train import main as train_main

            if train_main(cmd[3:]) != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed (its error is printed above)")
        else:
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
        (run_dir / "done.json").write_text("{}")
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.startswith("{")]


class _Inline:
    """An executor that runs each job at once, in this thread (``--in-process``)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def _evals(records: list[dict[str, Any]]) -> dict[int, float]:
    return {r["position"]: r["eval_loss"] for r in records if r.get("eval_loss") is not None}


def _lrs(records: list[dict[str, Any]]) -> dict[int, float]:
    return {r["position"]: r["lr"] for r in records if "lr" in r and "position" in r}


def _stat(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300, help="updates per run (the continuation goes to 1.5x)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="train in this process, one run after another (no interpreter start per run: for tiny smoke runs)",
    )
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "compare-schedules")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument(
        "--only-wsm",
        action="store_true",
        help="run only cosine, WSD 1-sqrt 20%% and WSM, and rewrite only the report's WSM section",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=DOC,
        help="the report to write (default docs/schedules.md; plots go to img/ beside it)",
    )
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a training setting for every run (e.g. model.hidden_size=32), repeatable",
    )
    args = ap.parse_args(argv)
    if args.steps < 20 or args.steps % 10:
        ap.error("--steps: a multiple of 10, at least 20")
    global EVAL_EVERY, WARMUP, EXTRA, IN_PROCESS
    EVAL_EVERY = WARMUP = args.steps // 10
    EXTRA, IN_PROCESS = list(args.override), args.in_process
    t0 = time.monotonic()
    steps, long = args.steps, args.steps * 3 // 2
    scheds = schedules(steps)
    base_name = "WSD 1-sqrt 20%"
    half = steps // 2
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

    def slug(name: str) -> str:
        return name.replace(" ", "-").replace("%", "pct")

    # stage 1: the matched-compute runs (the 1-sqrt 20% run also saves at half the run, for the cooldown branch)
    jobs: dict[tuple[str, int], Any] = {}
    if args.only_wsm:
        scheds = {n: scheds[n] for n in ("cosine", base_name)}
    with _Inline() if IN_PROCESS else ThreadPoolExecutor(args.jobs) as pool:
        for seed in args.seeds:
            jobs[("WSM", seed)] = pool.submit(_train, work / f"wsm-s{seed}", steps, seed, wsm_overrides(steps))
            for name, ov in scheds.items():
                extra = ("--save-every", str(half)) if name == base_name else ()
                jobs[(name, seed)] = pool.submit(_train, work / f"{slug(name)}-s{seed}", steps, seed, ov, *extra)
            if args.only_wsm:
                continue
            long_ov = [f"schedule.decay_length={(long * 2) // 10}", "schedule.decay_shape=1-sqrt"]
            jobs[("fresh long", seed)] = pool.submit(_train, work / f"fresh-long-s{seed}", long, seed, long_ov)
        results = {k: f.result() for k, f in jobs.items()}
        wsm = wsm_results(work, args.seeds, steps, lambda seed: work / f"{slug(base_name)}-s{seed}")
        if args.only_wsm:
            minutes = (time.monotonic() - t0) / 60
            print(f"all runs done in {minutes:.1f} min")
            if not args.no_doc:
                write_wsm_section(results, wsm, args.seeds, steps, minutes, args.out, only=True)
            return 0
        # stage 2: continuation from the pre-decay checkpoint, cooldown branch from the stable checkpoint
        more = {}
        for seed in args.seeds:
            ckdir = work / f"{slug(base_name)}-s{seed}" / "checkpoints"
            pre = next(p for p in sorted(ckdir.glob("step-*")) if "pre-decay" in p.name)
            stable = next(p for p in sorted(ckdir.glob(f"step-{half:09d}-*")))
            cont_ov = [f"schedule.decay_length={(long * 2) // 10}", "schedule.decay_shape=1-sqrt"]
            more[("continuation", seed)] = pool.submit(
                _train, work / f"continuation-s{seed}", long, seed, cont_ov, "--continue-from", str(pre)
            )
            more[("cooldown", seed)] = pool.submit(
                _train,
                work / f"cooldown-s{seed}",
                steps,
                seed,
                scheds[base_name],
                "--cooldown-from",
                str(stable),
                "--cooldown-steps",
                str(steps // 10),
            )
        results.update({k: f.result() for k, f in more.items()})
    minutes = (time.monotonic() - t0) / 60
    print(f"all runs done in {minutes:.1f} min")
    if not args.no_doc:
        write_doc(results, args.seeds, steps, long, half, scheds, minutes, args.out)
        write_wsm_section(results, wsm, args.seeds, steps, minutes, args.out)
    return 0


def write_doc(
    results: dict[tuple[str, int], list[dict[str, Any]]],
    seeds: list[int],
    steps: int,
    long: int,
    half: int,
    scheds: dict[str, list[str]],
    minutes: float,
    doc: Path = DOC,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from _bench import machine

    img = doc.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    final = {name: [_evals(results[(name, s)])[steps] for s in seeds] for name in scheds}
    cos = final["cosine"]
    rows = []
    for name in scheds:
        ev = [_evals(results[(name, s)]) for s in seeds]
        delta = [f - c for f, c in zip(final[name], cos, strict=True)]
        if name == "cosine":
            drop, pre = "", ""
        else:
            frac = float(name.split()[-1].rstrip("%")) / 100
            pre_at = steps - round(steps * frac)
            drops = [e[pre_at] - e[steps] for e in ev]
            drop, pre = _stat(drops), _stat([e[pre_at] for e in ev])
        rows.append(
            f"| {name} | {_stat(final[name])} | {'' if name == 'cosine' else _stat(delta)} | "
            f"{sum(d < 0 for d in delta) if name != 'cosine' else ''} | {pre} | {drop} |"
        )
    cont = [_evals(results[("continuation", s)])[long] for s in seeds]
    fresh = [_evals(results[("fresh long", s)])[long] for s in seeds]
    base = "WSD 1-sqrt 20%"
    cool = [_evals(results[("cooldown", s)])[half + steps // 10] for s in seeds]
    at_branch_end = [_evals(results[(base, s)])[half + steps // 10] for s in seeds]
    at_branch = [_evals(results[(base, s)])[half] for s in seeds]

    # plots: LR curves of every schedule; mean validation loss; the continuation against the fresh long run
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for name in scheds:
        lr = _lrs(results[(name, seeds[0])])
        xs = sorted(lr)
        axes[0].plot(xs, [lr[x] for x in xs], label=name, lw=1.2)
        ev = [_evals(results[(name, s)]) for s in seeds]
        pts = sorted(set.intersection(*(set(e) for e in ev)))
        axes[1].plot(pts, [statistics.mean(e[p] for e in ev) for p in pts], label=name, lw=1.2, marker=".")
    axes[0].set(title="learning rate", xlabel="update")
    axes[1].set(title=f"validation loss (mean of {len(seeds)} seeds)", xlabel="update", ylabel="loss (nats/byte)")
    lo = min(min(v) for v in final.values())
    axes[1].set_ylim(lo - 0.05, lo + 0.6)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "schedules_compare.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("fresh long", f"fresh {long}-update run"), ("continuation", "continuation (WSD)")):
        ev = [_evals(results[(key, s)]) for s in seeds]
        pts = sorted(set.intersection(*(set(e) for e in ev)))
        ax.plot(pts, [statistics.mean(e[p] for e in ev) for p in pts], marker=".", label=label)
    ev = [_evals(results[(base, s)]) for s in seeds]
    pts = sorted(set.intersection(*(set(e) for e in ev)))
    ax.plot(
        pts, [statistics.mean(e[p] for e in ev) for p in pts], marker=".", label=f"{base} ({steps} updates)", alpha=0.6
    )
    ev = [{**_evals(results[(base, s)]), **_evals(results[("cooldown", s)])} for s in seeds]  # from the branch point
    pts = [
        half,
        *sorted(p for p in set.intersection(*(set(_evals(results[("cooldown", s)])) for s in seeds)) if p > half),
    ]
    ax.plot(pts, [statistics.mean(e[p] for e in ev) for p in pts], marker="o", label=f"cooldown branch from {half}")
    ax.set(title="continuation and cooldown branch", xlabel="update (trajectory)", ylabel="validation loss")
    ax.set_ylim(min(min(cont), min(fresh)) - 0.05, min(min(cont), min(fresh)) + 0.6)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "schedules_continuation.png", dpi=110)
    plt.close(fig)

    def mean(xs: list[float]) -> float:
        return statistics.mean(xs)

    best = min(scheds, key=lambda n: mean(final[n]))
    # Wen et al.: above cosine through the stable phase, a sharp drop in the decay. Measured on the 1-sqrt 20% run:
    # the share of stable-phase evaluations above cosine, and the decay's drop against the drop over the same
    # number of updates just before it
    warm, dlen = steps // 10, steps // 5
    pre_at = steps - dlen
    mean_ev = {
        n: {p: mean([_evals(results[(n, s)])[p] for s in seeds]) for p in _evals(results[(n, seeds[0])])}
        for n in scheds
    }
    stable_pts = [p for p in mean_ev[base] if warm < p < pre_at and p in mean_ev["cosine"]]
    above = sum(mean_ev[base][p] > mean_ev["cosine"][p] for p in stable_pts)
    before = pre_at - dlen
    decay_drop = mean_ev[base][pre_at] - mean_ev[base][steps]
    prior_drop = mean_ev[base][before] - mean_ev[base][pre_at] if before in mean_ev[base] else float("nan")
    tokens = steps * 16 * 128
    deltas = {n: mean([f - c for f, c in zip(final[n], cos, strict=True)]) for n in scheds if n != "cosine"}
    lin_vs_sqrt = [a - b for a, b in zip(final["WSD linear 20%"], final["WSD 1-sqrt 20%"], strict=True)]
    from wsd_pretrain import WSDSchedule

    cos_sched = WSDSchedule(total=steps, warmup=warm, decay_length=steps - warm, decay_shape="cosine")
    half_lr_at = next(p for p in range(warm, steps + 1) if cos_sched.factor(p) <= 0.5)
    inv = WSDSchedule(total=steps, warmup=warm, decay_fraction=0.2, decay_shape="inverse", min_lr_ratio=MIN_LR)
    inv_quarter = inv.factor(pre_at + dlen // 4)
    sqrt20 = mean(final["WSD 1-sqrt 20%"]) - mean(cos)
    lines = [
        "# WSD against cosine at small scale",
        "",
        "Written by `python tools/compare_schedules.py` "
        f"({len(seeds)} seeds, {steps} updates per run, {minutes:.0f} minutes on {machine()}).",
        "",
        "Setup: the default tiny model (0.8M parameters, byte-level Llama) on the standard library's sources, 16",
        f"sequences of 128 bytes per update, AdamW at peak LR 3e-3, a linear warmup over {steps // 10} updates,",
        f"every schedule ending at {MIN_LR:g}x the peak LR. Matched compute: every run of the table makes the same",
        f"{steps} updates on the same data order; seeds change the initialization. Validation loss is the mean",
        f"cross-entropy (nats per byte) on 16 batches of held-out blocks, measured every {steps // 10} updates.",
        *(["", f"Settings changed for every run (`--override`): `{' '.join(EXTRA)}`."] if EXTRA else []),
        "",
        "## Final validation loss",
        "",
        "| schedule | final validation loss | vs cosine | seeds better than cosine | loss at pre-decay | drop during decay |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        'Mean ± standard deviation over seeds; "vs cosine" is the per-seed difference (negative: better than',
        'cosine), "drop during decay" the validation loss at the pre-decay point minus the final one.',
        "",
        "![learning rates and validation loss](img/schedules_compare.png)",
        "",
        "## Continuation and cooldown branch",
        "",
        f"- Continuation (WSD): from the {base} run's pre-decay checkpoint (update {steps - steps // 5}), "
        f"`--continue-from` to {long} updates (decay over the last {(long * 2) // 10}, as the fresh run): final "
        f"validation loss {_stat(cont)}, against {_stat(fresh)} for a fresh {long}-update run with the same "
        f"schedule (difference {_stat([c - f for c, f in zip(cont, fresh, strict=True)])}).",
        f"- Cooldown branch: from the stable checkpoint at update {half}, `--cooldown-from` for {steps // 10} updates "
        f"(1-sqrt): validation loss {_stat(cool)} at update {half + steps // 10}, against {_stat(at_branch_end)} for "
        f"the main run, still in its stable phase, at the same update (and {_stat(at_branch)} at the branch "
        "point).",
        "",
        "![continuation and cooldown](img/schedules_continuation.png)",
        "",
        "## Against the published findings",
        "",
        f"- Hägele et al. 2024 (a ~20% 1-sqrt cooldown matches or beats cosine): here WSD 1-sqrt 20% ends "
        f"{abs(sqrt20):.4f} {'below' if sqrt20 < 0 else 'above'} cosine on average "
        f"({sum(d < 0 for d in [f - c for f, c in zip(final['WSD 1-sqrt 20%'], cos, strict=True)])} of "
        f"{len(seeds)} seeds better); the lowest mean is {best}.",
        f"- Wen et al. 2024 (the loss stays high in the stable phase and drops sharply in the decay): the {base} run's",
        f"  validation loss is above cosine's at {above} of {len(stable_pts)} stable-phase evaluations; in its",
        f"  {dlen}-update decay it falls by {decay_drop:.4f}, against {prior_drop:.4f} in the {dlen} stable updates",
        f"  before it ({decay_drop / prior_drop if prior_drop > 0 else float('inf'):.1f}x).",
        f"- The continuation ends {'exactly at' if cont == fresh else 'near'} the fresh run's loss: in WSD the",
        "  stable phase does not depend on the run's length, so a continuation from the pre-decay checkpoint retraces",
        "  the longer run (same data order, restored RNG and optimizer state), which is the property that lets a",
        "  team extend a run after the fact.",
        "",
        "## Where this differs from the papers, and why it may",
        "",
        f"- Every WSD variant beats cosine here, by {-max(deltas.values()):.3f} to {-min(deltas.values()):.3f} nats;",
        "  the papers report WSD matching cosine or ahead by a little. Each run here sees only",
        f"  {tokens / 1e6:.2f} million bytes with a 0.8M-parameter model and is far from convergence (the stable-phase",
        f"  loss still falls by {prior_drop:.3f} over the last {dlen} stable updates), where a high LR kept longer pays",
        f"  most; cosine is already below half its peak LR at update {half_lr_at} of {steps}.",
        f"- Linear against 1-sqrt at 20%: linear minus 1-sqrt is {_stat(lin_vs_sqrt)} per seed "
        f"({sum(d < 0 for d in lin_vs_sqrt)} of {len(seeds)} seeds lower with linear). Hägele et al. find 1-sqrt",
        "  ahead of linear; "
        + (
            "here the order is reversed in every seed, by a margin small next to the gap to cosine."
            if all(d < 0 for d in lin_vs_sqrt)
            else "here the seeds disagree, so this experiment does not order the two."
        ),
        (
            "- The inverse-proportional shape ends last among the WSD shapes"
            if "inverse" in max(deltas, key=lambda n: deltas[n])
            else f"- The worst WSD variant is {max(deltas, key=lambda n: deltas[n])}; the inverse-proportional shape"
        )
        + f": with a floor of {MIN_LR:g}, its LR is at {inv_quarter:.3f}x the peak a quarter of the way into the",
        "  decay, so most of the decay runs near the floor, where this far-from-converged model makes little progress.",
        f"- The decay's drop is {decay_drop / prior_drop if prior_drop > 0 else float('inf'):.1f}x the stable phase's "
        "over as many updates, a visible but not a dramatic knee: the stable phase itself is still improving fast",
        "  at this scale, so the contrast Wen et al. describe (a loss that stays high, then falls sharply) is weaker.",
    ]
    doc.write_text("\n".join(lines) + "\n")
    print(f"wrote {doc}")


WSM_DERIVATION = """\
WSM (Tian et al., "WSM: Decay-Free Learning Rate Schedule via Checkpoint Merging for LLM Pre-training", arXiv
2507.17634) trains at the stable LR to the end and replaces the decay by a weighted average of the last
checkpoints of the stable phase. What `wsd-pretrain ckpt merge` and the job's `wsm` mode compute, exactly
(`wsd_pretrain/checkpoint/merge.py`):

Take checkpoints at trajectory positions `p_0 < p_1 < ... < p_k` (updates trained into the model), weights
`theta_0 .. theta_k`, and write `U_j = theta_j - theta_(j-1)`: the sum of the updates made between `p_(j-1)` and
`p_j`, at the stable LR. A merge with coefficients `c_0 + ... + c_k = 1` is

    sum_j c_j theta_j = theta_0 + sum_(j=1..k) W_j U_j,    W_j = c_j + c_(j+1) + ... + c_k,

so the merge takes the updates of segment `j` with weight `W_j` instead of 1. A decay of shape `f` over the
`D = p_k - p_0` units of the window would have made update `i` (1-based, from `p_0`) at `f(i / D)` times the
stable LR (`f` from `wsd_pretrain.shapes.decay_factor`, read at the end of each update as the schedule's
default `progress="end"`: the last update at the floor). To first order (an update proportional to its LR,
the gradients those of the stable trajectory) that run ends at `theta_0 + sum_i f(i / D) u_i`. A merge can give
each segment one weight, so the decay-emulating coefficients take `W_j` = the mean of `f(i / D)` over the
updates of segment `j`, that is

    c_k = W_k,    c_j = W_j - W_(j+1)  (1 <= j < k),    c_0 = 1 - W_1,

all non-negative for a decreasing `f`, summing to 1. With a snapshot after every update this is the decay
itself, to first order; at a coarser cadence each segment's updates share their mean LR. Positions in tokens
(more than 1,000,000 units in the window) use the mean over 1,000,000 evenly spaced points. `uniform` is
`c_j = 1 / (k + 1)`; `ema` the moving average `m <- a m + (1 - a) theta_j` started at `theta_0`:
`c_0 = a^k`, `c_j = (1 - a) a^(k - j)`. The sum is accumulated in fp32 from the oldest checkpoint to the newest,
one tensor at a time, and cast to the output dtype at the end.
"""


def write_wsm_section(
    results: dict[tuple[str, int], list[dict[str, Any]]],
    wsm: dict[str, Any],
    seeds: list[int],
    steps: int,
    minutes: float,
    doc: Path = DOC,
    only: bool = False,
) -> None:
    """The WSM section of the report, replacing the one there (or appended)."""
    from _bench import machine

    def final_of(name: str) -> list[float]:
        if name in ("cosine", "WSD 1-sqrt 20%"):
            return [_evals(results[(name, s)])[steps] for s in seeds]
        if name == "stable (no decay, no merge)":
            return [_evals(results[("WSM", s)])[steps] for s in seeds]
        return [wsm["final"][(name, s)] for s in seeds]

    names = ["cosine", "WSD 1-sqrt 20%", "stable (no decay, no merge)", *wsm_variants(steps)]
    finals = {n: final_of(n) for n in names}
    wsd, cos = finals["WSD 1-sqrt 20%"], finals["cosine"]
    rows = []
    for n in names:
        vs_wsd = [a - b for a, b in zip(finals[n], wsd, strict=True)]
        vs_cos = [a - b for a, b in zip(finals[n], cos, strict=True)]
        rows.append(
            f"| {n} | {_stat(finals[n])} | {'' if n == 'WSD 1-sqrt 20%' else _stat(vs_wsd)} | "
            f"{'' if n == 'WSD 1-sqrt 20%' else sum(d < 0 for d in vs_wsd)} | "
            f"{'' if n == 'cosine' else _stat(vs_cos)} |"
        )
    merges = [n for n in names if n.startswith("WSM")]
    mean = statistics.mean
    best_merge = min(merges, key=lambda n: mean(finals[n]))
    best = min(names, key=lambda n: mean(finals[n]))
    gap = mean(finals[best_merge]) - mean(wsd)
    stable_gain = mean(finals["stable (no decay, no merge)"]) - mean(finals[best_merge])
    decay_gain = mean(finals["stable (no decay, no merge)"]) - mean(wsd)
    windows = {n: mean(finals[n]) for n in merges if "1-sqrt" in n}
    every = max(1, steps // 60)
    if decay_gain <= 0:
        verdict = [
            f"- In this regime the decay itself does not help: the stable run's undecayed final weights end "
            f"{-decay_gain:.4f} below WSD 1-sqrt 20% ({sum(a < b for a, b in zip(finals['stable (no decay, no merge)'], wsd, strict=True))} of {len(seeds)} seeds),",
            f"  and every merge ends above them too (the best, {best_merge}, by {-stable_gain:.4f})."
            if stable_gain <= 0
            else f"  while the best merge ({best_merge}) ends {stable_gain:.4f} below them.",
            f"  So the merges {'beat' if gap < 0 else 'trail'} WSD here ({best_merge}: {gap:+.4f}) only as far as they",
            "  stay close to the undecayed weights (the shorter the window, the closer): this run cannot tell whether",
            "  a merge stands in for a decay, because the decay brings nothing to stand in for.",
        ]
    elif gap > 0:
        verdict = [
            f"- WSM does not match the decay here: its best merge ({best_merge}) ends {gap:.4f} above WSD 1-sqrt 20%,",
            f"  recovering {stable_gain:.4f} of the {decay_gain:.4f} that the decay gains over the undecayed weights.",
            "  Tian et al. report WSM ahead of WSD decays at 1B-10B scale. At this scale the model is far from",
            "  convergence and the stable-phase loss is still falling fast, so a merge's older snapshots are much",
            "  worse models, and a real decay also changes the gradients its later updates see, which the",
            "  first-order equivalence above leaves out: the merge can only replay the stable run's updates.",
        ]
    else:
        verdict = [
            f"- WSM matches or beats the decay here: {best_merge} ends {-gap:.4f} below WSD 1-sqrt 20%, and",
            f"  {stable_gain:.4f} below the undecayed weights (the decay: {decay_gain:.4f}), as Tian et al. report at",
            "  1B-10B scale.",
        ]
    lines = [
        WSM_SECTION,
        "",
        f"Written by `python tools/compare_schedules.py{' --only-wsm' if only else ''}` ({len(seeds)} seeds, "
        f"{steps} updates per run, {minutes:.0f} minutes on {machine()}).",
        *(["", f"Settings changed for every run (`--override`): `{' '.join(EXTRA)}`."] if EXTRA else []),
        "",
        WSM_DERIVATION,
        "Setup: the default tiny job (byte-level Llama on the standard library's sources, 16 sequences of 128 bytes",
        f"per update, AdamW, a linear warmup over {steps // 10} updates) with the settings above (peak LR 3e-3 unless",
        "they set `optimizer.lr`); the",
        f"cosine and WSD 1-sqrt 20% runs end at {MIN_LR:g}x the peak LR. Every run makes the same {steps} updates on",
        "the same data order; seeds change the initialization. The WSM run is the WSD",
        "1-sqrt 20% job with `wsm.enabled=true`: it trains at the stable LR to the last update and writes a",
        f"model-only snapshot every {every} updates; its merges use the snapshots of the last 10%, 20% or 40% of the run",
        f"(decay-emulating coefficients for the WSD run's 1-sqrt shape and floor {MIN_LR:g}, uniform, or an EMA with",
        "a = 0.9), so every row saw the same tokens. Merged models are evaluated on the same held-out batches as",
        "the training runs' own evaluation (the same code path applied to the WSD run's final checkpoint reproduces",
        f"its logged loss within {max(wsm['check']):.1e}). The job's own merge at its milestone (the last 20%) is",
        f"{'byte for byte' if all(wsm['in_run_equal']) else 'NOT'} the offline `WSM 1-sqrt 20%` merge.",
        "",
        "| model | final validation loss | vs WSD 1-sqrt 20% | seeds better than WSD | vs cosine |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"- The lowest mean of the table is {best}.",
        *verdict,
        "- The window matters: decay-emulating merges over "
        + ", ".join(f"{n.split()[-1]} end at {v:.4f}" for n, v in windows.items())
        + f" (best: {min(windows, key=lambda n: windows[n])}).",
        "",
    ]
    text = doc.read_text() if doc.exists() else ""
    if WSM_SECTION in text:
        text = text[: text.index(WSM_SECTION)].rstrip("\n") + "\n"
    doc.write_text((text + "\n" if text else "") + "\n".join(lines))
    print(f"wrote the WSM section of {doc}")


if __name__ == "__main__":
    sys.exit(main())
