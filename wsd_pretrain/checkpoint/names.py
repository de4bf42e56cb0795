"""The model's canonical names, whatever wraps it: one rule for every name a checkpoint writes or reads.

torch's wrappers add a segment to the names of everything under them: ``torch.compile``'s ``OptimizedModule``
(``_orig_mod.``), activation checkpointing's ``checkpoint_wrapper`` (``_checkpoint_wrapped_module.``), DDP and
DataParallel (``module.``) and FSDP1 (``_fsdp_wrapped_module.``), at the top or around any block (torchtitan compiles
and checkpoints each block). A checkpoint keeps none of them: the Hugging Face folder, ``train_state``, its index,
resume and the tools see the names the bare model has, so a run saved compiled resumes uncompiled, and the folder
loads with ``from_pretrained``.

The rule is :func:`torch.distributed.checkpoint.state_dict.get_model_state_dict`'s (``_get_fqns``): walk the name's
segments down the module tree and drop a segment that is a wrapper's own attribute, deciding by the module's type,
never by the text alone (a user's submodule called ``module`` keeps its name). A name whose wrapper segment was
already removed (checkpoint_wrapper's ``state_dict`` hook removes its own) walks through the wrapper the same way.
tests/test_model_wrappers.py checks the rule against torch's own on every wrapper combination it builds.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["WRAPPER_ATTRS", "canonical_name", "canonical_text", "inner_module", "wrapper_attr"]

WRAPPER_ATTRS = ("_orig_mod", "_checkpoint_wrapped_module", "module", "_fsdp_wrapped_module")
"""The attributes under which torch's wrappers hold the module they wrap (docs/manager.md lists the wrappers)."""


def wrapper_attr(module: Any) -> str | None:
    """The attribute holding the wrapped module when ``module`` is one of torch's wrappers, else None."""
    if not isinstance(module, torch.nn.Module):
        return None
    if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return "module"
    cls = type(module)
    names = {c.__name__ for c in cls.__mro__}
    if "OptimizedModule" in names and isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
        return "_orig_mod"  # torch._dynamo.eval_frame.OptimizedModule (not imported: importing dynamo costs seconds)
    if "ActivationWrapper" in names and isinstance(
        getattr(module, "_checkpoint_wrapped_module", None), torch.nn.Module
    ):
        return "_checkpoint_wrapped_module"  # checkpoint_wrapper / offload_wrapper
    if "FullyShardedDataParallel" in names and isinstance(
        getattr(module, "_fsdp_wrapped_module", None), torch.nn.Module
    ):
        return "_fsdp_wrapped_module"  # FSDP1 (FSDP2's fully_shard adds no segment)
    return None


def inner_module(module: Any) -> Any:
    """``module`` with the wrappers around its top taken off (``DDP(compile(m))`` -> ``m``)."""
    while (attr := wrapper_attr(module)) is not None:
        module = getattr(module, attr)
    return module


def canonical_name(root: torch.nn.Module, name: str) -> str:
    """``name`` (a parameter, buffer or ``state_dict`` key under ``root``) without the wrappers' segments."""
    out: list[str] = []
    current: Any = root
    for atom in name.split("."):
        consumed = False
        while current is not None and (attr := wrapper_attr(current)) is not None:
            current = getattr(current, attr)
            if atom == attr:
                consumed = True
                break
            # the wrapper's segment is absent from this name (a state_dict hook removed it): walk through it
        if consumed:
            continue
        out.append(atom)
        modules = getattr(current, "_modules", None)
        current = modules.get(atom) if isinstance(modules, dict) else None
    return ".".join(out)


_UNAMBIGUOUS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def canonical_text(name: str) -> str:
    """The same rule for a name without its module (another framework's files: ``from-deepspeed``): the segments
    only torch's wrappers use are dropped; ``module.`` is kept (a user's submodule may be called that)."""
    return ".".join(a for a in name.split(".") if a not in _UNAMBIGUOUS)
