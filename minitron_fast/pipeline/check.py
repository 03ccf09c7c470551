"""``minitron-fast run RECIPE --check``: every problem a recipe has against its teacher, found in
the first seconds, before any stage runs.

Reads the teacher's ``config.json`` (or, without a checkpoint, the public config of a shipped
recipe's model, ``distill.memory.KNOWN_CONFIGS``; ``demo`` without converting it) and loads no
weights. Each problem is one line, ``error: <key>: <what> (<how to fix>)``, and all of them are
reported at once:

- the prune target against the model, with the very message ``prune --plan-only`` gives
  (``artifacts.targets.target_geometry``: GQA divisibility, experts on a dense model, sizes above
  the source, layers, ``params=`` budgets), and a search budget below the teacher's size;
- every ``seq_len`` against ``max_position_embeddings``;
- flash-attention with an fp32 stage (flash-attention runs fp16 and bf16 only);
- ``device: cuda:N`` against the visible devices, where CUDA is there;
- a GPU recipe (a stage on ``cuda``) that leaves a model-loading stage to fp32: one line per
  stage, naming its ``dtype`` key;
- the data source exists and yields the blocks each stage asks of its splits (``data_needs``:
  calibration, training, held-out, stored teacher logits), counted on its token shards, which
  the check builds for sources up to 16 MiB (and the stages reuse) and reads where an earlier
  run cached them (sources up to 1 GiB; larger ones are not counted);
- ``distill.stored_logits`` against the teacher and the data (``stored_logits_problems``: the
  manifest's vocabulary, seq_len, source, teacher and tokenizer digests, and the first train
  blocks' hashes where the data was counted);
- the run directory lying inside an input (the teacher, the data, stored logits);
- with a GPU memory size (``--gpu-mem``, or the visible GPUs'), the memory plan of every stage
  that loads a model (``distill.memory.plan_recipe``): a stage that cannot fit is an error with
  the plan's numbers.

"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from minitron_fast.pipeline.table import BY_NAME

HALF = ("bfloat16", "float16")
FLASH = ("flash_attention_2", "flash_attention_3")


def _line(key: str, what: str, fix: str) -> str:
    return f"error: {key}: {what} ({fix})"


# data sources counted by --check: hashed (to find their cached token shards) up to HASH_BYTES,
# tokenized (and cached for the run's stages) up to TOKENIZE_BYTES; larger sources are counted
# once a stage or an earlier run has cached their shards under the same tokenizer
HASH_BYTES = 1 << 30
TOKENIZE_BYTES = 16 << 20


def _source_bytes(src: str) -> int:
    if src == "demo":
        return 0
    p = Path(src).expanduser()
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _tokenizer_dir(teacher: str) -> Path | None:
    """Where the teacher's tokenizer is, without converting anything: a local checkpoint, or the
    embedded demo model once converted (None otherwise)."""
    if teacher == "demo":
        from minitron_fast.models.embedded import converted_model_path

        return converted_model_path()
    p = Path(teacher).expanduser()
    return p if (p / "config.json").is_file() else None


def data_needs(r: Any) -> list[tuple[str, str, int, int, str]]:
    """What the stages that run ask of the data: ``(key, split, seq_len, blocks, how to fix)``,
    each a hard requirement of its stage (importance without ``allow_fewer`` refuses fewer
    calibration blocks; stored teacher logits refuse more samples than the train split holds;
    training and evaluation need at least one block)."""
    from minitron_fast.pipeline.recipe import offline_teacher, stage_enabled, teacher_logits_config

    T = r.data.seq_len
    imp = r.importance
    Ti = imp.seq_len or T
    needs = [("evaluate.eval_blocks", "heldout", T, 1, "use more data or a smaller data.seq_len")]
    if not imp.allow_fewer:
        needs.append(("importance.samples", "calib", Ti, imp.samples,
                      "lower importance.samples or importance.seq_len, use more data, or set importance.allow_fewer"))
    if imp.depth_lm_loss:
        needs.append(("importance.heldout_samples", "heldout", Ti, 1, "use more data or a smaller seq_len"))
    if any(stage_enabled(r, s) for s in ("correct_teacher", "distill", "scratch")) or r.search.enabled:
        needs.append(("data.source", "train", T, 1, "use more data or a smaller data.seq_len"))
    if offline_teacher(r):
        tl = teacher_logits_config(r, check=False)
        if tl.samples is not None:
            key = "teacher_logits.samples" if r.teacher_logits.samples is not None else "distill.data.max_blocks"
            needs.append((key, "train", T, tl.samples, f"lower {key} or use more data"))
    return needs


def _data_problems(r: Any) -> tuple[list[str], Any, Any]:
    """Every requirement of :func:`data_needs` the data cannot meet, counted on its token shards
    (see HASH_BYTES; nothing is reported when the count cannot be made cheaply), with the
    tokenizer and the corpus it counted on (None where it did not)."""
    from minitron_fast.data import TokenBlocks
    from minitron_fast.data.shards import open_corpus, token_cache_root
    from minitron_fast.data.sources import corpus_fingerprint
    from minitron_fast.errors import MinitronError
    from minitron_fast.models.loading import load_tokenizer

    src = str(r.data.source)
    tok_dir = _tokenizer_dir(str(r.teacher))
    if tok_dir is None:
        return [], None, None
    tok = None
    try:
        tok = load_tokenizer(tok_dir)
        size = _source_bytes(src)
        if size > HASH_BYTES:
            return [], tok, None
        cached = token_cache_root() / corpus_fingerprint(src, text_field=r.data.text_field)
        if not (cached / "meta.json").is_file() and size > TOKENIZE_BYTES:
            return [], tok, None
        corpus = open_corpus(tok, src, text_field=r.data.text_field, progress=False)  # cached for the stages
    except (MinitronError, OSError) as exc:
        return [_line("data.source", f"{src}: {str(exc).splitlines()[0]}", "fix the data source")], tok, None
    problems = []
    for key, split, T, n, fix in data_needs(r):
        have = TokenBlocks(corpus, split, T).n
        if have < n:
            problems.append(_line(key, f"needs {n:,} {split} block{'s' if n > 1 else ''} of {T} tokens, but the "
                                  f"{split} split of {src} holds {have:,} (the corpus holds "
                                  f"{corpus.n_tokens:,} tokens)", fix))
    return problems, tok, corpus


def stored_logits_problems(r: Any, teacher_config: Any, tokenizer: Any = None, corpus: Any = None, *,
                           teacher_dir: str | Path | None = None) -> list[str]:
    """``distill.stored_logits`` against this run: a complete directory whose manifest has the
    teacher's vocabulary, the data's seq_len, source and text field, enough blocks, and, where
    known, the teacher's digest (``teacher_dir``), the tokenizer's and the first 1,024 train
    blocks' hashes (``corpus``). The teacher_logits stage runs the same check before reading them."""
    from minitron_fast.artifacts import teacher_logits as tl
    from minitron_fast.pipeline.recipe import teacher_logits_config

    key, d = "distill.stored_logits", r.distill.stored_logits
    rewrite = "write them for this run with minitron-fast teacher-logits --out DIR, or drop distill.stored_logits"
    try:
        reader = tl.TeacherLogits(Path(d).expanduser())
    except tl.TeacherLogitsError as exc:
        return [_line(key, str(exc), rewrite)]
    vocab = int(teacher_config.vocab_size)
    if reader.vocab_size != vocab:
        return [_line(key, f"{d} covers a {reader.vocab_size:,}-token vocabulary but the teacher has {vocab:,}",
                      rewrite)]
    run = tl.RunIdentity(seq_len=r.data.seq_len,
                         tokenizer_digest=tl.tokenizer_digest(tokenizer) if tokenizer is not None else
                         reader.manifest["tokenizer"]["digest"],
                         vocab_size=vocab, data_source=str(r.data.source), text_field=r.data.text_field,
                         teacher_digest=tl.model_digest(teacher_dir) if teacher_dir is not None else None)
    n = teacher_logits_config(r, check=False).samples   # distill reads these (None: as many as are stored)
    hashes = None
    if corpus is not None:
        from minitron_fast.data import TokenBlocks

        hashes = tl.block_hashes(TokenBlocks(corpus, "train", r.data.seq_len),
                                 limit=min(1024, reader.n_blocks, n or reader.n_blocks))
    try:
        reader.check_run(run, hashes, n_blocks=n)
    except tl.TeacherLogitsError as exc:
        return [_line(key, str(exc), rewrite)]
    return []


def _dtype(recipe: Any, name: str) -> str:
    """The dtype a section loads its model in: its ``dtype``; a training section's None follows
    ``deepspeed.bf16``; every other None is float32."""
    sec = getattr(recipe, name)
    if sec.dtype:
        return sec.dtype
    if BY_NAME[name].kind == "train":
        ds = sec.deepspeed if sec.deepspeed is not None else recipe.distill.deepspeed
        return "bfloat16" if ds is not None and ds.bf16 else "float32"
    return "float32"


def check_recipe(recipe: Any, *, recipe_ref: str | None = None, overrides: list[str] = (), out: str | None = None,
                 gpu_mem: str | float | None = None) -> list[str]:
    """The problems of ``recipe`` (a loaded :class:`~minitron_fast.pipeline.recipe.Recipe`), one
    line each; empty when it passes. ``recipe_ref``/``overrides``: how it was loaded (the memory
    plan reloads it); ``out``: the run directory (default: the recipe's); ``gpu_mem``: the GPU size
    to plan for (None: the visible GPUs', or no memory check without CUDA)."""
    import torch

    from minitron_fast.artifacts.targets import TargetError, parse_budget_spec, target_geometry
    from minitron_fast.distill.memory import KNOWN_CONFIGS, MemoryPlanError, model_config
    from minitron_fast.errors import MinitronError
    from minitron_fast.io import same_or_inside
    from minitron_fast.models import view_class_for_config
    from minitron_fast.pipeline.table import model_sections

    problems: list[str] = []
    r = recipe
    teacher = str(r.teacher)
    tpath = Path(teacher).expanduser()
    local = teacher != "demo" and (tpath / "config.json").is_file()
    config = None
    try:
        config = model_config(teacher)
    except (MinitronError, OSError, ValueError) as exc:
        known = ", ".join(["demo", *KNOWN_CONFIGS])
        what = (f"{teacher} does not exist" if not tpath.exists() else
                f"{teacher} has no readable config.json ({str(exc).splitlines()[0][:120]})")
        problems.append(_line("teacher", what, f"pass a local HF checkpoint directory; known without one: {known}"))
    if config is not None:
        try:
            view_cls = view_class_for_config(config)
        except MinitronError as exc:
            problems.append(_line("teacher", str(exc), "use a supported family (minitron-fast info lists them)"))
            view_cls = None
        if view_cls is not None:
            # the target, with prune's own refusals (the same function prune --plan-only runs)
            if r.prune.target and not r.search.enabled:
                try:
                    target_geometry(config, r.prune.target, budget_axes=r.prune.budget_axes)
                except TargetError as exc:
                    problems.append(_line("prune.target", f"{r.prune.target}: {exc}",
                                          "choose a target this model can take: minitron-fast info --model TEACHER"))
            if r.search.enabled:
                full = view_cls.count_params(config)["total"]
                try:
                    budget = parse_budget_spec(r.search.params).resolve(full)
                    if budget >= full:
                        problems.append(_line("search.params", f"{r.search.params} ({budget:,}) is not below the "
                                              f"teacher's {full:,} parameters", "set a smaller budget, e.g. 0.5x"))
                    else:
                        target_geometry(config, f"params={budget}", budget_axes=r.prune.budget_axes)
                except (TargetError, MinitronError, ValueError) as exc:
                    problems.append(_line("search.params", f"{r.search.params}: {exc}", "set a reachable budget"))
            # every seq_len against the model's context
            max_pos = getattr(config, "max_position_embeddings", None)
            seq_keys = [("data.seq_len", r.data.seq_len)] + [
                (f"{n}.seq_len", getattr(getattr(r, n), "seq_len")) for n in ("importance", "teacher_logits")
                if getattr(getattr(r, n, None), "seq_len", None)]
            for key, n in seq_keys:
                if max_pos and n and n > max_pos:
                    problems.append(_line(key, f"{n} exceeds the teacher's max_position_embeddings ({max_pos})",
                                          f"use at most {max_pos}"))
    # dtype, attention and devices of every stage that loads a model
    on_gpu = []
    sections = model_sections(r)   # the sections of the stages that run and load a model (table.STAGE_TABLE)
    for name in sections:
        sec = getattr(r, name)
        dt = _dtype(r, name)
        dev = str(getattr(sec, "device", "auto") or "auto")
        if dev.startswith("cuda"):
            on_gpu.append(name)
        if getattr(sec, "attn_implementation", None) in FLASH and dt not in HALF:
            problems.append(_line(f"{name}.attn_implementation", f"{sec.attn_implementation} runs fp16 and bf16 "
                                  f"only, but {name} loads its model in {dt}",
                                  f"set {name}.dtype=bfloat16, or {name}.attn_implementation=sdpa"))
        if dev.startswith("cuda:") and torch.cuda.is_available():
            from minitron_fast.configtools import cuda_devices_text

            if int(dev.split(":")[1]) >= torch.cuda.device_count():
                problems.append(_line(f"{name}.device", f"{dev}, but this machine has {cuda_devices_text()}",
                                      "pick one of them"))
    if on_gpu:  # a GPU recipe: no model-loading stage left to fp32 (an 8B teacher in fp32 is 32 GB)
        for name in sections:
            if _dtype(r, name) in HALF:
                continue
            problems.append(_line(f"{name}.dtype", f"{name} loads its model in {_dtype(r, name)} in a GPU recipe "
                                  f"(stages on cuda: {', '.join(on_gpu)})", f"set {name}.dtype=bfloat16"))
    # the data source
    src = str(r.data.source)
    if src != "demo" and not Path(src).expanduser().exists():
        problems.append(_line("data.source", f"{src} does not exist",
                              "point it at a .txt/.jsonl/.parquet file, a directory or a saved HF dataset"))
    elif config is not None:   # the blocks every stage asks of each split
        found, tok, corpus = _data_problems(r)
        problems += found
        if r.distill.stored_logits:
            problems += stored_logits_problems(r, config, tok, corpus, teacher_dir=tpath if local else None)
    # outputs inside inputs
    out_dir = Path(out or r.out).expanduser()
    stored = Path(r.distill.stored_logits).expanduser() if r.distill.stored_logits else None
    for key, inp in (("teacher", tpath if local else None), ("data.source", Path(src).expanduser() if src != "demo"
                                                             else None), ("distill.stored_logits", stored)):
        if inp is not None and inp.exists() and (same_or_inside(out_dir, inp) or same_or_inside(inp, out_dir)):
            where = "lies inside" if same_or_inside(out_dir, inp) else "contains"
            problems.append(_line("out", f"{out_dir} {where} the {key} {'directory' if inp.is_dir() else 'file'} "
                                  f"{inp}", "choose another out"))
    # memory, where a GPU size is known
    if gpu_mem is None and torch.cuda.is_available():
        gpu_mem = torch.cuda.get_device_properties(0).total_memory
    if gpu_mem is not None and config is not None and recipe_ref is not None and not any(
            p.startswith("error: prune.target") or p.startswith("error: search.params") for p in problems):
        from minitron_fast.distill.memory import GB, plan_recipe

        try:
            plans = plan_recipe(recipe_ref, list(overrides), gpu_mem=gpu_mem)
        except (MemoryPlanError, MinitronError) as exc:
            problems.append(_line("memory", str(exc).splitlines()[0], "fix the recipe keys it names"))
        else:
            for p, cfg in plans:
                if p.fits is False:
                    advice = p.advice(cfg) if p.kind == "train" else p.advice()
                    problems.append(_line(p.stage or "memory", f"needs {p.total / GB:.1f} GB per GPU, more than "
                                          f"{p.gpu_mem / GB:.0f} GB allows (plan <= 90%)",
                                          "; ".join(advice[:2]) or "minitron-fast memory RECIPE shows the plan"))
    return problems


__all__ = ["check_recipe"]
