"""Atomic outputs: write under a temporary name next to the target, then rename.

A killed run never leaves a half-written file or directory under the final name, and a
user's input directory is never written into.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from minitron_fast.errors import MinitronError


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory beside ``target``; on success it becomes ``target``.

    Raises MinitronError if ``target`` exists and ``overwrite`` is False. On an exception the
    temporary directory is removed and ``target`` is left as it was.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise MinitronError(f"output directory {target} already exists; pass --overwrite or choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def same_or_inside(path: str | os.PathLike, parent: str | os.PathLike) -> bool:
    """True if ``path`` is ``parent`` or lies inside it (used to refuse writing into inputs)."""
    p, q = Path(path).resolve(), Path(parent).resolve()
    return p == q or q in p.parents


def cache_dir() -> Path:
    """minitron_fast's cache: $MINITRON_FAST_CACHE, else $XDG_CACHE_HOME/minitron_fast, else
    ~/.cache/minitron_fast."""
    env = os.environ.get("MINITRON_FAST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minitron_fast"


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Renders a matplotlib figure to PNG, writes it atomically to ``path`` and closes it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
