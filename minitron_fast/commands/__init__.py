"""Thin CLI subcommands: each parses arguments and calls a stage's Python API.

A stage's options are flags derived from its config dataclass (``configtools.add_arguments``);
the flags here are the inputs every stage shares: the model, the text, the CPU threads.
"""
from __future__ import annotations

import argparse

MODEL_HELP = "HF checkpoint directory, or 'demo' for the embedded SmolLM2-135M"


def add_model_argument(p: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:  # noqa: A002
    p.add_argument("--model", required=True, help=help)


def add_data_arguments(p: argparse.ArgumentParser, what: str = "text") -> None:
    p.add_argument("--data", default="demo", help=f"{what}: a .txt/.jsonl file, a directory, a saved HF dataset, or "
                                                  "'demo' (pydoc text) (default demo)")
    p.add_argument("--text-field", default="text", help="JSONL/dataset text field (default text)")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
