"""Checkpoint tools behind ``wsd-pretrain ckpt``: list, inspect, verify, export to a Hugging Face folder, import
from DeepSpeed and torch.distributed.checkpoint, export to DCP, reshard.

Every conversion streams: tensors are read one parameter at a time and written shard by shard (through the same
writer as training saves, or :func:`write_hf_folder`), so peak memory is about one output shard or the largest
tensor, never the whole model (measured in docs/benchmarks.md). Outputs are written in a staging folder and
renamed into place; a non-empty output folder is refused; a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..schedule import WSDSchedule
from . import format as F
from .commit import write_latest
from .layout import Item, Partition, plan_save
from .lora import ADAPTER_CONFIG, BASE_CONFIG, MergedLoRA
from .safetensors_io import (
    fsync_dir,
    read_header,
    read_json,
    write_json,
    write_safetensors,
)
from .save import SaveRequest, start_save
from .store import CheckpointStore

__all__ = [
    "CheckpointSource",
    "export_hf",
    "from_dcp",
    "from_deepspeed",
    "inspect_checkpoint",
    "reshard",
    "to_dcp",
    "verify_checkpoint_files",
]

Progress = Callable[[int], None] | None


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if name not in table:
        raise CheckpointError(f"dtype {name!r}: use bf16, fp16 or fp32")
    return table[name]


@contextlib.contextmanager
def _atomic_output(out: Path) -> Iterator[Path]:
    """A staging folder beside ``out`` to write into: renamed to ``out`` (and fsynced) when the block ends, removed
    on any error, so ``out`` is either complete or absent."""
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise _unwritable(out, exc) from None
    try:
        yield staging
        fsync_dir(staging)
        if out.exists():
            out.rmdir()
        os.rename(staging, out)
        fsync_dir(out.parent)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise _unwritable(out, exc) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _unwritable(out: Path, exc: OSError) -> CheckpointError:
    why = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    return CheckpointError(
        f"cannot write the output {out}: {why}{where}; nothing was written. Give an output folder on a writable "
        "filesystem with room for it"
    )


def _refuse_inside(out: Path, inputs: tuple[Path, ...], fix: str) -> None:
    """Refuse an output that would be written into one of the inputs (a committed checkpoint is never changed)."""
    real_out = Path(os.path.realpath(out))
    for src in inputs:
        real_src = Path(os.path.realpath(src))
        if real_out == real_src or real_src in real_out.parents:
            raise CheckpointError(f"the output {out} is inside the input {src}: {fix}")


def _fresh_output(out: Path, *inputs: Path) -> None:
    """Refuse an output inside one of the inputs or over something that exists."""
    _refuse_inside(out, inputs, "a checkpoint is never written into; give an output folder outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not empty: give a new output folder")


# ---------------------------------------------------------------------------------------------- reading tools


def inspect_checkpoint(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """What a checkpoint holds: position and phase in its schedule, tokens, the job's layout, tensors and bytes by
    dtype per group (from the headers; no tensor is read)."""
    path = F.resolve_checkpoint(ckpt, damaged="error")
    m = F.load_manifest(path)
    out: dict[str, Any] = {
        "name": m["name"],
        "kinds": m["kinds"],
        "created": m.get("created"),
        "position": m["position"],
        "trajectory_position": m.get("trajectory_position", m["position"]),
        "step": m["step"],
        "tokens": m["tokens"],
        "world_size": m["world_size"],
        "layout": m["layout"],
        "versions": m.get("versions", {}),
        "files": len(m["files"]),
        "bytes": sum(r["size"] for r in m["files"].values()),
    }
    if m.get("schedule"):
        try:
            schedule = WSDSchedule.from_dict(m["schedule"])
            phase = schedule.phase_at(m["position"])
            out["schedule"] = {
                "phase": phase.name,
                "period": phase.period,
                "progress": round(phase.progress, 4),
                "end": int(m.get("run_end", schedule.end)),
                "units": schedule.units,
                "mode": schedule.mode,
                "milestones": [[ms.pre_decay, ms.post_decay] for ms in schedule.milestones_info],
            }
        except Exception as exc:  # a schedule with a callable shape cannot be rebuilt from JSON
            out["schedule"] = {"error": str(exc)}
    groups = {}
    with CheckpointStore(path, m) as store:
        for group in F.GROUP_NAMES:
            by_dtype: dict[str, dict[str, int]] = {}
            for name in store.names(group):
                e = store.entry(group, name)
                entry = by_dtype.setdefault(str(e.dtype).removeprefix("torch."), {"tensors": 0, "bytes": 0})
                entry["tensors"] += 1
                entry["bytes"] += e.numel * e.dtype.itemsize
            if by_dtype:
                groups[group] = by_dtype
        out["state_files_per_rank"] = store.files_per_rank or None
        out["partitions"] = {
            f"{group}/{name}": _partition_text(store.entry(group, name))
            for group in ("master", "optimizer")
            for name in store.names(group)
        }
    out["tensors"] = groups
    out["format_version"] = m["format_version"]
    return out


def _partition_text(entry: Any) -> str:
    """One tensor's partition in words (``inspect``): the grid's mesh and which mesh dimensions cut which tensor
    dimensions, even chunks, explicit parts, or one whole slice."""
    p = entry.partition
    if entry.file is not None:
        return "whole"
    if p.grid is not None:
        cuts = ", ".join(f"dim {d} by mesh dims {list(m)}" for d, m in enumerate(p.grid.dims) if m) or "none"
        held = sum(1 for _ in p.iter_boxes(entry.shape))
        return f"boxes on mesh {list(p.grid.mesh)}: {cuts}; {held} boxes"
    if p.chunk:
        return f"chunks of {p.chunk} elements"
    parts = list(p.iter_parts(entry.numel, 0))
    return "whole" if len(parts) <= 1 else f"{len(parts)} parts"


def verify_checkpoint_files(ckpt: str | os.PathLike[str], *, checksums: bool = True) -> list[str]:
    """Every problem found, one per bad file: manifest structure, each file's size and checksum, each safetensors
    header, each index against its shards. An empty list means the checkpoint is sound."""
    path = Path(ckpt)
    try:
        m = F.load_manifest(path)
    except CheckpointError as exc:
        return [str(exc)]
    problems = F.check_files(path, m, checksums=checksums)
    bad = {p.split(":", 1)[0] for p in problems}
    for rel in sorted(m["files"]):
        if rel in bad:
            continue
        if rel.endswith(".safetensors"):
            try:
                read_header(F.safe_path(path, rel, "manifest"))
            except CheckpointError as exc:
                problems.append(f"{rel}: {exc}")
    if not problems:  # the indexes against the files: every slice where the index says, nothing else
        try:
            with CheckpointStore(path, m) as store:
                store.check_all()
        except CheckpointError as exc:
            problems.append(str(exc))
    return problems


# ---------------------------------------------------------------------------------------------- our checkpoints as a source


class CheckpointSource:
    """One of our checkpoints seen through the adapter interface, for rewriting it (reshard): the master weights and
    optimizer state keep their slices and holder ranks (a version-1 checkpoint's whole tensors become one slice of
    rank 0), model weights are read whole, optionally cast."""

    gathers = False  # every part is read from the files: no collective

    def __init__(self, ckpt: Path, model_dtype: torch.dtype | None = None, progress: Progress = None) -> None:
        self.path = ckpt
        self.manifest = F.load_manifest(ckpt)
        self.store = CheckpointStore(ckpt, self.manifest)
        self.model_dtype = model_dtype
        self.progress = progress
        self.tied = dict(self.manifest.get("tied") or {})
        self.trainer = read_json(F.safe_path(ckpt, f"{F.TRAIN_STATE}/trainer.json", "trainer state"))
        self.engine = read_json(F.safe_path(ckpt, f"{F.TRAIN_STATE}/engine.json", "engine state"))
        self.world = len(self.store.files_per_rank) or 1
        self.rank = 0
        self.device = torch.device("cpu")

    def layout(self) -> dict[str, Any]:
        return dict(self.manifest["layout"])

    def _keeps_master(self, dtype: torch.dtype) -> bool:
        return self.model_dtype is not None and self.model_dtype != dtype and dtype == torch.float32

    def items(self) -> list[Item]:
        store = self.store
        model, master, optim = [], [], []
        for name in store.names("model"):
            e = store.entry("model", name)
            model.append(Item("model", name, e.shape, self.model_dtype or e.dtype))
            if not store.has("master", name) and self._keeps_master(e.dtype):
                # the model was the fp32 master: keep it exact beside the cast copy (whole, one slice of rank 0)
                master.append(Item("master", name, e.shape, e.dtype, Partition.whole(0, e.numel)))
        for group, out in (("master", master), ("optimizer", optim)):
            for name in store.names(group):
                e = store.entry(group, name)
                out.append(
                    Item(group, name, e.shape, e.dtype, e.partition if e.file is None else Partition.whole(0, e.numel))
                )
        return model + master + optim

    def local(self, item: Item) -> torch.Tensor:
        group = item.group if self.store.has(item.group, item.name) else "model"
        t = self.store.read(group, item.name)
        if self.progress and item.group == "model":
            self.progress(1)
        return t.to(item.dtype)

    def part(self, item: Item, holder: int) -> torch.Tensor:
        group = item.group if self.store.has(item.group, item.name) else "model"
        box = item.partition.box_of(holder)
        if box is not None:  # a grid part: the holder's box, flattened
            return self.store.read(group, item.name, box=box).reshape(-1)
        start, numel = item.partition.local(holder, item.numel) or (0, 0)
        return self.store.read(group, item.name, start, numel)

    def meta(self) -> dict[str, Any]:
        return self.engine

    def rng_states(self) -> dict[int, Any]:
        out = {}
        rng_dir = self.path / F.TRAIN_STATE / "rng"
        if rng_dir.is_dir():
            for f in sorted(rng_dir.glob("rank-*.json")):
                out[int(f.stem.split("-")[1])] = read_json(f)
        return out

    def close(self) -> None:
        self.store.close()


def reshard(
    ckpt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_shard_size: int,
    dtype: str | None = None,
    progress: Progress = None,
) -> Path:
    """Rewrite a checkpoint with another shard size and/or model dtype (the fp32 master and optimizer state stay
    exact), checksummed anew (same algorithm); ``out`` is the new checkpoint folder."""
    src_path, out = F.resolve_checkpoint(ckpt, damaged="error"), Path(out)
    _fresh_output(out, src_path)
    source = CheckpointSource(src_path, _dtype(dtype), progress)
    m = source.manifest
    request = SaveRequest(
        position=m["position"],
        step=m["step"],
        tokens=m["tokens"],
        kinds=list(m["kinds"]),
        trainer=source.trainer,
        schedule=m.get("schedule"),
        hf_config=read_json(src_path / "config.json") if (src_path / "config.json").is_file() else None,
        extra_manifest={
            "trajectory_position": m.get("trajectory_position", m["position"]),
            "resharded_from": str(src_path),
            **({"run_end": m["run_end"]} if "run_end" in m else {}),
        },
    )
    try:
        pending = start_save(
            source,
            out.parent,
            request,
            max_shard_bytes=max_shard_size,
            dest=out,
            rng_states=source.rng_states(),
            with_rng=bool(m.get("rng", True)),
            checksum=m.get("checksum", "xxh3_128"),
        )
        return pending.wait()
    finally:
        source.close()


# ---------------------------------------------------------------------------------------------- Hugging Face export


def write_hf_folder(
    out: Path,
    specs: list[Item],
    fetch: Callable[[str], torch.Tensor],
    max_shard_size: int,
    config: dict[str, Any] | None,
    progress: Progress = None,
) -> Path:
    """A Hugging Face folder: ``model-0000k-of-0000N.safetensors``, ``model.safetensors.index.json`` and
    ``config.json``, written shard by shard into a staging folder and renamed to ``out``."""
    _fresh_output(out)
    with _atomic_output(out) as staging:
        shards = plan_save(specs, 1, max_shard_size).model_shards
        for shard in shards:
            batch = {}
            for spec in shard.items:
                batch[spec.name] = fetch(spec.name).to(spec.dtype)
                if progress:
                    progress(1)
            write_safetensors(staging / shard.relpath, batch)
            del batch
        write_hf_index(staging, shards, config)
    return out


def write_hf_index(folder: Path, shards: list[Any], config: dict[str, Any] | None) -> None:
    """A Hugging Face folder's ``model.safetensors.index.json`` for these shards (the plan's ``model_shards``),
    and its ``config.json`` when there is one."""
    weight_map = {spec.name: shard.relpath for shard in shards for spec in shard.items}
    write_json(
        folder / "model.safetensors.index.json",
        {"metadata": {"total_size": sum(s.nbytes for s in shards)}, "weight_map": weight_map},
    )
    if config is not None:
        write_json(folder / "config.json", config)


def export_hf(
    ckpt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_size: int = 5 * 10**9,
    source: str = "auto",
    progress: Progress = None,
    merge_lora: bool = False,
) -> Path:
    """Export the model to a Hugging Face folder. ``source``: "model" (the model's weights), "master" (the fp32
    master weights) or "auto" (master when the checkpoint has them and ``dtype`` is fp32 or unset, else model);
    ``dtype`` casts (default: the source's). ``merge_lora``: a PEFT LoRA checkpoint's adapters merged into the base,
    under the base's names and config (checkpoint/lora.py); a LoRA checkpoint is refused without it."""
    path, out = F.resolve_checkpoint(ckpt, damaged="error"), Path(out)
    _fresh_output(out, path)
    m = F.load_manifest(path)
    target = _dtype(dtype)
    if source not in ("auto", "model", "master"):
        raise CheckpointError(f"source={source!r}: 'auto', 'model' or 'master'")
    with CheckpointStore(path, m) as store:
        has_master = bool(store.names("master"))
        if source == "master" and not has_master:
            raise CheckpointError(f"{path}: has no separate master weights (the model weights are the master)")
        use_master = source == "master" or (source == "auto" and has_master and target in (None, torch.float32))

        def group_of(name: str) -> str:
            return "master" if use_master and store.has("master", name) else "model"

        def read(name: str) -> torch.Tensor:
            return store.read(group_of(name), name)  # a master assembled from its slices, one tensor at a time

        names = store.names("model")
        lora_cfg = (
            read_json(F.safe_path(path, ADAPTER_CONFIG, "adapter config")) if (path / ADAPTER_CONFIG).exists() else None
        )
        if lora_cfg is not None and not merge_lora:
            raise CheckpointError(
                f"{path} holds a PEFT model (adapter_config.json; names like {names[0]!r}): export it with "
                "--merge-lora, a Hugging Face folder of the base model with the adapters merged in"
            )
        if lora_cfg is None and merge_lora:
            raise CheckpointError(
                f"{path}: --merge-lora, but the checkpoint holds no PEFT model (no adapter_config.json)"
            )
        merged = MergedLoRA(names, lora_cfg, lambda n: store.entry(group_of(n), n)) if lora_cfg is not None else None
        specs = []
        for name in merged.names if merged is not None else names:
            source_name = merged.sources[name][0] if merged is not None else name
            e = store.entry(group_of(source_name), source_name)
            specs.append(Item("model", name, e.shape, target or e.dtype))

        def fetch(name: str) -> torch.Tensor:
            return merged.tensor(name, read) if merged is not None else read(name)

        config_file = BASE_CONFIG if merged is not None else "config.json"
        config = read_json(F.safe_path(path, config_file, "model config")) if (path / config_file).exists() else None
        if config is not None and not isinstance(config, dict):
            raise CheckpointError(f"{path / 'config.json'}: not a JSON object (a Hugging Face config is one)")
        if config is not None and target is not None:
            config = {**config, "torch_dtype": str(target).removeprefix("torch.")}
        return write_hf_folder(out, specs, fetch, max_shard_size, config, progress)


# ---------------------------------------------------------------------------------------------- DeepSpeed


def from_deepspeed(
    ds_ckpt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_shard_size: int,
    hf_config: dict[str, Any] | None = None,
    progress: Progress = None,
) -> Path:
    """Import a DeepSpeed checkpoint (``global_stepN`` or the folder with ``latest``) into the run directory ``out``
    as ``checkpoints/step-<N>-imported``: ``wsd-pretrain train --run-dir out`` then resumes from it."""
    from .convert_deepspeed import open_deepspeed_checkpoint

    out = Path(out)
    if F.checkpoints_dir(out).is_dir() and any(F.checkpoints_dir(out).iterdir()):
        raise CheckpointError(f"{out} already has checkpoints: import into a new run directory")
    source = open_deepspeed_checkpoint(ds_ckpt)
    _refuse_inside(out, (Path(ds_ckpt),), "import into a run directory outside the DeepSpeed checkpoint")
    source.progress = progress
    trainer = source.trainer_state()
    schedule = trainer["scheduler"]["schedule"] if trainer["scheduler"] else None
    request = SaveRequest(
        position=trainer["position"],
        step=trainer["step"],
        tokens=trainer["tokens"],
        kinds=["imported"],
        trainer=trainer,
        schedule=schedule,
        hf_config=hf_config,
        extra_manifest={"trajectory_position": trainer["trajectory_position"]},
    )
    dest = F.checkpoints_dir(out) / F.checkpoint_name(trainer["position"], ["imported"])
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(out, exc) from None
    path = start_save(source, out, request, max_shard_bytes=max_shard_size, dest=dest, with_rng=False).wait()
    write_latest(dest.parent, dest.name)
    return path


# ---------------------------------------------------------------------------------------------- torch.distributed.checkpoint


def to_dcp(
    ckpt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    include_optimizer: bool = True,
    progress: Progress = None,
) -> Path:
    """Write a checkpoint as a torch.distributed.checkpoint directory with keys ``model.<name>`` (and
    ``master.<name>``, ``optimizer.<name>/<key>``), each tensor assembled from our files only when DCP writes it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    path, out = F.resolve_checkpoint(ckpt, damaged="error"), Path(out)
    _fresh_output(out, path)
    m = F.load_manifest(path)
    groups = ("model", "master", "optimizer") if include_optimizer else ("model",)
    with CheckpointStore(path, m) as store:
        placeholders: dict[str, torch.Tensor] = {}
        for group in groups:
            for name in store.names(group):
                e = store.entry(group, name)
                # shapes only: a tensor is read from our files when the planner's resolve_data asks for it
                placeholders[f"{group}.{name}"] = torch.empty(e.shape, dtype=e.dtype, device="meta")

        class StreamingPlanner(DefaultSavePlanner):
            """Plans from shapes only; each tensor is read from our checkpoint when DCP asks for its bytes."""

            def resolve_data(self, write_item: Any) -> Any:
                group, _, name = write_item.index.fqn.partition(".")
                if progress:
                    progress(1)
                return store.read(group, name)

        with _atomic_output(out) as staging:
            dcp.save(placeholders, checkpoint_id=str(staging), planner=StreamingPlanner(), no_dist=True)
            write_json(
                staging / "wsd_pretrain.json",
                {"from": str(path), "manifest_name": m["name"], "position": m["position"], "step": m["step"]},
            )
    return out


def from_dcp(
    dcp_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_shard_size: int = 5 * 10**9,
    prefix: str | None = None,
    dtype: str | None = None,
    hf_config: dict[str, Any] | None = None,
    progress: Progress = None,
) -> Path:
    """A torch.distributed.checkpoint directory's tensors (those under ``prefix``, e.g. ``model.``; default: all)
    into a Hugging Face folder, read a shard's worth at a time."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    src, out = Path(dcp_dir), Path(out)
    try:
        metadata = FileSystemReader(str(src)).read_metadata()
    except Exception as exc:
        raise CheckpointError(f"{src}: not a torch.distributed.checkpoint directory ({exc})") from None
    _fresh_output(out, src)  # after the input is known to be one: a wrong input is named first
    target = _dtype(dtype)
    specs, names = [], {}
    for fqn, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata) or (prefix and not fqn.startswith(prefix)):
            continue
        name = fqn[len(prefix) :] if prefix else fqn
        names[name] = (fqn, item)
        specs.append(Item("model", name, tuple(item.size), target or item.properties.dtype))
    if not specs:
        raise CheckpointError(f"{src}: no tensors{' under ' + repr(prefix) if prefix else ''}")

    def fetch(name: str) -> torch.Tensor:
        fqn, item = names[name]
        buf = {fqn: torch.empty(tuple(item.size), dtype=item.properties.dtype)}
        dcp.load(buf, checkpoint_id=str(src), no_dist=True)
        return buf[fqn]

    return write_hf_folder(out, specs, fetch, max_shard_size, hf_config, progress)
