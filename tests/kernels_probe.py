"""Prints where ``import kernels`` leads in this process, as one ``KERNELS ...`` line (run by
tests/test_packaging.py under each launcher a user or the trainer uses)."""
from __future__ import annotations

import os


def main() -> None:
    try:
        import kernels
    except ModuleNotFoundError:
        where = "ModuleNotFoundError"
    else:
        where = os.path.realpath(kernels.__file__)
    print(f"KERNELS {where}", flush=True)


if __name__ == "__main__":
    main()
