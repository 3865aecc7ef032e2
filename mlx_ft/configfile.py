"""YAML -> frozen dataclasses, with every problem of a file reported at once.

PyYAML reads ``1e-5`` as a string and ``0`` as falsy; both are handled here on purpose: numbers
are coerced by the field's type and a seed of 0 is a seed. Unknown keys are errors (a typo such
as ``learning_rat`` must not silently train with the default).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from mlx_ft.errors import ConfigError


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(path, f"{where}YAML syntax error: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Coerce a YAML value to ``tp`` or record a problem naming the key and the expected type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, problems)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            problems.append(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (tuple, list):
        (inner, *_rest) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {value!r}")
            return value
        return tuple(_coerce(v, inner, f"{key}[{i}]", problems) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
            return value.lower() in ("true", "yes", "on")
        problems.append(f"{key}: expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            problems.append(f"{key}: expected a number, got {value!r}")
            return value
        try:
            number = float(value) if tp is float else _to_int(value)
        except (TypeError, ValueError):
            problems.append(f"{key}: expected {'an integer' if tp is int else 'a number'}, got {value!r}")
            return value
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            problems.append(f"{key}: expected a string, got {value!r}")
            return value
        return str(value)
    return value


def _to_int(value: Any) -> int:
    f = float(value)
    if f != int(f):
        raise ValueError(value)
    return int(f)


def build(cls: type, data: Mapping[str, Any], path: str | Path, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, collecting every problem; raise one ConfigError."""
    problems: list[str] = []
    obj = collect(cls, data, prefix, problems)
    if problems:
        raise ConfigError(path, problems)
    return obj


def collect(cls: type, data: Mapping[str, Any], prefix: str, problems: list[str]) -> Any:
    """Like :func:`build`, but appends problems to ``problems`` (for files built in parts)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = [f for f in fields if f.startswith(str(key)[:4])]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{prefix}{key}: unknown key{hint}; allowed: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{key}: required key is missing")
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            sub = data[name]
            if not isinstance(sub, Mapping):
                problems.append(f"{key}: expected a mapping, got {sub!r}")
                continue
            values[name] = collect(tp, sub, key + ".", problems)
        else:
            values[name] = _coerce(data[name], tp, key, problems)
    if any(p.startswith(prefix) for p in problems):
        return None
    try:
        obj = cls(**values)
    except TypeError as e:
        problems.append(f"{prefix.rstrip('.') or cls.__name__}: {e}")
        return None
    check = getattr(obj, "check", None)
    if check:
        problems.extend(f"{prefix}{p}" for p in check())
    return obj


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
