"""Config files (YAML or JSON) and ``a.b=value`` overrides, turned into typed dataclasses.

A config file is a mapping of sections (``schedule:``, ``optimizer:``, ...); each section maps 1:1 to a dataclass
whose fields are the section's keys. :func:`load_config` reads the file and applies overrides; :func:`build`
turns a section into its dataclass, refusing unknown keys by name (with a suggestion) and values of the wrong type.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from .errors import ConfigError

__all__ = ["apply_overrides", "build", "dump_config", "load_config"]

T = TypeVar("T")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML or JSON config file (``None``: an empty config) and apply ``key.sub=value`` overrides."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist", where="config")
        text = p.read_text()
        try:
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{str(p)!r} could not be parsed: {exc}", where="config") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{str(p)!r} must hold a mapping of sections, not {type(data).__name__}", where="config")
    return apply_overrides(data, overrides)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b.c=value`` applied; values are read as YAML (``3``, ``0.1``,
    ``true``, ``[1, 2]``, ``null``, or a string)."""
    out = json.loads(json.dumps(data))  # a deep copy of plain data
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"{item!r}: an override is key.sub=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"{item!r}: {part!r} is a value, not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, where="overrides")
    return out


def dump_config(data: Mapping[str, Any]) -> str:
    """The config as YAML (for ``--dry-run`` and for the run directory)."""
    return yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False)


def build(cls: type[T], section: Any, where: str) -> T:
    """Build dataclass ``cls`` from a config section, checking keys and value types; the dataclass's own
    ``__post_init__`` validates the values."""
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"expected a mapping, got {type(section).__name__} ({section!r})", where=where)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    problems = []
    kwargs: dict[str, Any] = {}
    for key, value in section.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint}; valid keys: {sorted(fields)}")
            continue
        ok, coerced = _coerce(value, hints[key])
        if not ok:
            problems.append(f"{key}={value!r}: expected {_type_name(hints[key])}{_number_hint(value)}")
            continue
        kwargs[key] = coerced
    if problems:
        raise ConfigError(problems, where=where)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(exc.problems, where=where) from None


def _number_hint(value: Any) -> str:
    """YAML (1.1, as PyYAML reads it) takes ``3e-4`` for a string: a number needs a dot and a signed exponent."""
    if not isinstance(value, str):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    if not math.isfinite(number):
        return ""
    return f" (YAML reads {value} as a string: write {_yaml_float(number)}, with a dot and a signed exponent)"


def _yaml_float(number: float) -> str:
    mantissa, _, exponent = f"{number:e}".partition("e")
    mantissa = mantissa.rstrip("0")
    mantissa = mantissa + "0" if mantissa.endswith(".") else mantissa
    return f"{mantissa}e{int(exponent):+d}" if int(exponent) != 0 else mantissa


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arg in args:
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if origin is typing.Literal:
        return (value in args), value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        item_type = args[0] if args else Any
        items = []
        for v in value:
            ok, out = _coerce(v, item_type)
            if not ok:
                return False, value
            items.append(out)
        return True, (tuple(items) if origin is tuple or tp is tuple else items)
    if origin in (dict, Mapping) or tp is dict:
        return isinstance(value, dict), value
    if origin is collections.abc.Callable:
        return callable(value), value
    return isinstance(value, tp) if isinstance(tp, type) else True, value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is type(None):
        return "null"
    if origin in (tuple, list):
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    return getattr(tp, "__name__", str(tp))
