"""Plain dicts (from YAML and ``key=value`` overrides) into typed dataclasses.

Every value is checked against its field's annotation, so ``optimizer.lr=abc``
fails with the key named instead of failing deep inside the optimizer. YAML 1.1
reads ``3e-4`` as a string; a float field accepts any string ``float()`` parses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, Union

import yaml

from megatron_msg.config import ConfigError, ModelConfig

T = TypeVar("T")


def build_dataclass(cls: type[T], values: Any, *, prefix: str) -> T:
    """Instantiate dataclass ``cls`` from ``values``; unknown keys are named in the error."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        keys = ", ".join(f"{prefix}{k}" for k in unknown)
        raise ConfigError(f"unknown config key(s) {keys}; known keys in {where}: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _convert(hints[name], value, f"{prefix}{name}") for name, value in values.items()
    }
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{where}: {err}") from err


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if hint is ModelConfig:
            # ModelConfig has its own schema: it names its unknown keys itself.
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping, got {value!r}")
            typed = {
                name: _convert(sub_hint, value[name], f"{key}.{name}")
                for name, sub_hint in typing.get_type_hints(hint).items()
                if name in value
            }
            return hint.from_dict({**value, **typed})
        return build_dataclass(hint, value, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, key)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(item, v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{key}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key} must be one of {typing.get_args(hint)}, got {value!r}")
        return value
    return _scalar(hint, value, key)


def _scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{key} must be of type {hint.__name__}, got {value!r}")


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=3"`` -> ``("a.b", 3)``; the value is read as YAML (``[1, 2]``, ``true``, ``1.5``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like key=value (e.g. optimizer.lr=3e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
    return key.strip(), value


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    """Set ``values[a][b]...`` for ``key = "a.b..."``; integer parts index lists."""
    parts = key.split(".")
    node: Any = values
    for depth, part in enumerate(parts[:-1]):
        child = _child(node, part, key)
        if child is None:
            nxt = parts[depth + 1]
            child = [] if nxt.isdigit() else {}
            _assign(node, part, child, key)
        node = child
    _assign(node, parts[-1], value, key)


def _child(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        index = _index(node, part, key, allow_append=True)
        return node[index] if index < len(node) else None
    if not isinstance(node, dict):
        raise ConfigError(f"override {key}: {part!r} is below a non-mapping value {node!r}")
    return node.get(part)


def _assign(node: Any, part: str, value: Any, key: str) -> None:
    if isinstance(node, list):
        index = _index(node, part, key, allow_append=True)
        if index == len(node):
            node.append(value)
        else:
            node[index] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ConfigError(f"override {key}: {part!r} is below a non-mapping value {node!r}")


def _index(node: list[Any], part: str, key: str, *, allow_append: bool) -> int:
    if not part.isdigit():
        raise ConfigError(f"override {key}: {part!r} must be a list index")
    index = int(part)
    limit = len(node) + (1 if allow_append else 0)
    if index >= limit:
        raise ConfigError(
            f"override {key}: index {index} is past the end of a list of {len(node)} item(s)"
        )
    return index
