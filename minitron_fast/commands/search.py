"""``minitron-fast search --model PATH|demo --scores FILE --params BUDGET [--out DIR]``: candidate
shapes at a parameter budget, each pruned, briefly retrained by KD and ranked by held-out loss;
prints the table and writes the winner's plan (``DIR/plan.json``, usable by ``prune``).

The options are :class:`~minitron_fast.search.config.SearchConfig`'s fields as flags, plus
``--depth-metric``/``--depth-mode`` from :class:`~minitron_fast.prune.config.PruneConfig` (how
each candidate is pruned) and the retraining objective's ``--kd-weight``, ``--lm-weight``,
``--divergence``, ``--beta``, ``--temperature``, ``--t2-scaling`` from the distill stage's loss
section (:class:`~minitron_fast.distill.config.LossConfig`; a recipe's search uses that section)."""
from __future__ import annotations

import argparse

from minitron_fast import configtools
from minitron_fast.commands import add_data_arguments, add_model_argument, add_threads_argument, set_threads
from minitron_fast.distill.config import LossConfig
from minitron_fast.ops.kd_loss.divergences import names as divergence_names
from minitron_fast.prune.config import PruneConfig
from minitron_fast.search.config import RETRAIN_LOSS_KEYS, SearchConfig, retrain_spec

PRUNE_FIELDS = ("depth_metric", "depth_mode")
LOSS_FIELDS = RETRAIN_LOSS_KEYS
LOSS_HELP = {"kd_weight": "weight of the logit KD term", "lm_weight": "weight of the student's next-token CE",
             "divergence": f"KD divergence: {', '.join(divergence_names())}", "beta": "the JSD's beta",
             "temperature": "softmax temperature of both models in the KD term",
             "t2_scaling": "multiply the KD term by temperature**2"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p, "teacher: HF checkpoint directory, or 'demo'")
    p.add_argument("--scores", required=True, help="importance scores file (minitron-fast importance)")
    p.add_argument("--out", default="runs/search", help="writes plan.json, search.json, table.txt here (default runs/search)")
    add_data_arguments(p)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    configtools.add_arguments(p, SearchConfig, required=("params",))
    p.add_argument("--retrain-tokens", type=int, default=None,
                   help="KD tokens per candidate: sets --retrain-steps to tokens // (micro batch x seq len)")
    configtools.add_arguments(p, PruneConfig, only=PRUNE_FIELDS)
    group = p.add_argument_group(
        "retraining objective", "each candidate's KD steps: the distill stage's loss keys (a recipe's search uses its "
                                "distill.loss); default forward KL at temperature 1, logit KD only")
    configtools.add_arguments(group, LossConfig, only=LOSS_FIELDS)
    for action in group._group_actions:   # LossConfig is generated from KDSpec/KDLossOptions: no help metadata
        action.help = f"{LOSS_HELP[action.dest]} {action.help or ''}".strip()
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from minitron_fast.errors import MinitronError
    from minitron_fast.io import check_output, same_or_inside
    from minitron_fast.models.loading import check_seq_len, load_config, resolve_model_path
    from minitron_fast.search import run_search

    set_threads(args.threads)
    if args.model != "demo" and same_or_inside(args.out, resolve_model_path(args.model)):
        raise MinitronError(f"--out {args.out} lies inside the input model directory; choose another --out")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise MinitronError(f"--out {args.out} is a file; pass a directory (it receives plan.json, search.json, "
                            "table.txt)")
    for name in ("plan.json", "search.json", "table.txt"):  # the files it writes: never an input
        check_output(Path(args.out) / name, inputs=[args.scores, args.data], kind="--out", allow_existing_file=True)
    # the options' own syntax first: a bad flag fails before the model is read (or the embedded one converted)
    cfg = configtools.from_args(SearchConfig, args, enabled=True).validate("--")  # before dividing by its sizes
    cfg.resolved_device("--")  # a CUDA device where there is none: one line, before anything loads
    kd = _objective(args)
    check_seq_len(load_config(args.model), args.seq_len)
    if args.retrain_tokens is not None:
        if args.retrain_tokens < 0:
            raise MinitronError(f"--retrain-tokens must be >= 0, got {args.retrain_tokens}")
        cfg.retrain_steps = args.retrain_tokens // (cfg.micro_batch_size * args.seq_len)
    res = run_search(args.model, args.scores, cfg.validate("--"),
                     prune=configtools.from_args(PruneConfig, args, only=PRUNE_FIELDS).validate("--"),
                     out_dir=args.out, data=args.data, seq_len=args.seq_len, text_field=args.text_field, kd=kd)
    print(f"wrote {res['plan']} (the winner's plan: minitron-fast prune --plan ... or run it with prune)")
    return 0


def _objective(args: argparse.Namespace):
    """The retraining's ``KDSpec`` from the loss flags, checked (one line, before anything loads)."""
    return retrain_spec(configtools.from_args(LossConfig, args, only=LOSS_FIELDS))
