"""Typed configuration from YAML: dataclasses filled from dicts, ``key=value`` overrides, merging.

Shared by the distillation trainer's config (``minitron_fast.distill.config``) and the pipeline's
recipes (``minitron_fast.pipeline.recipe``), so both accept and reject the same things with the
same one-line messages. Each caller passes its own error class (a MinitronError subclass).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, key: str, *, error: type[Exception], skip: tuple[str, ...] = ()) -> Any:
    """``value`` checked against (and converted to) the annotation ``tp``; ``key`` names it in errors."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, key, error=error, skip=skip)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise error(f"{key} must be a mapping of keys to values, got {value!r}")
        return from_dict(tp, value, error=error, prefix=key + ".", skip=skip)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (elem,) = args or (Any,)
            return [v if elem is Any else coerce(v, elem, key, error=error, skip=skip) for v in value]
        raise error(f"{key} must be a list, got {value!r}")
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
        if value is None:
            return {}
        raise error(f"{key} must be a mapping of keys to values, got {value!r}")
    else:
        return value
    raise error(f"{key} must be {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, d: dict[str, Any], *, error: type[Exception], prefix: str = "",
              skip: tuple[str, ...] = ()) -> Any:
    """The dataclass ``cls`` built from ``d``, every value type-checked; an unknown key is an error
    that lists the known ones. Fields named in ``skip`` are not settable from a dict."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    unknown = sorted(set(d) - set(names))
    if unknown:
        where = f" under {prefix[:-1]}" if prefix else ""
        raise error(f"unknown recipe key {prefix}{unknown[0]}; known keys{where}: {', '.join(names)}")
    return cls(**{k: coerce(v, hints[k], prefix + k, error=error, skip=skip) for k, v in d.items()})


def parse_overrides(overrides: list[str] | tuple[str, ...], *, error: type[Exception],
                    aliases: dict[str, str] | None = None, example: str = "steps=100") -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``. Values are parsed as YAML, and kept
    as plain text where they are not YAML (``prune.target=hidden=512,ffn=1024``). ``aliases``
    renames a first key component (``{"ds": "deepspeed"}``)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise error(f"override {item!r} is not key=value (for example {example})")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise error(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        if aliases and parts[0] in aliases:
            parts[0] = aliases[parts[0]]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise error(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over``, recursing into mappings present in both (neither is modified)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
