"""DeepSpeed's own checkpoints (ZeRO 0-3, a ``global_stepN/`` folder and the ``latest`` file) into our format: the
model and the full training state (fp32 master weights, optimizer state, counters, the scheduler's state when it
was a WSDScheduler), so a run started without wsd_pretrain resumes with it.

DeepSpeed's files are pickles; reading them means unpickling (``torch.load``), which is done here only, for files
the user names, and never for our own format. They are opened memory-mapped (``mmap=True``), and each parameter is
put together from the ranks' fragments when it is written, so the converter holds about one shard of output at a
time, never the whole model or optimizer state (see docs/benchmarks.md for the measured peak).

* ZeRO 1/2: each rank's partition of every flat param group, with ``param_slice_mappings`` giving each parameter's
  fragment (offset, length) in it; a parameter is its fragments in rank order.
* ZeRO-3: each parameter is split in ``ceil(numel / world)`` pieces (the last padded), concatenated per rank in
  parameter order across the flat groups; a parameter is the ranks' pieces in order, the padding dropped (as
  DeepSpeed's ``zero_to_fp32``).
* ZeRO-0: one ``mp_rank_00_model_states.pt`` with the torch optimizer's state (and, for bf16/fp16, its fp32 copies)
  indexed by position in the param groups; positions are matched to names by the parameters' shapes, in module
  order within each group, and an ambiguous match is refused.
* DeepSpeed AutoTP (``tensor_parallel.autotp_size`` N > 1) at ZeRO 1/2: one ``mp_rank_XX_model_states.pt`` per TP
  rank (its slice of each weight) and ``zero_pp_rank_D_mp_rank_XX_optim_states.pt`` per (data-parallel rank D, TP
  rank XX), each holding the ZeRO partition of that TP rank's slices. Each TP rank's slice is put together from its
  DP fragments as above, then the slices are placed in the full tensor by the affine map DeepSpeed records for
  every parameter (``universal_checkpoint_info["affine_map"]``, DeepSpeed 0.19+; read by
  :func:`~.deepspeed_adapter.autotp_partition`): a box per TP rank on the dimension AutoTP cut, or one copy of a
  tensor every TP rank holds whole (checked equal on every TP rank, as DeepSpeed's ``ds_to_universal`` does). The
  result is full tensors, written whole by one holder: the values of DeepSpeed's own universal-checkpoint
  conversion (``zero_to_fp32`` does not understand AutoTP). Refused with the reason: AutoTP at ZeRO 0 or 3,
  and a split that is not one box per rank (fused sub-parameters).
* DeepSpeed's ``PipelineEngine`` (ZeRO 0/1): ``layer_XX-model_states.pt`` (the weights), one
  ``mp_rank_SS_model_states.pt`` per stage and its ZeRO files: :class:`PipeCheckpointSource`, the stages' union as
  one model (:func:`open_deepspeed_checkpoint` picks it).
"""

from __future__ import annotations

import math
import re
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .adapters import _jsonable, is_json_scalar
from .layout import Item, Partition, zero3_chunks
from .names import canonical_text
from .resume_checks import UNKNOWN_CLASS

__all__ = ["DeepSpeedCheckpointSource", "PipeCheckpointSource", "find_deepspeed_step_dir", "open_deepspeed_checkpoint"]

_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MP_RANK_RE = re.compile(r"mp_rank_(\d+)_(?:model|optim)_states\.pt$")


def find_deepspeed_step_dir(path: str | Path) -> Path:
    """The ``global_stepN`` folder: ``path`` itself, or the one DeepSpeed's ``latest`` file names."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if (p / "mp_rank_00_model_states.pt").is_file() or any(p.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):
        return p
    latest = p / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not tag or "/" in tag or tag in (".", ".."):
            raise CheckpointError(f"{latest}: names {tag!r}, not a tag folder")
        if (p / tag).is_dir():
            return find_deepspeed_step_dir(p / tag)
        raise CheckpointError(f"{latest} names {tag!r}, which is not a folder of {p}")
    raise CheckpointError(f"{p}: not a DeepSpeed checkpoint (no model states file and no 'latest' file)")


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read this DeepSpeed file: {exc}") from None


class _Flat:
    """Several flat tensors read as one (a rank's flat groups, concatenated without copying them)."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self.parts = parts
        self.starts = [0]
        for t in parts:
            self.starts.append(self.starts[-1] + t.numel())

    def slice(self, start: int, length: int) -> torch.Tensor:
        out, pos, end = [], start, start + length
        for i, t in enumerate(self.parts):
            lo, hi = self.starts[i], self.starts[i + 1]
            if hi <= pos or lo >= end:
                continue
            a, b = max(pos, lo) - lo, min(end, hi) - lo
            out.append(t.reshape(-1)[a:b])
        if sum(o.numel() for o in out) != length:
            raise CheckpointError(f"flat state too short: wanted [{start}, {end}), have {self.starts[-1]}")
        return torch.cat(out) if len(out) > 1 else out[0].clone()


class DeepSpeedCheckpointSource:
    """A DeepSpeed checkpoint seen through the adapter interface (``items``/``local``/``part``), for ``start_save``:
    each rank's partition of the master weights and optimizer state stays that rank's slice (DeepSpeed's own
    partitions become the checkpoint's), and the model weights are written whole."""

    gathers = False  # every part is read from DeepSpeed's files: no collective
    rank = 0
    device = torch.device("cpu")
    progress: Any = None

    def __init__(self, path: str | Path, *, _stage: tuple[int, dict[str, torch.Tensor]] | None = None) -> None:
        """``_stage``: (mp rank, its weights) for one stage of a pipeline checkpoint (see :class:`PipeCheckpointSource`:
        the stage's model states file and optimizer files, its weights read from the layer files)."""
        self.step_dir = find_deepspeed_step_dir(path)
        mp = _stage[0] if _stage is not None else 0
        model_files = sorted(self.step_dir.glob(f"*mp_rank_{mp:02d}_model_states.pt"))
        self.model_states = _load(model_files[0])
        ms = self.model_states
        if _stage is not None:
            ms["module"] = _stage[1]
        if not isinstance(ms, dict) or "module" not in ms:
            raise CheckpointError(f"{model_files[0]}: no 'module' entry; not a DeepSpeed model states file")
        if ms["module"] is None:
            raise CheckpointError(f"{model_files[0]}: no weights in it and no pipeline layer files beside it")
        _canonical_names(ms)
        if ms.get("frozen_param_shapes"):
            raise CheckpointError(f"{self.step_dir}: frozen parameters are not supported by the converter")
        # one set of files per tensor-parallel rank (mp_rank_XX): more than one is DeepSpeed AutoTP
        mp_ranks = sorted({int(m.group(1)) for f in self.step_dir.iterdir() if (m := _MP_RANK_RE.search(f.name))})
        self.tp = len(mp_ranks) if _stage is None else 1
        if mp_ranks != list(range(len(mp_ranks))):
            raise CheckpointError(f"{self.step_dir}: files for tensor-parallel (mp) ranks {mp_ranks}")
        optim_by_tp: dict[int, list[tuple[int, Path]]] = {}
        for f in self.step_dir.iterdir():
            if m := _OPTIM_RE.match(f.name):
                optim_by_tp.setdefault(int(m.group(2)), []).append((int(m.group(1)), f))
        if _stage is not None:
            optim_by_tp = {0: optim_by_tp.get(mp, [])}
        optim_files = sorted(optim_by_tp.get(0, []))
        self.world = len(optim_files)
        for t, files in sorted(optim_by_tp.items()):
            if sorted(r for r, _ in files) != list(range(self.world)):
                raise CheckpointError(
                    f"{self.step_dir}: optimizer files of tensor-parallel rank {t} for data-parallel ranks "
                    f"{sorted(r for r, _ in files)}, expected 0-{self.world - 1}"
                )
        self.optim = [_load(f)["optimizer_state_dict"] for _, f in optim_files]
        self.stage = (
            int(getattr(self.optim[0]["zero_stage"], "value", self.optim[0]["zero_stage"])) if self.optim else 0
        )
        module = ms["module"]
        self.buffer_names_ = list(ms.get("buffer_names") or [])
        self.tied = {k: v for k, v in (ms.get("shared_params") or {}).items()}
        shapes = ms.get("param_shapes")
        if shapes:
            self.shapes = {n: tuple(int(d) for d in s) for group in shapes for n, s in group.items()}
            self.group_of = {n: g for g, group in enumerate(shapes) for n in group}
        else:
            # ZeRO-0 records neither shapes nor shared parameters: tied weights share storage in the file
            seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
            for n, t in module.items():
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
                if n not in self.buffer_names_ and key in seen:
                    self.tied[n] = seen[key]
                seen.setdefault(key, n)
            self.shapes = {
                n: tuple(t.shape) for n, t in module.items() if n not in self.buffer_names_ and n not in self.tied
            }
            self.group_of = {}
        self.param_names = list(self.shapes)
        self.lp_dtype = {n: module[n].dtype for n in self.param_names if n in module}
        self.low_precision = any(d != torch.float32 for d in self.lp_dtype.values())
        if self.tp > 1:
            self._init_autotp(optim_by_tp)
        elif self.stage == 0:
            self._init_zero0()
        elif self.stage in (1, 2):
            self._init_zero12()
        else:
            self._init_zero3()

    # ------------------------------------------------------------------ layouts

    def _init_zero12(self) -> None:
        self._frag: dict[str, list[tuple[int, int, int]]] = {n: [] for n in self.param_names}  # (rank, start, numel)
        for rank, opt in enumerate(self.optim):
            mappings = opt.get("param_slice_mappings")
            if mappings is None:
                raise CheckpointError(f"{self.step_dir}: no param_slice_mappings (DeepSpeed older than 0.10?)")
            for group in mappings:
                for name, frag in group.items():
                    self._frag[name].append((rank, int(frag.start), int(frag.numel)))
        self._state = [opt["base_optimizer_state"]["state"] for opt in self.optim]
        self._groups = self.optim[0]["base_optimizer_state"]["param_groups"]

    def _init_autotp(self, optim_by_tp: dict[int, list[tuple[int, Path]]]) -> None:
        """DeepSpeed AutoTP: every TP rank's model states and ZeRO-1/2 fragments; each parameter's split."""
        from .deepspeed_adapter import autotp_partition

        ms, where = self.model_states, self.step_dir
        what = f"{where}: a DeepSpeed AutoTP checkpoint (tensor-parallel degree {self.tp})"
        if self.stage not in (1, 2):
            raise CheckpointError(
                f"{what} at ZeRO stage {self.stage}: from-deepspeed imports AutoTP checkpoints of ZeRO stages 1 and 2; "
                "convert this one with DeepSpeed's own ds_to_universal.py"
            )
        dims = ms.get("checkpoint_parallel_dimensions") or {}
        if int(dims.get("pp_degree", 1)) > 1:
            raise CheckpointError(f"{what} with {dims['pp_degree']} pipeline stages: pipeline stages are not supported")
        if int(ms.get("mp_world_size", self.tp)) != self.tp:
            raise CheckpointError(f"{what}: its model states say mp_world_size {ms.get('mp_world_size')}")
        uc = ms.get("universal_checkpoint_info") or {}
        unsupported = uc.get("autotp_unsupported_parameter_patterns") or {}
        if unsupported:
            raise CheckpointError(
                f"{what}: DeepSpeed records parameters whose split it cannot describe: "
                + "; ".join(f"{k}: {v}" for k, v in sorted(unsupported.items()))
            )
        amap = uc.get("affine_map") or {}
        if not amap.get("params"):
            raise CheckpointError(
                f"{what} without DeepSpeed's affine map of each parameter's split (written by DeepSpeed 0.19 and "
                "later): resave it with a newer DeepSpeed, or convert it with DeepSpeed's ds_to_universal.py"
            )
        if int(amap.get("version", 1)) != 1:
            raise CheckpointError(f"{what}: affine map format version {amap.get('version')}, this reader knows 1")
        patterns = [(re.compile(p), entry) for p, entry in amap["params"].items()]
        self._tp_states = [ms]
        for t in range(1, self.tp):
            other = _load(where / f"mp_rank_{t:02d}_model_states.pt")
            if not isinstance(other, dict) or "module" not in other:
                raise CheckpointError(f"{where}/mp_rank_{t:02d}_model_states.pt: not a DeepSpeed model states file")
            _canonical_names(other)
            self._tp_states.append(other)
        self._autotp = {}
        for name in self.param_names:
            found = [entry for p, entry in patterns if p.match(name)]
            if len(found) != 1:
                raise CheckpointError(f"{what}: {len(found)} descriptions of the split of {name}, expected one")
            try:
                part = autotp_partition(found[0], name, self.tp)
            except CheckpointError as exc:
                raise CheckpointError(f"{what}: {exc}; convert it with DeepSpeed's ds_to_universal.py") from None
            for t, st in enumerate(self._tp_states):
                local = st["module"].get(name)
                if local is None or tuple(local.shape) != part.boxes[t][1]:
                    got = None if local is None else list(local.shape)
                    raise CheckpointError(
                        f"{what}: TP rank {t} holds {name} as {got}, its split says {part.boxes[t][1]}"
                    )
            self._autotp[name] = part
            self.shapes[name] = part.shape
        # per TP rank: its DP ranks' files and each parameter's fragments in them, as at ZeRO-1/2 without TP
        self._optim_tp = [self.optim] + [
            [_load(f)["optimizer_state_dict"] for _, f in sorted(optim_by_tp[t])] for t in range(1, self.tp)
        ]
        self._frag_tp: list[dict[str, list[tuple[int, int, int]]]] = [{}] * self.tp
        for t in reversed(range(self.tp)):  # TP rank 0's last: its groups and 0-d state stay the source's own
            self.optim = self._optim_tp[t]
            self._init_zero12()
            self._frag_tp[t] = self._frag
        self.dp = self.world
        self.world = 1  # the import holds full tensors, each written whole by one holder

    def _tp_slice(self, t: int, name: str, key: str) -> torch.Tensor:
        """TP rank ``t``'s slice of a master weight (``key="master"``) or an optimizer moment, flat: its DP ranks'
        fragments in order."""
        out = []
        for dp, start, numel in sorted(self._frag_tp[t][name]):
            opt = self._optim_tp[t][dp]
            g = self.group_of[name]
            flat = (
                opt["single_partition_of_fp32_groups"][g]
                if key == "master"
                else opt["base_optimizer_state"]["state"][g][key]
            )
            out.append(flat.reshape(-1)[start : start + numel])
        piece = torch.cat(out) if len(out) != 1 else out[0] if out else torch.empty(0)
        if piece.numel() != math.prod(self._autotp[name].boxes[t][1]):
            raise CheckpointError(
                f"{self.step_dir}: TP rank {t}'s fragments of {name} hold {piece.numel()} elements, its slice "
                f"{list(self._autotp[name].boxes[t][1])}"
            )
        return piece

    def _tp_merged(self, name: str, slice_of: Any) -> torch.Tensor:
        """The full tensor from the TP ranks' slices (``slice_of(t)``), flat: each slice into its rank's box; a
        tensor every TP rank holds whole is taken once, after checking that every TP rank holds the same values."""
        part = self._autotp[name]
        if part.dim is None:
            first = slice_of(0)
            for t in range(1, self.tp):
                if not torch.equal(slice_of(t).reshape(-1), first.reshape(-1)):
                    raise CheckpointError(
                        f"{self.step_dir}: tensor-parallel ranks 0 and {t} hold different values of {name}, which "
                        "AutoTP replicates: the checkpoint is inconsistent (DeepSpeed's own conversion refuses it too)"
                    )
            return first.reshape(-1)
        slices = [slice_of(t) for t in range(self.tp)]
        full = torch.empty(part.shape, dtype=slices[0].dtype)
        for t, piece in enumerate(slices):
            full[part.index(t)] = piece.reshape(part.boxes[t][1])
        return full.reshape(-1)

    def _init_zero3(self) -> None:
        inner = [opt["optimizer_state_dict"] for opt in self.optim]
        self._flats = {"master": [_Flat(list(opt["fp32_flat_groups"])) for opt in self.optim]}
        keys = self._elem_keys(
            [inner[0]["state"][i] for i in sorted(inner[0]["state"])],
            [t.numel() for t in self.optim[0]["fp32_flat_groups"]],
        )
        for key in keys:
            self._flats[key] = [_Flat([o["state"][i][key] for i in sorted(o["state"])]) for o in inner]
        self._state = [o["state"] for o in inner]
        self._groups = inner[0]["param_groups"]
        self._offset: dict[str, int] = {}
        offset = 0
        for name in self.param_names:
            self._offset[name] = offset
            offset += math.ceil(math.prod(self.shapes[name]) / self.world)

    def _init_zero0(self) -> None:
        opt = self.model_states.get("optimizer")
        if opt is None:
            raise CheckpointError(f"{self.step_dir}: the checkpoint has no optimizer state")
        self.world = 1
        inner = opt.get("optimizer_state_dict", opt)
        self._state = [inner["state"]]
        self._groups = inner["param_groups"]
        group_shapes = [[None] * len(g["params"]) for g in self._groups]
        fp32_groups = opt.get("fp32_groups")
        for g, group in enumerate(self._groups):
            for j, idx in enumerate(group["params"]):
                st = inner["state"].get(idx, {})
                ref = fp32_groups[g][j] if fp32_groups else next((v for v in st.values() if v.dim() > 0), None)
                group_shapes[g][j] = tuple(ref.shape) if ref is not None else None
        order = _match_groups([(n, self.shapes[n]) for n in self.param_names], group_shapes)
        self._zero0_index = {}
        self._zero0_master = {}
        for name, (g, j) in order.items():
            self._zero0_index[name] = self._groups[g]["params"][j]
            if fp32_groups:
                self._zero0_master[name] = fp32_groups[g][j]
            self.group_of[name] = g

    @staticmethod
    def _elem_keys(states: list[dict[str, Any]], numels: list[int]) -> list[str]:
        st = states[0] if states else {}
        return [k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0 and v.numel() == numels[0]]

    # ------------------------------------------------------------------ the adapter interface

    @property
    def buffer_names(self) -> list[str]:
        return list(self.buffer_names_)

    def layout(self) -> dict[str, Any]:
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(next(iter(self.lp_dtype.values()), None), "fp32")
        dp = self.dp if self.tp > 1 else self.world
        return {
            "engine": "deepspeed",
            "zero_stage": self.stage,
            "dtype": dtype,
            "world_size": dp * self.tp,
            "data_parallel": dp,
            **({"tensor_parallel": self.tp} if self.tp > 1 else {}),
            "imported_from": str(self.step_dir),
        }

    def _keys(self) -> tuple[list[str], list[str]]:
        if self.stage == 0:
            st = next(iter(self._state[0].values()), {})
            return (
                [k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0],
                [k for k, v in st.items() if torch.is_tensor(v) and v.dim() == 0],
            )
        st = self._state[0][min(self._state[0])]
        if self.stage == 3:
            elem = [k for k in self._flats if k != "master"]
        else:
            numel = self.optim[0]["single_partition_of_fp32_groups"][0].numel()
            elem = [k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0 and v.numel() == numel]
        return elem, [k for k, v in st.items() if torch.is_tensor(v) and v.dim() == 0]

    def _partition(self, name: str) -> Partition:
        numel = math.prod(self.shapes[name])
        if self.tp > 1:
            return Partition.whole(0, numel)
        if self.stage == 3:
            return zero3_chunks(numel, self.world)
        if self.stage in (1, 2):
            parts, start = [], 0
            for rank, _, n in sorted(self._frag[name]):
                parts.append((start, n, rank))
                start += n
            if start != numel:
                raise CheckpointError(f"{name}: fragments hold {start} elements, the shape needs {numel}")
            return Partition(parts=tuple(parts))
        return Partition.whole(0, numel)

    def items(self) -> list[Item]:
        elem, scal = self._keys()
        model, master, optim = [], [], []
        for name in self.param_names:
            shape = self.shapes[name]
            part = self._partition(name)
            model.append(Item("model", name, shape, self.lp_dtype.get(name, torch.float32)))
            if self.low_precision:
                master.append(Item("master", name, shape, torch.float32, part))
            optim += [Item("optimizer", f"{name}/{k}", shape, torch.float32, part) for k in elem]
            optim += [Item("optimizer", f"{name}/{k}", (), self._scalar(name, k).dtype) for k in scal]
        buffers = [
            Item("model", b, tuple(t.shape), t.dtype)
            for b in self.buffer_names_
            for t in [self.model_states["module"][b]]
        ]
        return model + buffers + master + optim

    def _scalar(self, name: str, key: str) -> Any:
        states = self._state[0]
        if self.stage == 0:
            return states[self._zero0_index[name]][key]
        g = self.group_of.get(name) if self.stage != 3 else None  # ZeRO-3 sub-groups all share one step count
        return (states[g] if g in states else states[min(states)])[key]

    def local(self, item: Item) -> torch.Tensor:
        """A whole tensor: a model weight (from the model states, or the assembled fp32 master cast to the model's
        dtype under ZeRO-3), a buffer, or a 0-d optimizer state."""
        if item.group == "optimizer":
            name, key = item.name.rsplit("/", 1)
            return self._scalar(name, key)
        module = self.model_states["module"]
        if item.name in self.buffer_names_:
            return module[item.name]
        if self.progress is not None:
            self.progress(1)
        if self.tp > 1:
            return self._tp_merged(item.name, lambda t: self._tp_states[t]["module"][item.name]).view(item.shape)
        if self.stage in (1, 2) and item.name in module:
            return module[item.name]
        if self.stage == 0:
            return module[item.name]
        master = torch.cat(
            [
                self.part(Item("master", item.name, item.shape, torch.float32, self._partition(item.name)), r)
                for r in range(self.world)
            ]
        )[: item.numel]
        return master.view(item.shape).to(item.dtype)

    def part(self, item: Item, holder: int) -> torch.Tensor:
        """``holder``'s slice of a master weight or an optimizer moment, straight from its DeepSpeed file."""
        name, key = (item.name, "master") if item.group == "master" else item.name.rsplit("/", 1)
        if item.shape == ():  # a 0-d state (step): whole, written by the rank the plan chose
            return self.local(item).reshape(-1)
        if self.tp > 1:
            return self._tp_merged(name, lambda t: self._tp_slice(t, name, key))
        if self.stage == 0:
            idx = self._zero0_index[name]
            if key == "master":
                master = self._zero0_master.get(name)
                return (
                    (master if master is not None else self.model_states["module"][name]).to(torch.float32).reshape(-1)
                )
            return self._state[0][idx][key].reshape(-1)
        if self.stage == 3:
            numel = math.prod(self.shapes[name])
            piece = math.ceil(numel / self.world)
            valid = max(0, min(piece, numel - holder * piece))
            return self._flats[key][holder].slice(self._offset[name], piece)[:valid]
        opt = self.optim[holder]
        g = self.group_of[name]
        flat = (
            opt["single_partition_of_fp32_groups"][g]
            if key == "master"
            else opt["base_optimizer_state"]["state"][g][key]
        )
        for rank, start, numel in self._frag[name]:
            if rank == holder:
                return flat.reshape(-1)[start : start + numel]
        return torch.empty(0, dtype=torch.float32)

    def meta(self) -> dict[str, Any]:
        groups = [{k: _jsonable(v) for k, v in g.items() if k != "params"} | {"params": None} for g in self._groups]
        ms = self.model_states
        engine = {
            "global_steps": int(ms.get("global_steps", 0)),
            "global_samples": int(ms.get("global_samples", 0)),
            "skipped_steps": int(ms.get("skipped_steps", 0)),
        }
        scaler = (self.optim[0] if self.optim else (ms.get("optimizer") or {})).get("loss_scaler")
        if scaler is not None:
            engine["loss_scaler"] = {
                f: _jsonable(getattr(scaler, f))
                for f in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
                if hasattr(scaler, f)
            }
        scalars: dict[str, Any] = {}
        for name in self.param_names:
            try:
                state = self._scalar_state(name)
            except (KeyError, ValueError):
                continue
            leaves = {k: _jsonable(v) for k, v in state.items() if not torch.is_tensor(v) and is_json_scalar(v)}
            if leaves:
                scalars[name] = leaves
        return {
            "optimizer": {"class": UNKNOWN_CLASS, "param_groups": groups, "scalars": scalars},
            "engine": engine,
        }

    def _scalar_state(self, name: str) -> dict[str, Any]:
        states = self._state[0]
        if self.stage == 0:
            return states.get(self._zero0_index[name], {})
        g = self.group_of.get(name) if self.stage != 3 else None
        return states[g] if g in states else states[min(states)]

    # ------------------------------------------------------------------ trainer state

    def trainer_state(self) -> dict[str, Any]:
        ms = self.model_states
        sched = ms.get("lr_scheduler")
        ours = sched if isinstance(sched, dict) and sched.get("format") == "wsd_pretrain.WSDScheduler" else None
        steps = int(ms.get("global_steps", 0)) - int(ms.get("skipped_steps", 0))
        client = ms.get("wsd_pretrain") if isinstance(ms.get("wsd_pretrain"), dict) else {}
        position = int(ours["position"]) if ours else steps
        return {
            "position": position,
            "trajectory_position": int(ours["trajectory_position"]) if ours else steps,
            "step": int(ours["updates"]) if ours else steps,
            "tokens": int(ours["tokens"]) if ours else 0,
            "scheduler": _jsonable(ours) if ours else None,
            "data": client.get("data"),
            "extra": client.get("extra"),
            "imported_from": {
                "deepspeed": str(self.step_dir),
                "global_steps": int(ms.get("global_steps", 0)),
                "skipped_steps": int(ms.get("skipped_steps", 0)),
                "global_samples": int(ms.get("global_samples", 0)),
                "ds_version": str(ms.get("ds_version", "")),
            },
        }


def _canonical_names(ms: dict[str, Any]) -> None:
    """The names of DeepSpeed's files without torch's wrapper segments (a model compiled or activation-checkpointed
    before ``deepspeed.initialize``: ``_orig_mod.``, ``_checkpoint_wrapped_module.``), in place, by the checkpoint's
    one rule (names.py): the ``module`` state_dict (whose checkpoint_wrapper hook already dropped its segment) and
    the named-parameter lists then agree."""
    if isinstance(ms.get("module"), dict):
        ms["module"] = {canonical_text(k): v for k, v in ms["module"].items()}
    if isinstance(ms.get("buffer_names"), list):
        ms["buffer_names"] = [canonical_text(n) for n in ms["buffer_names"]]
    if isinstance(ms.get("shared_params"), dict):
        ms["shared_params"] = {canonical_text(k): canonical_text(v) for k, v in ms["shared_params"].items()}
    if isinstance(ms.get("param_shapes"), list):
        ms["param_shapes"] = [
            type(group)((canonical_text(n), s) for n, s in group.items()) if isinstance(group, dict) else group
            for group in ms["param_shapes"]
        ]


def _match_groups(params: list[tuple[str, tuple[int, ...]]], groups: list[list[Any]]) -> dict[str, tuple[int, int]]:
    """Assign the module's parameters (in order) to param-group slots (each group in module order) by shape; the
    assignment must exist and be unique."""
    n, sizes = len(params), [len(g) for g in groups]
    if n != sum(sizes):
        raise CheckpointError(f"ZeRO-0 checkpoint: {n} parameters, {sum(sizes)} optimizer slots")

    @cache
    def count(i: int, pos: tuple[int, ...]) -> int:
        if i == n:
            return 1
        total = 0
        for g, p in enumerate(pos):
            if p < sizes[g] and groups[g][p] in (None, params[i][1]):
                total += count(i + 1, (*pos[:g], p + 1, *pos[g + 1 :]))
                if total > 1:
                    return total
        return total

    start = tuple(0 for _ in groups)
    found = count(0, start)
    if found != 1:
        raise CheckpointError(
            "ZeRO-0 checkpoint: the optimizer's param groups cannot be matched to parameter names "
            + (
                "(no consistent order)"
                if found == 0
                else "unambiguously (parameters of equal shapes in several groups)"
            )
            + "; convert a ZeRO-1/2/3 checkpoint, which records names"
        )
    out, pos = {}, list(start)
    for i in range(n):
        for g in range(len(groups)):
            if pos[g] < sizes[g] and groups[g][pos[g]] in (None, params[i][1]):
                trial = tuple([*pos[:g], pos[g] + 1, *pos[g + 1 :]])
                if count(i + 1, trial) == 1:
                    out[params[i][0]] = (g, pos[g])
                    pos[g] += 1
                    break
    return out


# ---------------------------------------------------------------------------------------------- pipeline stages

_LAYER_RE = re.compile(r"^layer_(\d+)-model_states\.pt$")
_LAYER_TP_RE = re.compile(r"^layer_\d+-model_\d+-model_states\.pt$")


def open_deepspeed_checkpoint(path: str | Path) -> Any:
    """The source for a DeepSpeed checkpoint: :class:`PipeCheckpointSource` for a ``PipelineEngine``'s (layer files
    beside the model states), else :class:`DeepSpeedCheckpointSource`."""
    step_dir = find_deepspeed_step_dir(path)
    if any(_LAYER_RE.match(f.name) or _LAYER_TP_RE.match(f.name) for f in step_dir.iterdir()):
        return PipeCheckpointSource(step_dir)
    return DeepSpeedCheckpointSource(step_dir)


class PipeCheckpointSource:
    """A DeepSpeed ``PipelineEngine`` checkpoint (ZeRO-0/1) as one model: each stage's ``mp_rank_SS_model_states.pt``
    (its parameter names and ZeRO layout) and ``zero_pp_rank_D_mp_rank_SS_optim_states.pt`` (its data-parallel ranks'
    partitions) read as one :class:`DeepSpeedCheckpointSource`, its weights from the ``layer_XX-model_states.pt``
    files (DeepSpeed's own ``PipelineModule.load_state_dir`` reads these): ``XX.<name>`` is layer XX's ``<name>``; a
    tied module's ``tied_modules.<key>.<name>`` comes from the one layer file whose tensors are exactly that
    module's (names and shapes; two tied modules alike are refused as ambiguous). The stages' union is the model,
    each tensor owned by the first stage that holds it (a tied weight once, with that stage's optimizer state); stage
    S's data-parallel rank D is holder ``S * dp + D``, so every partition stays the file it came from."""

    gathers = False
    rank = 0
    device = torch.device("cpu")

    def __init__(self, step_dir: Path) -> None:
        self.step_dir = step_dir
        if any(_LAYER_TP_RE.match(f.name) for f in step_dir.iterdir()):
            raise CheckpointError(
                f"{step_dir}: a pipeline checkpoint with tensor-parallel layer files (layer_XX-model_YY): pipeline "
                "stages with a model-parallel slice are not supported; convert it with DeepSpeed's ds_to_universal.py"
            )
        layers = {int(m.group(1)): f for f in step_dir.iterdir() if (m := _LAYER_RE.match(f.name))}
        mp = sorted({int(m.group(1)) for f in step_dir.iterdir() if (m := _MP_RANK_RE.search(f.name))})
        if not mp or mp != list(range(len(mp))):
            raise CheckpointError(f"{step_dir}: model states files for pipeline stages {mp}, expected 0-{len(mp) - 1}")
        states = {n: _load(f) for n, f in sorted(layers.items())}
        models = {s: _load(step_dir / f"mp_rank_{s:02d}_model_states.pt") for s in mp}
        shapes: dict[str, tuple[int, ...]] = {}
        for ms in models.values():
            _canonical_names(ms)
            shapes |= {
                n: tuple(int(d) for d in sh) for group in ms.get("param_shapes") or [] for n, sh in group.items()
            }
        tied_layer = _tied_layers(shapes, states, step_dir)
        self.stages: list[DeepSpeedCheckpointSource] = []
        for s in mp:
            ms = models[s]
            names = [n for group in ms.get("param_shapes") or [] for n in group]
            names += list(ms.get("buffer_names") or [])
            if not names:
                raise CheckpointError(
                    f"{step_dir}: stage {s}'s model states list no parameters (no param_shapes: DeepSpeed records "
                    "none at ZeRO stage 0), so which layer files and optimizer entries are the stage's is not known; "
                    "import a ZeRO-1 pipeline checkpoint, or save the job with wsd_pretrain's CheckpointManager"
                )
            weights = {n: _layer_tensor(n, states, tied_layer, step_dir) for n in names}
            self.stages.append(DeepSpeedCheckpointSource(step_dir, _stage=(s, weights)))
        dps = {src.world for src in self.stages}
        if len(dps) != 1:
            raise CheckpointError(f"{step_dir}: the pipeline stages have {sorted(dps)} data-parallel ranks")
        self.dp = dps.pop()
        self.world = self.dp * len(self.stages)
        self.owner: dict[str, int] = {}
        for s, src in enumerate(self.stages):
            for n in [*src.param_names, *src.buffer_names]:
                if n in self.owner:
                    first = self.stages[self.owner[n]]
                    if n in first.shapes and first.shapes[n] != src.shapes.get(n):
                        raise CheckpointError(f"{n}: stages {self.owner[n]} and {s} hold it with different shapes")
                    continue
                self.owner[n] = s
        self.param_names = [n for n in self.owner if n not in self.buffer_names]

    @property
    def buffer_names(self) -> list[str]:
        return list(dict.fromkeys(b for src in self.stages for b in src.buffer_names))

    @property
    def tied(self) -> dict[str, str]:
        return {k: v for src in self.stages for k, v in src.tied.items()}

    @property
    def progress(self) -> Any:
        return self.stages[0].progress

    @progress.setter
    def progress(self, value: Any) -> None:
        for src in self.stages:
            src.progress = value

    def layout(self) -> dict[str, Any]:
        return self.stages[0].layout() | {
            "world_size": self.world,
            "data_parallel": self.dp,
            "pipeline_stages": len(self.stages),
        }

    def _of(self, item: Item) -> tuple[int, DeepSpeedCheckpointSource]:
        name = item.name.rsplit("/", 1)[0] if item.group == "optimizer" else item.name
        s = self.owner[name]
        return s, self.stages[s]

    def items(self) -> list[Item]:
        by_group: dict[str, list[Item]] = {"model": [], "master": [], "optimizer": []}
        buffers = set(self.buffer_names)
        for s, src in enumerate(self.stages):
            off = s * self.dp
            for it in src.items():
                if self._of(it)[0] != s:
                    continue  # a tied weight: stored by its first stage
                part = it.partition
                if not part.replicated:
                    part = Partition(parts=tuple((a, n, r + off) for a, n, r in part.iter_parts(it.numel, self.dp)))
                by_group[it.group].append(Item(it.group, it.name, it.shape, it.dtype, part))
        model = by_group["model"]
        return (
            [i for i in model if i.name not in buffers]
            + [i for i in model if i.name in buffers]
            + by_group["master"]
            + by_group["optimizer"]
        )

    def local(self, item: Item) -> torch.Tensor:
        return self._of(item)[1].local(item)

    def part(self, item: Item, holder: int) -> torch.Tensor:
        s, src = self._of(item)
        return src.part(item, holder - s * self.dp)

    def meta(self) -> dict[str, Any]:
        metas = [src.meta() for src in self.stages]
        out = metas[0]
        scalars: dict[str, Any] = {}
        for m in metas:
            for n, leaves in m["optimizer"]["scalars"].items():
                scalars.setdefault(n, leaves)
        out["optimizer"]["scalars"] = scalars
        return out

    def trainer_state(self) -> dict[str, Any]:
        return self.stages[0].trainer_state()


def _tied_layers(shapes: dict[str, tuple[int, ...]], layers: dict[int, dict[str, Any]], where: Path) -> dict[str, int]:
    """Each tied module's layer file: the first one, among the layers no ``XX.<name>`` parameter comes from, that
    holds exactly the module's parameters (names and shapes); a file two tied modules match is refused."""
    plain = {int(n.split(".", 1)[0]) for n in shapes if n.split(".", 1)[0].isdigit()}
    tied: dict[str, dict[str, tuple[int, ...]]] = {}
    for n, sh in shapes.items():
        if n.startswith("tied_modules."):
            key, _, rest = n.removeprefix("tied_modules.").partition(".")
            tied.setdefault(key, {})[rest] = sh
    out: dict[str, int] = {}
    for idx, sd in sorted(layers.items()):
        if idx in plain or not sd:
            continue
        fits = [
            k
            for k, sig in tied.items()
            if all(r in sd and tuple(sd[r].shape) == sh for r, sh in sig.items())
            and all(r in sig for r, t in sd.items() if torch.is_tensor(t) and t.is_floating_point())
        ]
        if len(fits) > 1:
            raise CheckpointError(
                f"{where}: layer_{idx:02d}-model_states.pt fits the tied modules {fits} alike: which one it holds is "
                "ambiguous; import with DeepSpeed's own consolidation (zero_to_fp32) instead"
            )
        if fits:
            out.setdefault(fits[0], idx)
    missing = sorted(set(tied) - set(out))
    if missing:
        raise CheckpointError(f"{where}: no layer file holds the tied modules {missing}")
    return out


def _layer_tensor(name: str, layers: dict[int, dict[str, Any]], tied: dict[str, int], where: Path) -> torch.Tensor:
    """``name``'s tensor in the pipeline's layer files (see :class:`PipeCheckpointSource`)."""
    head, _, rest = name.partition(".")
    if head == "tied_modules":
        key, _, rest = rest.partition(".")
        idx = tied.get(key)
    else:
        idx = int(head) if head.isdigit() else None
    sd = layers.get(idx) if idx is not None else None
    if sd is None or rest not in sd:
        raise CheckpointError(f"{where}: no layer file holds {name}")
    return sd[rest]
