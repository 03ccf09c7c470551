"""Lazy package exports: a package's public names imported from their modules on first use, so
importing a package (or building the CLI parser, which reads the stage configs) stays light."""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_getattr(package: str, exports: dict[str, tuple[str, ...]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that serves ``exports`` (defining module -> its public names).
    A name must not also be a submodule's name (importing ``pkg.x`` sets ``pkg.x`` to the module)."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in where:
            value = getattr(importlib.import_module(where[name]), name)
            setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def exported_names(exports: dict[str, tuple[str, ...]]) -> list[str]:
    """``__all__`` for ``exports``."""
    return sorted(name for names in exports.values() for name in names)
