"""The ``wsd-pretrain`` command: thin argument parsing over library functions.

Subcommands:
  ckpt       list, inspect, verify, export-hf, merge, from-deepspeed, reshard, to-dcp, from-dcp
  train      train (see ``wsd-pretrain train --help``; also ``python -m wsd_pretrain.train``)
  schedule   print a schedule's phases and milestones (``--plot out.png`` draws it)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import apply_overrides, load_config
from .errors import WSDError
from .schedule import WSDSchedule

__all__ = ["main"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"


def _default_config_path() -> Path | None:
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


# ---------------------------------------------------------------------------------------------- schedule


def schedule_from_config(config: dict[str, Any], total_steps: int | None = None) -> WSDSchedule:
    """The ``schedule:`` section as a :class:`WSDSchedule`; ``total_steps`` rescales it (``--total-steps``)."""
    from .config import build

    schedule = build(WSDSchedule, config.get("schedule"), where="schedule section")
    return schedule.rescaled(total_steps) if total_steps is not None else schedule


def format_schedule(schedule: WSDSchedule, base_lr: float | None) -> str:
    """The table ``wsd-pretrain schedule`` prints."""
    lr = base_lr if base_lr is not None else 1.0
    unit = schedule.units
    shape = schedule.decay_shape if isinstance(schedule.decay_shape, str) else "custom"
    head = [
        f"WSD schedule: {schedule.total} {unit}"
        + (f" from {schedule.origin} (continuation)" if schedule.origin else "")
        + f", mode {schedule.mode}, LR read at the {schedule.progress} of each update",
        f"  warmup {schedule.warmup} ({schedule.warmup_shape} from {schedule.warmup_start_ratio:g} x base), "
        f"decay {shape} to {schedule.min_lr_ratio:g} x base"
        + (f", base LR {base_lr:g}" if base_lr is not None else " (LRs shown as factors of the base LR)"),
    ]
    rows = [("phase", "period", "from", "to (excl.)", "length", "LR first", "LR last")]
    for ph in schedule.segments():
        first = ph.start if ph.start >= schedule.origin else schedule.origin
        last = ph.start + ph.length - 1
        rows.append(
            (
                ph.name,
                str(ph.period),
                str(first),
                str(ph.start + ph.length),
                str(ph.start + ph.length - first),
                f"{lr * schedule.factor(first):.4g}",
                f"{lr * schedule.factor(last):.4g}",
            )
        )
    ms_rows = [("milestone", "budget", "decay", "pre-decay at", "post-decay at", "then")]
    for ms in schedule.milestones_info:
        if ms.final:
            then = "end of run"
        elif ms.rewind:
            then = f"rewind to pre-decay ({ms.trajectory_pre_decay} trained)"
        else:
            then = "continue from decayed weights" if schedule.mode == "wsd-s" else "continue"
        ms_rows.append((str(ms.index), str(ms.at), str(ms.decay_length), str(ms.pre_decay), str(ms.post_decay), then))
    out = [*head, "", "phases:", *_table(rows), "", "milestones (checkpoints at pre-decay and post-decay points):"]
    out += _table(ms_rows) if len(ms_rows) > 1 else ["  none (no decay: cool down later with a branch)"]
    if schedule.mode == "branching":
        out.append(f"  the run does {schedule.end} {unit} of work in all, branches included")
    return "\n".join(out)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _cmd_schedule(args: argparse.Namespace) -> int:
    config_path = args.config if args.config is not None else _default_config_path()
    config = load_config(config_path, [])
    config = apply_overrides(config, args.overrides)
    base_lr = args.lr if args.lr is not None else (config.get("optimizer") or {}).get("lr")
    train = config.get("train")
    if isinstance(train, dict) and train.get("engine") == "deepspeed" and train.get("ds_config"):
        # what the job runs: the ds_config's WSD section and optimizer LR where it has them (docs/training.md)
        from .train import deepspeed_plan, resolve_job

        job = resolve_job(
            config, total_steps=args.total_steps, config_dir=config_path.parent if config_path is not None else None
        )
        schedule, plan = job.schedule, deepspeed_plan(job, config)
        if args.lr is None and plan.optimizer is not None:
            base_lr = (plan.optimizer.get("params") or {}).get("lr")
    else:
        schedule = schedule_from_config(config, args.total_steps)
    if args.json:
        payload = {
            "schedule": schedule.to_dict(),
            "end": schedule.end,
            "milestones": [
                ms.__dict__ | {"trajectory_pre_decay": ms.trajectory_pre_decay} for ms in schedule.milestones_info
            ],
            "phases": [ph.__dict__ for ph in schedule.segments()],
        }
        print(json.dumps(payload, indent=2))
    else:
        print(format_schedule(schedule, base_lr))
    if args.plot:
        from .plotting import plot_schedule

        path = plot_schedule(schedule, args.plot, base_lr=base_lr or 1.0)
        print(f"plot written to {path}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- ckpt


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _with_bar(desc: str, run: Callable[[Callable[[int], Any]], Path]) -> Path:
    """Run a conversion, given a progress callback that advances a bar (tensors done) on standard error."""
    from tqdm import tqdm

    with tqdm(total=0, desc=desc, unit="tensor", file=sys.stderr, dynamic_ncols=True, mininterval=0.5) as bar:
        return run(bar.update)


def _local_path(text: str) -> Path:
    """A local path argument: a plain path or file://; a URL on object storage is refused with what does take one
    (argparse shows the message)."""
    from .checkpoint.storage import ObjectURL, parse_location
    from .errors import ConfigError

    try:
        loc = parse_location(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if isinstance(loc, ObjectURL):
        raise argparse.ArgumentTypeError(
            f"{text}: this command reads a local folder only (a foreign format we cannot verify on the bucket): "
            "download it first (e.g. `aws s3 cp --recursive`, `azcopy copy`); our checkpoints are copied with "
            "`wsd-pretrain ckpt cp` (list, inspect, verify, cp, export-hf, reshard, merge and to-dcp read s3:// and "
            "az:// URLs; export-hf, reshard, merge, to-dcp, from-dcp and from-deepspeed write to them)"
        )
    return loc


def _cmd_ckpt(args: argparse.Namespace) -> int:
    from .checkpoint import format as F
    from .checkpoint.manager import parse_size as _parse_size
    from .errors import CheckpointError

    def parse_size(text: str) -> int:
        # a plain number on the command line is bytes, as the help says (parse_size takes ints, not "20000")
        return int(text) if text.strip().isdigit() else _parse_size(text)

    action = args.action
    if action in _URL_ACTIONS:
        from .checkpoint import objstore
        from .checkpoint.storage import ObjectURL, parse_location

        for attr in ("run_dir", "ckpt", "out"):
            if isinstance(getattr(args, attr, None), str):
                setattr(args, attr, parse_location(getattr(args, attr)))
        if isinstance(getattr(args, "ckpts", None), list):
            args.ckpts = [parse_location(c) if isinstance(c, str) else c for c in args.ckpts]
        if isinstance(getattr(args, "out", None), ObjectURL):
            if action not in _URL_OUTPUTS:
                raise WSDError(
                    f"{args.out}: {action} writes a local folder; write it locally (then copy a checkpoint with "
                    "`wsd-pretrain ckpt cp`)"
                )
            return _to_url(args, action, args.out)
        if action == "merge" and any(isinstance(c, ObjectURL) for c in args.ckpts):
            return _merge_from_urls(args, parse_size)
        if action == "cp":
            done = objstore.copy(args.src, args.dst, replace_unfinished=args.replace_unfinished)
            print(f"{len(done)} checkpoint(s) copied to {args.dst}")
            return 0
        if action == "list" and isinstance(args.run_dir, ObjectURL):
            infos = objstore.list_run(args.run_dir)
            infos += objstore.list_run(args.run_dir, snapshots=True)
            if args.checksums:
                import tempfile

                for info in infos:
                    if info.state == "complete":
                        with tempfile.TemporaryDirectory(prefix="wsd-list-") as tmp:
                            problems = objstore.fetch(info.path, Path(tmp) / info.name)  # type: ignore[arg-type]
                        if problems:
                            info.state, info.problem = "corrupt", "; ".join(problems)
            return _print_list(args, infos + _merged_folders(args.run_dir))
        if isinstance(getattr(args, "ckpt", None), ObjectURL):
            return _ckpt_from_url(args, action)
    if action == "list":
        if not args.run_dir.exists():
            raise CheckpointError(f"{args.run_dir} does not exist: give a run directory (the one passed to --run-dir)")
        if not args.run_dir.is_dir():
            raise CheckpointError(f"{args.run_dir} is a file, not a run directory")
        infos = F.list_checkpoints(args.run_dir, checksums=args.checksums)
        infos += F.list_snapshots(args.run_dir, checksums=args.checksums)  # model-only, listed after
        return _print_list(args, infos + _merged_folders(args.run_dir))
    return _cmd_ckpt_local(args, action, parse_size)


_URL_ACTIONS = (
    "list",
    "inspect",
    "verify",
    "export-hf",
    "reshard",
    "cp",
    "merge",
    "to-dcp",
    "from-dcp",
    "from-deepspeed",
)
"""The ckpt commands that take s3:// / az:// URLs (docs/tools.md): every one whose input is our checkpoint (read
through a verified download, or in place for list/verify --sizes-only/inspect's headers) ..."""
_URL_OUTPUTS = ("export-hf", "reshard", "merge", "from-deepspeed", "to-dcp", "from-dcp")
"""... and those that may write to one: the output is built in a local temporary folder (under $TMPDIR), then
uploaded: a checkpoint (reshard, from-deepspeed) with the object-storage commit (manifest last), a Hugging Face
folder (export-hf, merge, from-dcp) or a DCP directory (to-dcp) object by object, each created only if absent,
into a prefix that must be empty, the file its readers open first (``config.json``, ``.metadata``) last."""


def _to_url(args: argparse.Namespace, action: str, out: Any) -> int:
    """A ckpt command of :data:`_URL_OUTPUTS` with an output on object storage: checked before any work, built
    locally, then uploaded."""
    import tempfile

    from .checkpoint import format as F
    from .checkpoint import objstore
    from .checkpoint.storage import store_for

    store = store_for(out)
    if action == "reshard":
        if out.parent.name not in (F.CHECKPOINTS, F.SNAPSHOTS) or F.parse_name(out.name) is None:
            raise WSDError(
                f"{out}: a resharded checkpoint on object storage goes into a run: give s3://bucket/RUN/checkpoints/"
                "NAME with a checkpoint name such as step-000001000-periodic"
            )
        if store.head((out / F.MANIFEST).key) is not None:
            raise WSDError(f"{out} already holds a committed checkpoint: give a new name")
    elif action in ("export-hf", "merge", "to-dcp", "from-dcp"):
        objects, _ = store.list(out.prefix)
        if objects:
            raise WSDError(f"{out} is not empty ({len(objects)} object(s) under it): give a new prefix")
    with tempfile.TemporaryDirectory(prefix="wsd-out-") as tmp:
        local = Path(tmp) / (out.name or "out")
        args.out = local
        code = _cmd_ckpt(args)
        if code != 0:
            return code
        if action == "reshard":
            objstore.upload(local, out.parent.parent, root=out.parent.name)
        elif action == "from-deepspeed":
            objstore.copy(local, out, log=lambda _msg: None)
        else:  # DCP's readers open .metadata first (its own save writes it last)
            objstore.upload_folder(store, local, out, last=".metadata" if action == "to-dcp" else "config.json")
    print(f"uploaded to {out}")
    return 0


def _merge_from_urls(args: argparse.Namespace, parse_size: Callable[[str], int]) -> int:
    """merge with inputs on object storage: each checkpoint (or, with --last K, each of a run's newest K snapshots)
    is downloaded, verified against its manifest, into a temporary folder beside the output; then the local merge."""
    import tempfile

    from .checkpoint import objstore
    from .checkpoint.storage import ObjectURL

    sources: list[Any] = []
    for c in args.ckpts:
        if not isinstance(c, ObjectURL):
            sources.append(c)
        elif args.last is not None:
            if len(args.ckpts) != 1:
                raise WSDError("--last K goes with one run directory: its newest K snapshots are merged")
            snaps = [i.path for i in objstore.list_run(c, snapshots=True) if i.state == "complete"]
            if not snaps or args.last > len(snaps):
                raise WSDError(f"{c}: --last {args.last} asked, the run has {len(snaps)} snapshot(s) on the bucket")
            sources.extend(snaps[-args.last :])
        else:
            sources.append(objstore.resolve(c))
    where = Path(args.out).absolute().parent
    where.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wsd-fetch-", dir=where) as tmp:
        local = []
        for i, src in enumerate(sources):
            if isinstance(src, ObjectURL):
                dest = Path(tmp) / str(i) / src.name
                problems = objstore.fetch(src, dest)
                if problems:
                    raise WSDError(f"{src}: damaged objects: " + "; ".join(problems))
                local.append(dest)
            else:
                local.append(src)
        args.ckpts, args.last = local, None
        return _cmd_ckpt_local(args, "merge", parse_size)


def _merged_folders(run: Any) -> list[Any]:
    """The decay-free mode's merged models of a run (``<run>/merged/step-<m>-wsm/``, Hugging Face folders), for
    ``ckpt list``: "complete" when ``config.json`` is there (it is written last, and removed first when a resumed
    run replaces the folder), else "unfinished". On object storage the ``config.json`` object decides (a HEAD),
    never the listing alone."""
    import re

    from .checkpoint import format as F
    from .checkpoint.storage import ObjectURL, store_for
    from .wsm import MERGED

    sizes: dict[str, int] = {}
    complete: dict[str, bool] = {}
    if isinstance(run, ObjectURL):
        store, root = store_for(run), run / MERGED
        objects, _ = store.list(root.prefix)
        for o in objects:
            name = o["key"][len(root.prefix) :].split("/", 1)[0]
            sizes[name] = sizes.get(name, 0) + o["size"]
        for name in sizes:
            complete[name] = store.head((root / name / "config.json").key) is not None
    elif (Path(run) / MERGED).is_dir():
        root = Path(run) / MERGED
        for d in root.iterdir():
            if d.is_dir() and not d.name.startswith("."):
                sizes[d.name] = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                complete[d.name] = (d / "config.json").is_file()
    out = []
    for name in sizes:
        m = re.fullmatch(r"step-(\d+)-wsm", name)
        if m is None:
            continue
        state = "complete" if complete[name] else "unfinished"
        out.append(F.CheckpointInfo(name, root / name, state, position=int(m.group(1)), kinds=["merged"]))
        out[-1].size = sizes[name]
    return sorted(out, key=lambda i: i.position)


def _print_list(args: argparse.Namespace, infos: list[Any]) -> int:
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": i.name,
                        "state": i.state,
                        "position": i.position,
                        "kinds": i.kinds,
                        "size": i.size,
                        "latest": i.latest,
                        "problem": i.problem,
                    }
                    for i in infos
                ],
                indent=2,
            )
        )
        return 0
    if not infos:
        print(f"no checkpoints in {args.run_dir}")
        return 0
    rows = [("", "name", "position", "kinds", "size", "state")]
    for i in infos:
        rows.append(
            (
                "*" if i.latest else "",
                i.name,
                "" if i.position is None else str(i.position),
                "+".join(i.kinds),
                _human(i.size),
                i.state + (f": {i.problem}" if i.problem else ""),
            )
        )
    print("\n".join(_table(rows)))
    print(
        "  * = latest"
        + ("; snapshots (model only) are in snapshots/" if any("snapshot" in i.kinds for i in infos) else "")
        + ("; merged models (Hugging Face folders) in merged/" if any("merged" in i.kinds for i in infos) else "")
    )
    return 0


def _ckpt_from_url(args: argparse.Namespace, action: str) -> int:
    """inspect, verify, export-hf and reshard of a checkpoint on object storage: its objects are fetched (each
    checked against the manifest on the way) into a temporary folder beside the output (inspect: only the JSON
    files and each safetensors header, one ranged GET each), and the local command runs on it."""
    import tempfile

    from .checkpoint import objstore
    from .checkpoint.manager import parse_size as _parse_size

    src = objstore.resolve(args.ckpt, damaged="return" if action == "verify" else "error")
    if action == "verify" and args.sizes_only:
        from .checkpoint.storage import store_for

        store = store_for(src)
        m, _, _ = objstore.load_manifest(store, src)
        objects, _ = store.list(src.prefix)
        problems = objstore.size_problems(store, src, m, {o["key"][len(src.prefix) :]: o["size"] for o in objects})
        for p in problems:
            print(f"BAD  {p}")
        if problems:
            print(f"{src.name}: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        print(f"OK   {src.name}: {len(m['files'])} files match the manifest (sizes)")
        return 0
    where = None if action in ("inspect", "verify") else Path(args.out).absolute().parent
    if where is not None:
        where.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wsd-fetch-", dir=where) as tmp:
        local = Path(tmp) / src.name
        problems = objstore.fetch(src, local, headers_only=action == "inspect")
        if action == "verify" and problems:
            for p in problems:
                print(f"BAD  {p}")
            print(f"{src.name}: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        if problems:
            raise WSDError(f"{src}: damaged objects: " + "; ".join(problems))
        args.ckpt = local

        def parse_size(text: str) -> int:
            return int(text) if text.strip().isdigit() else _parse_size(text)

        return _cmd_ckpt_local(args, action, parse_size)


def _cmd_ckpt_local(args: argparse.Namespace, action: str, parse_size: Callable[[str], int]) -> int:
    from .checkpoint import format as F
    from .checkpoint import tools

    if action == "inspect":
        info = tools.inspect_checkpoint(args.ckpt)
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        sched = info.get("schedule", {})
        print(f"{info['name']}  ({'+'.join(info['kinds'])})")
        print(
            f"  position {info['position']} (trajectory {info['trajectory_position']}), step {info['step']}, "
            f"tokens {info['tokens']:,}"
        )
        if "phase" in sched:
            print(
                f"  schedule: {sched['phase']} phase, period {sched['period']}, progress {sched['progress']}, "
                f"run ends at {sched['end']} {sched['units']} ({sched['mode']})"
            )
        layout = info["layout"]
        print(f"  written by {info['world_size']} rank(s): " + ", ".join(f"{k}={v}" for k, v in layout.items()))
        for group, by_dtype in info["tensors"].items():
            parts = ", ".join(f"{d}: {v['tensors']} tensors, {_human(v['bytes'])}" for d, v in by_dtype.items())
            print(f"  {group}: {parts}")
        kinds: dict[str, int] = {}
        for text in info.get("partitions", {}).values():  # "boxes on mesh [2, 2]: ...", "chunks of N ...", ...
            kind = text.split(":")[0] if text.startswith("boxes") else text.split(" of ")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        if kinds:
            print("  partitions: " + ", ".join(f"{n} {k}" for k, n in kinds.items()) + " (--json: each tensor's)")
        print(
            f"  {info['files']} files, {_human(info['bytes'])}; versions: "
            + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        )
        return 0
    if action == "verify":
        path = F.resolve_checkpoint(args.ckpt, damaged="return")  # a run directory: its newest, damaged or not
        problems = tools.verify_checkpoint_files(path, checksums=not args.sizes_only)
        for p in problems:
            print(f"BAD  {p}")
        if problems:
            print(f"{path.name}: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        manifest = F.load_manifest(path)
        n, algo = len(manifest["files"]), manifest["checksum"]
        print(f"OK   {path.name}: {n} files match the manifest ({'sizes' if args.sizes_only else algo})")
        return 0
    if action == "export-hf":
        out = _with_bar(
            "export",
            lambda tick: tools.export_hf(
                args.ckpt,
                args.out,
                dtype=args.dtype,
                source=args.source,
                max_shard_size=parse_size(args.max_shard_size),
                progress=tick,
                merge_lora=args.merge_lora,
            ),
        )
        print(f"Hugging Face folder written to {out}")
        return 0
    if action == "merge":
        from .checkpoint.merge import merge_checkpoints, snapshot_window

        ckpts = list(args.ckpts)
        if args.last is not None:
            if len(ckpts) != 1:
                raise WSDError("--last K goes with one run directory: its newest K snapshots are merged")
            ckpts = snapshot_window(ckpts[0], args.last)
        out = _with_bar(
            "merge",
            lambda tick: merge_checkpoints(
                ckpts,
                args.out,
                coefficients=args.coefficients,
                shape=args.shape,
                min_lr_ratio=args.min_lr_ratio,
                ema_decay=args.ema_decay,
                source=args.source,
                dtype=args.dtype,
                max_shard_size=parse_size(args.max_shard_size),
                progress=tick,
            ),
        )
        info = json.loads((out / "wsd_pretrain_merge.json").read_text())
        for rec in info["inputs"]:
            print(f"  {rec['coefficient']:+.6f}  {rec['name']} (position {rec['position']})")
        print(f"merged Hugging Face folder written to {out}")
        return 0
    if action == "from-deepspeed":
        hf = json.loads(Path(args.hf_config).read_text()) if args.hf_config else None
        out = _with_bar(
            "import",
            lambda tick: tools.from_deepspeed(
                args.ds_ckpt, args.out, max_shard_size=parse_size(args.max_shard_size), hf_config=hf, progress=tick
            ),
        )
        print(f"imported to {out}; resume with: wsd-pretrain train --run-dir {args.out} ...")
        return 0
    if action == "reshard":
        out = _with_bar(
            "reshard",
            lambda tick: tools.reshard(
                args.ckpt, args.out, max_shard_size=parse_size(args.max_shard_size), dtype=args.dtype, progress=tick
            ),
        )
        print(f"resharded checkpoint written to {out}")
        return 0
    if action == "to-dcp":
        out = _with_bar(
            "to-dcp",
            lambda tick: tools.to_dcp(args.ckpt, args.out, include_optimizer=not args.model_only, progress=tick),
        )
        print(f"torch.distributed.checkpoint directory written to {out}")
        return 0
    if action == "from-dcp":
        hf = json.loads(Path(args.hf_config).read_text()) if args.hf_config else None
        out = _with_bar(
            "from-dcp",
            lambda tick: tools.from_dcp(
                args.dcp_dir,
                args.out,
                prefix=args.prefix,
                dtype=args.dtype,
                hf_config=hf,
                max_shard_size=parse_size(args.max_shard_size),
                progress=tick,
            ),
        )
        print(f"Hugging Face folder written to {out}")
        return 0
    raise AssertionError(action)


def _add_ckpt(sub: Any) -> None:
    ck = sub.add_parser("ckpt", help="list, inspect, verify and convert checkpoints")
    acts = ck.add_subparsers(dest="action", required=True)
    p = acts.add_parser("list", help="every checkpoint of a run: step, kind, size, state, latest")
    p.add_argument("run_dir", help="a run directory, s3://bucket/prefix or az://container/prefix")
    p.add_argument("--checksums", action="store_true", help="also check every file's checksum (slower)")
    p.add_argument("--json", action="store_true")
    p = acts.add_parser("inspect", help="schedule position, tokens, layout, tensors by dtype")
    p.add_argument("ckpt", help="a checkpoint folder, or a run directory (its newest); local, s3:// or az://")
    p.add_argument("--json", action="store_true")
    p = acts.add_parser("verify", help="check every file against the manifest; exit 1 naming each bad file")
    p.add_argument("ckpt", help="a checkpoint or run directory; local, s3:// or az://")
    p.add_argument("--sizes-only", action="store_true", help="compare sizes, not checksums")
    p = acts.add_parser("export-hf", help="a Hugging Face model folder")
    p.add_argument("ckpt", help="a checkpoint or run directory; local, s3:// or az://")
    p.add_argument("out", help="a new folder: local, or an empty s3:// / az:// prefix (built locally, then uploaded)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--source", choices=["auto", "model", "master"], default="auto")
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="a PEFT LoRA checkpoint: merge the adapters into the base (the base's names and config.json)",
    )
    p = acts.add_parser(
        "merge",
        help="average checkpoints' weights (WSM: a decay emulated by merging) into a Hugging Face folder",
        description="Average the model weights of checkpoints or snapshots (any format and layout), one tensor at a "
        "time in fp32, ordered by position: uniform, EMA, or coefficients that emulate a decay of a given shape over "
        "the window (docs/schedules.md).",
    )
    p.add_argument(
        "ckpts",
        nargs="+",
        metavar="CKPT",
        help="checkpoint or snapshot folders (or one run dir with --last); local, s3:// or az://",
    )
    p.add_argument("--out", required=True, help="the new Hugging Face folder (local, or an empty s3:// prefix)")
    p.add_argument("--last", type=int, default=None, metavar="K", help="merge the run directory's newest K snapshots")
    p.add_argument("--coefficients", choices=["uniform", "ema", "decay"], default="decay")
    p.add_argument(
        "--shape", default="1-sqrt", help="decay shape to emulate: 1-sqrt, linear, cosine, inverse, exponential"
    )
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="the emulated decay's floor (inverse needs > 0)")
    p.add_argument("--ema-decay", type=float, default=0.9, help="EMA factor a: m <- a m + (1 - a) theta")
    p.add_argument(
        "--source",
        choices=["model", "master"],
        default="model",
        help="master: fp32 master weights where a checkpoint has them",
    )
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--max-shard-size", default="5GB")
    p = acts.add_parser(
        "from-deepspeed", help="DeepSpeed's checkpoints (ZeRO 0-3; AutoTP at ZeRO 1/2) into a new run directory"
    )
    p.add_argument(
        "ds_ckpt", type=_local_path, help="the folder with DeepSpeed's 'latest' file, or a global_stepN folder"
    )
    p.add_argument("out", help="a new run directory (local, s3:// or az://)")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--hf-config", default=None, help="a config.json to write beside the model")
    p = acts.add_parser("reshard", help="another shard size or model dtype")
    p.add_argument("ckpt", help="a checkpoint or run directory; local, s3:// or az://")
    p.add_argument(
        "out", help="the new checkpoint folder: local, or s3://bucket/RUN/checkpoints/NAME (committed there)"
    )
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p = acts.add_parser("to-dcp", help="a torch.distributed.checkpoint directory")
    p.add_argument("ckpt", help="a checkpoint or run directory; local, s3:// or az://")
    p.add_argument("out", help="a new folder: local, or an empty s3:// / az:// prefix (built locally, then uploaded)")
    p.add_argument("--model-only", action="store_true")
    p = acts.add_parser("from-dcp", help="a torch.distributed.checkpoint directory into a Hugging Face folder")
    p.add_argument("dcp_dir", type=_local_path, help="a local torch.distributed.checkpoint directory")
    p.add_argument("out", help="a new Hugging Face folder: local, or an empty s3:// / az:// prefix")
    p.add_argument("--prefix", default=None, help="only keys under this prefix, stripped (e.g. 'model.')")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--hf-config", default=None)
    p = acts.add_parser(
        "cp",
        help="copy checkpoints between storages (local <-> s3:// <-> az://), verifying every object, committing last",
        description="Copy a checkpoint, or every complete checkpoint and snapshot of a run, into the run DST "
        "(local, s3://bucket/prefix or az://container/prefix). Every object is checked against the manifest's "
        "size and checksum on the way; the destination's manifest is written last (docs/checkpoint-format.md). Checkpoints DST already has "
        "are skipped.",
    )
    p.add_argument("src", help="a checkpoint or a run directory (local, s3:// or az://)")
    p.add_argument("dst", help="a run directory (local, s3:// or az://)")
    p.add_argument(
        "--replace-unfinished",
        action="store_true",
        help="remove an interrupted copy's unfinished objects at the destination first",
    )
    ck.set_defaults(func=_cmd_ckpt)


# ---------------------------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsd-pretrain", description="Warmup-Stable-Decay pretraining: schedules, checkpoints, tools."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train a model (wsd-pretrain train --help)", add_help=False)
    p = sub.add_parser(
        "schedule",
        help="print a schedule's phases and milestones, optionally plot it",
        description="Print the phases and milestones of the schedule in a config file (default: the tiny CPU "
        "config) after overrides such as schedule.decay_shape=linear.",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML/JSON config (default: configs/tiny_cpu.yaml)")
    p.add_argument("--total-steps", type=int, default=None, help="rescale the schedule to this many steps")
    p.add_argument("--lr", type=float, default=None, help="base LR to show (default: optimizer.lr of the config)")
    p.add_argument("--plot", type=Path, default=None, metavar="OUT.png", help="draw the LR curve to this file")
    p.add_argument("--json", action="store_true", help="print the schedule, phases and milestones as JSON")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=_cmd_schedule)
    _add_ckpt(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from .train import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except WSDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
