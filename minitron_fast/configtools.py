"""Typed configuration: dataclasses filled from YAML dicts, ``key=value`` overrides, merging, and
argparse flags derived from the same dataclasses.

Shared by the stage configs (``importance/config.py``, ``search/config.py``, ``prune/config.py``,
``evaluate/config.py``, ``export/config.py``, the trainer's ``distill/config.py``), the
pipeline's recipes (``minitron_fast.pipeline.recipe``, whose sections are those dataclasses) and
the CLI subcommands (:func:`add_arguments` / :func:`from_args`), so a recipe key, a Python
argument and a flag are one field with one default. Each caller passes its own error class (a
MinitronError subclass).

A field's ``metadata`` carries its CLI side: ``help`` (text), ``choices``, ``aliases`` (more
option strings for the same flag), ``cli=False`` (a recipe-only key, no flag) and ``list``
(``"comma"``, the default for lists, or ``"append"``: a repeatable flag).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from minitron_fast.errors import MinitronError


class OptionError(MinitronError, ValueError):
    """A stage option with an impossible value (the recipe prefixes its section's name)."""


def opt(default: Any = None, help: str = "", *, choices: tuple[str, ...] | None = None,  # noqa: A002
        aliases: tuple[str, ...] = (), cli: bool = True, list_style: str = "comma",
        default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its CLI metadata (see the module docstring)."""
    meta = {"help": help, "choices": choices, "aliases": aliases, "cli": cli, "list": list_style}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def key(where: str, name: str) -> str:
    """How an error names option ``name``: ``importance.seq_agg`` in a recipe (``where`` is the
    section prefix), ``--seq-agg`` on the command line (``where`` is ``"--"``)."""
    return flag_name(name) if where == "--" else f"{where}{name}"


def check_choice(value: Any, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise OptionError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def check_fields(cfg: Any, where: str = "") -> None:
    """Checks every field with ``choices`` metadata of the dataclass ``cfg``."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value is not None:
            for v in value if isinstance(value, list) else [value]:
                check_choice(v, choices, key(where, f.name))


# -- where a stage runs ---------------------------------------------------------------------------

DEVICES = ("auto", "cpu", "cuda")


def cuda_devices_text() -> str:
    """``"2 CUDA devices (cuda:0, cuda:1)"``: what an error about a missing device names."""
    import torch

    n = torch.cuda.device_count()
    return f"{n} CUDA device{'s' if n != 1 else ''} ({', '.join(f'cuda:{i}' for i in range(n)) or 'none'})"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class DeviceConfig:
    """Where a stage that loads a model runs; every such stage's config inherits these fields.
    ``device: auto`` is CUDA when available, else the CPU; ``cuda:N`` picks a GPU; ``dtype``
    None is the stage's default (float32; the trainer: bfloat16 when ``deepspeed.bf16``)."""

    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (CUDA when available)")
    dtype: str | None = opt(None, "model dtype: float32, bfloat16 or float16 (default: float32)", choices=DTYPES)
    attn_implementation: str | None = opt(
        None, "transformers attention: sdpa, eager, flash_attention_2 (default: flash_attention_2 on CUDA "
              "when installed and dtype is bfloat16/float16, else sdpa)")

    def check_device(self, where: str = "") -> None:
        """The device's syntax and every field with ``choices`` (at load time; availability is
        checked by :meth:`resolved_device`)."""
        d = str(self.device)
        if d not in DEVICES and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise OptionError(f"{key(where, 'device')}={d!r} is not one of cpu, cuda, cuda:N, auto")
        check_fields(self, where)

    def resolved_device(self, where: str = "") -> str:
        """``auto`` resolved; a CUDA device on a machine without CUDA is a one-line OptionError
        (raised before any model loads)."""
        import torch

        d = str(self.device)
        if d == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if d.startswith("cuda"):
            if not torch.cuda.is_available():
                raise OptionError(f"{key(where, 'device')}={d} but CUDA is not available on this machine (torch "
                                  f"{torch.__version__}); set {key(where, 'device')}=cpu (or auto)")
            if ":" in d and int(d.split(":")[1]) >= torch.cuda.device_count():
                raise OptionError(f"{key(where, 'device')}={d} but this machine has {cuda_devices_text()}; "
                                  "pick one of them")
        return d

    def on_cuda(self) -> bool:
        """Whether the stage runs on CUDA here: ``auto`` or ``cuda`` on a machine with CUDA. ``cpu``
        is the CPU even where CUDA is available. Never raises (:meth:`resolved_device` reports a
        ``cuda`` without CUDA)."""
        import torch

        return str(self.device) != "cpu" and torch.cuda.is_available()

    def load_kwargs(self, where: str = "") -> dict[str, Any]:
        """Keyword arguments for ``minitron_fast.models.loading.load_model``."""
        kw = {"device": self.resolved_device(where), "attn_implementation": self.attn_implementation}
        return dict(kw, dtype=self.dtype) if self.dtype else kw


@dataclass
class DeviceMapConfig(DeviceConfig):
    """:class:`DeviceConfig` plus ``device_map`` for forward-only stages (importance, evaluation)
    whose model may not fit one GPU."""

    device_map: str | None = opt(None, "transformers device_map, e.g. auto to spread a model larger than one GPU "
                                       "over every visible GPU (overrides device)")

    def load_kwargs(self, where: str = "") -> dict[str, Any]:
        kw = super().load_kwargs(where)
        if self.device_map:
            kw["device_map"] = self.device_map
        return kw


# -- argparse flags from a dataclass -------------------------------------------------------------

def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _cli_fields(cls: type, only: tuple[str, ...] | None, exclude: tuple[str, ...]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name not in exclude
            and (only is None or f.name in only)]


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, only: tuple[str, ...] | None = None,
                  exclude: tuple[str, ...] = (), required: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass ``cls``: ``retrain_steps`` -> ``--retrain-steps``, the
    field's default and its ``help``/``choices``/``aliases`` metadata. Booleans: ``--name`` when
    the default is False, ``--no-name`` when it is True. Lists: comma-separated (``--kinds a,b``)
    or repeatable (``list="append"``). Fields named in ``required`` are required flags."""
    hints = typing.get_type_hints(cls)
    for f in _cli_fields(cls, only, exclude):
        tp, default, meta = hints[f.name], _default(f), f.metadata
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        base = inner[0] if inner and (typing.get_origin(tp) is typing.Union or type(tp).__name__ == "UnionType") \
            else tp
        help_ = meta.get("help", "")
        kw: dict[str, Any] = {"dest": f.name}
        names = [flag_name(f.name)]
        if base is bool:
            if default:
                names = ["--no-" + f.name.replace("_", "-")]
                kw.update(action="store_false", default=True)
                help_ = f"turn off (on by default): {help_}"
            else:
                kw.update(action="store_true", default=False)
        elif typing.get_origin(base) is list:
            if meta.get("list") == "append":
                kw.update(action="append", default=None, metavar=f.name.upper())
            else:
                kw.update(type=_comma_list, default=list(default), metavar="A,B")
                help_ += f" (comma-separated; default {','.join(map(str, default))})" if default else ""
        else:
            kw.update(type=base if base in (int, float) else str, default=default)
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
            if default is not None:
                help_ += f" (default {default})"
        if f.name in required:
            kw["required"] = True
            kw.pop("default", None)
        parser.add_argument(*names, *meta.get("aliases", ()), help=help_ or None, **kw)


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def from_args(cls: type, args: argparse.Namespace, *, only: tuple[str, ...] | None = None,
              exclude: tuple[str, ...] = (), **values: Any) -> Any:
    """The dataclass ``cls`` built from the flags :func:`add_arguments` added (``values`` set the
    fields that have no flag, or override one)."""
    kw: dict[str, Any] = {}
    for f in _cli_fields(cls, only, exclude):
        v = getattr(args, f.name)
        kw[f.name] = _default(f) if v is None and f.metadata.get("list") == "append" else v
    kw.update(values)
    return cls(**kw)


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
    that lists the known ones. Fields named in ``skip`` are not settable from a dict. A class with a
    ``check_recipe_keys(d, prefix=, error=)`` hook refuses first what it names (keys it does not
    take, values whose meaning changed), saying what to write instead."""
    check = getattr(cls, "check_recipe_keys", None)
    if check is not None:
        check(d, prefix=prefix, error=error)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    unknown = sorted(set(d) - set(names))
    if unknown:
        where = f" under {prefix[:-1]}" if prefix else ""
        raise error(f"unknown recipe key {prefix}{unknown[0]}; known keys{where}: {', '.join(names)}")
    return cls(**{k: coerce(v, hints[k], prefix + k, error=error, skip=skip) for k, v in d.items()})


def load_yaml_mapping(path: Any, *, error: type[Exception], what: str = "recipe") -> dict[str, Any]:
    """The YAML mapping in the file ``path`` (``{}`` for an empty file); a missing file, invalid
    YAML or a non-mapping is a one-line ``error``."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {p} does not exist")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise error(f"{what} {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise error(f"{what} {p} must be a YAML mapping of keys to values")
    return d


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
