"""Typed configs from YAML: nested dataclasses, strict keys, command-line overrides.

A misspelt key must fail loudly instead of silently keeping a default, so `build` rejects any key
a dataclass does not have and lists the valid ones; values are checked against the field types.
Overrides use dotted paths, `model.n_layer=6`, with values parsed as YAML (`6`, `3e-4`, `true`).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from minillm.errors import InputError, InputTypeError

T = TypeVar("T")
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind))


def _check_value(value: Any, kind: Any, where: str) -> Any:
    """`value` converted to the field type `kind` (int -> float is allowed), or a clear error."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _check_value(value, option, where)
                except InputTypeError:
                    continue
        raise InputTypeError(
            f"{where} must be one of {[_type_name(o) for o in options]}, got {value!r}"
        )
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 3e-4 (no dot) as text; it is meant as a number
    if kind in (int, float, str, bool) and not (
        isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    ):
        raise InputTypeError(
            f"{where} must be {_type_name(kind)}, got {value!r} ({type(value).__name__})"
        )
    return value


def build(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """An instance of dataclass `cls` from a nested dict; missing keys keep their defaults."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise InputTypeError(
            f"{where or cls.__name__} must be a mapping of keys to values, got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [key for key in data if key not in names]
    if unknown:
        path = f"{where}." if where else ""
        raise InputError(
            f"unknown config key {', '.join(repr(path + str(k)) for k in unknown)}; "
            f"valid keys{' of ' + where if where else ''}: {', '.join(names)}"
        )
    values = {}
    for name, value in data.items():
        kind, key = hints[name], f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(kind):
            values[name] = build(kind, value, key)
        else:
            values[name] = _check_value(value, kind, key)
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts, ready for YAML; `build(cls, to_dict(c)) == c`."""
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides to a nested dict (a copy); values are parsed as YAML."""
    result = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r} must look like key=value, e.g. model.n_layer=6")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node = result
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise InputError(f"override {item!r}: {key!r} is a value, not a section")
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return result


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file as a dict, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a mapping of keys to values at the top level")
    return data
