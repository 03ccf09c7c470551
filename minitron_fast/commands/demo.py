"""``minitron-fast demo``: the README's main job, on the embedded SmolLM2-135M teacher and the
standard library's pydoc text. At this stage: load the teacher, print its geometry and its
held-out perplexity."""
from __future__ import annotations

import argparse
import time

HELP = "run the demo on the embedded SmolLM2-135M teacher and pydoc text"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", type=int, default=256, help="tokens per evaluation block (default 256)")
    p.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks to evaluate (default 8 = 2,048 tokens)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    import torch

    from minitron_fast.commands.info import format_table
    from minitron_fast.data import token_blocks
    from minitron_fast.evaluate import perplexity
    from minitron_fast.models import get_view
    from minitron_fast.models.loading import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print("== minitron-fast demo: embedded SmolLM2-135M-Instruct teacher, pydoc_data text ==", flush=True)
    model = load_model("demo")
    tok = load_tokenizer("demo")
    view = get_view(model)
    print(format_table(list(view.info().items())))
    counts = view.param_counts()
    print("parameters by component: " + ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "total"))
    blocks = token_blocks(tok, "demo", "heldout", args.seq_len, max_blocks=args.eval_blocks)
    ppl = perplexity(model, blocks, desc="held-out perplexity")
    print(f"teacher held-out perplexity: {ppl:.3f} over {blocks.numel():,} tokens "
          f"({blocks.shape[0]} x {blocks.shape[1]}); {time.perf_counter() - t0:.1f} s")
    return 0
