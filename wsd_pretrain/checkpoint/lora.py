"""LoRA adapters (peft) in the checkpoint: what is saved, and the merged Hugging Face folder ``export-hf`` writes.

A ``PeftModel`` trains its adapters on a frozen base. Its checkpoint holds the whole ``PeftModel`` under PEFT's
own module names (``base_model.model.<base name>.base_layer.weight``, ``….lora_A.default.weight``; the frozen base
once, the adapters and their optimizer state), which is what resume restores, bitwise. That folder is not a model
of the base's class, so the base's ``config.json`` is not written beside it (``from_pretrained`` would load none of
those names, with a warning, and random weights where they should be); instead:

* ``adapter_config.json``: the active adapter's PEFT config (PEFT's own file and format);
* ``base_config.json``: the base model's Hugging Face config.

``wsd-pretrain ckpt export-hf --merge-lora`` writes the folder a user loads with ``from_pretrained``: the base's
names and config, each adapted ``Linear``'s weight merged as PEFT's ``merge_and_unload`` merges it
(``W + (B @ A) * scaling``, ``scaling = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA; in fp32 for 16-bit weights,
as PEFT does on a CPU), the adapter tensors dropped, ``modules_to_save`` copies put in place of their originals.
What the merge does not know (DoRA, LoRA on embeddings, biases of adapters, per-module ranks, several adapters) is
refused, naming it.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable
from typing import Any

import torch

from ..errors import CheckpointError
from .names import inner_module

__all__ = ["ADAPTER_CONFIG", "BASE_CONFIG", "MergedLoRA", "peft_files"]

ADAPTER_CONFIG = "adapter_config.json"
BASE_CONFIG = "base_config.json"
_PREFIX = "base_model.model."


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def peft_files(model: Any, hf_config: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the ``config.json`` to write, other JSON files to write) for ``model``: unchanged for a model that is not a
    ``PeftModel``; for one, no ``config.json`` and the adapter's and base's configs under their own names."""
    module = inner_module(model)
    configs = getattr(module, "peft_config", None)
    if not isinstance(configs, dict) or not isinstance(getattr(module, "base_model", None), torch.nn.Module):
        return hf_config, {}
    active = getattr(module, "active_adapter", None)
    active = active[0] if isinstance(active, (list, tuple)) and active else active
    cfg = configs.get(active) if active in configs else next(iter(configs.values()), None)
    files: dict[str, Any] = {}
    if cfg is not None:
        data = _plain(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg)))
        files[ADAPTER_CONFIG] = {**data, "wsd_pretrain_adapter_name": active, "wsd_pretrain_adapters": sorted(configs)}
    if hf_config is not None:
        files[BASE_CONFIG] = hf_config
    return None, files


class MergedLoRA:
    """The merged model's tensors from a checkpoint's PEFT names: ``names`` (merged name -> shape and dtype from
    ``entry(name)``) and ``tensor(name, read)`` computing each from ``read(checkpoint name)``."""

    def __init__(self, names: list[str], adapter_config: dict[str, Any], entry: Callable[[str], Any]) -> None:
        cfg = adapter_config
        adapter = cfg.get("wsd_pretrain_adapter_name") or "default"
        problems = []
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            problems.append(f"peft_type {cfg.get('peft_type')!r} (only LoRA merges)")
        for key in ("use_dora", "lora_bias", "use_qalora"):
            if cfg.get(key):
                problems.append(f"{key}=true")
        for key in ("rank_pattern", "alpha_pattern"):
            if cfg.get(key):
                problems.append(f"{key} {cfg[key]!r} (per-module ranks)")
        if len(cfg.get("wsd_pretrain_adapters") or [adapter]) > 1:
            problems.append(f"several adapters {cfg['wsd_pretrain_adapters']}")
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
            problems.append(f"r={r!r}, lora_alpha={alpha!r}")
        known = re.compile(rf"\.(lora_A|lora_B)\.{re.escape(adapter)}\.weight$")
        odd = [n for n in names if ("lora_" in n and not known.search(n)) or ".lora_magnitude_vector" in n]
        if odd:
            problems.append(f"adapter tensors the merge does not know: {odd[:3]}")
        if problems:
            raise CheckpointError(
                "cannot merge this PEFT checkpoint: " + "; ".join(problems) + ": export-hf --merge-lora merges one "
                "plain LoRA adapter on Linear layers (resume still restores the checkpoint as it is)"
            )
        self.scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        self.adapter = adapter
        present = set(names)
        self.sources: dict[str, tuple[str, str | None, str | None]] = {}  # merged name -> (base, lora A, lora B)
        replaced = set()
        for n in names:
            if ".modules_to_save." in n:
                head, _, tail = n.partition(f".modules_to_save.{adapter}.")
                if tail:
                    replaced.add(f"{head}.original_module.{tail}")
                    self.sources[_merged_name(f"{head}.{tail}")] = (n, None, None)
        for n in names:
            if known.search(n) or n in replaced or ".modules_to_save." in n:
                continue
            a = b = None
            if ".base_layer." in n and n.endswith(".weight"):
                module = n[: n.rindex(".base_layer.")]
                a, b = f"{module}.lora_A.{adapter}.weight", f"{module}.lora_B.{adapter}.weight"
                if a not in present or b not in present:
                    a = b = None
            self.sources[_merged_name(n.replace(".original_module.", "."))] = (n, a, b)
        self.entry = entry

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def tensor(self, name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        base, a, b = self.sources[name]
        w = read(base)
        if a is None or b is None:
            return w
        wa, wb = read(a), read(b)
        if w.dtype in (torch.float16, torch.bfloat16):  # PEFT merges 16-bit weights in fp32 on a CPU
            wa, wb = wa.float(), wb.float()
        delta = wb @ wa
        delta = (delta.T if self.fan_in_fan_out else delta) * self.scaling
        return w + delta.to(w.dtype)


def _merged_name(name: str) -> str:
    return name.removeprefix(_PREFIX).replace(".base_layer.", ".")
