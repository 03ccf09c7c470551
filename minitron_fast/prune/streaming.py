"""Pruning a checkpoint on disk: streaming (safetensors shards -> pruned shards, reading only the
kept slices) or in memory (load, prune in place, export).

The streaming path never holds more than one output tensor plus a bounded read buffer: it reads
the kept row runs of each tensor with positioned reads straight into the output tensor (column
pruning goes through a ``chunk_bytes`` staging block), and writes safetensors files itself,
header first (every output shape is known from the plan), one tensor at a time. Plain file reads
are used instead of ``mmap`` so pages of the source never count against the process.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator

import torch

from minitron_fast.errors import MinitronError
from minitron_fast.io import atomic_dir, same_or_inside
from minitron_fast.models import view_class_for_config
from minitron_fast.models.export import copy_tokenizer_files, minitron_record
from minitron_fast.artifacts.plan import Plan, validate_plan
from minitron_fast.prune.surgery import ExpertRule, Rule, layers_prefix, named_rules, pruned_config

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
DEFAULT_SHARD_BYTES = 5 * 2**30


class CheckpointError(MinitronError, ValueError):
    """A missing, corrupt or mismatched checkpoint file."""


# -- reading safetensors without mmap -------------------------------------------------------------

class SafetensorsFile:
    """A safetensors file read with positioned reads: ``header[name] = (dtype, shape, begin, end)``."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint shard {path} is missing") from None
        size = os.fstat(self.f.fileno()).st_size
        try:
            (n,) = struct.unpack("<Q", self._pread(8, 0))
            if n > size - 8:
                raise ValueError("header length past the end of the file")
            hdr = json.loads(self._pread(n, 8))
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            self.f.close()
            raise CheckpointError(f"{path} is not a valid safetensors file ({exc})") from None
        self.metadata = hdr.pop("__metadata__", {}) or {}
        self.data_start = 8 + n
        self.header: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in hdr.items():
            if e["dtype"] not in ST_DTYPES:
                self.f.close()
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {e['dtype']}")
            b, end = e["data_offsets"]
            if self.data_start + end > size:
                self.f.close()
                raise CheckpointError(f"{path} is truncated: tensor {name} ends past the end of the file")
            self.header[name] = (ST_DTYPES[e["dtype"]], tuple(e["shape"]), b, end)

    def _pread(self, n: int, offset: int) -> bytes:
        b = os.pread(self.f.fileno(), n, offset)
        if len(b) != n:
            raise ValueError("short read")
        return b

    def read_into(self, out: torch.Tensor, offset: int) -> None:
        """Fills the contiguous tensor ``out`` with the bytes at ``offset`` of the data section."""
        buf = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        pos, n = 0, len(buf)
        while pos < n:
            got = os.preadv(self.f.fileno(), [buf[pos:]], self.data_start + offset + pos)
            if got <= 0:
                raise CheckpointError(f"{self.path}: unexpected end of file")
            pos += got

    def read_rows(self, name: str, rows: torch.Tensor | None, cols: torch.Tensor | None, *,
                  chunk_bytes: int = 64 << 20) -> torch.Tensor:
        """Tensor ``name`` with only ``rows`` (dim 0) and ``cols`` (dim 1) kept (None keeps all):
        runs of consecutive kept rows are read straight into the result; with column pruning,
        row blocks of at most ``chunk_bytes`` are staged and gathered."""
        dtype, shape, begin, _ = self.header[name]
        es = torch.empty((), dtype=dtype).element_size()
        out_shape = Rule(rows, cols).shape(shape)
        out = torch.empty(out_shape, dtype=dtype)
        if len(shape) == 0 or out.numel() == 0:
            if out.numel():
                self.read_into(out, begin)
            return out
        row_elems = 1
        for s in shape[1:]:
            row_elems *= s
        row_bytes = row_elems * es
        r_idx = torch.arange(shape[0]) if rows is None else rows
        runs = _runs(r_idx)
        if cols is None:
            dst = 0
            for a, b in runs:  # consecutive kept rows: one read straight into the output
                self.read_into(out[dst:dst + (b - a)], begin + a * row_bytes)
                dst += b - a
            return out
        block = max(1, chunk_bytes // max(row_bytes, 1))
        stage = torch.empty((min(block, shape[0]),) + tuple(shape[1:]), dtype=dtype)
        dst = 0
        for a, b in runs:
            for s in range(a, b, block):
                e = min(b, s + block)
                part = stage[: e - s]
                self.read_into(part, begin + s * row_bytes)
                torch.index_select(part, 1, cols, out=out[dst:dst + (e - s)])
                dst += e - s
        return out

    def close(self) -> None:
        self.f.close()


def _runs(idx: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted indices -> [(start, end)) runs of consecutive values."""
    xs = idx.tolist()
    runs: list[tuple[int, int]] = []
    for x in xs:
        if runs and runs[-1][1] == x:
            runs[-1] = (runs[-1][0], x + 1)
        else:
            runs.append((x, x + 1))
    return runs


# -- writing safetensors one tensor at a time ----------------------------------------------------------

def write_safetensors_streaming(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                                produce: Iterator[torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Writes a safetensors file whose tensors (names, dtypes, shapes known up front) come one at a
    time from ``produce``. Returns the bytes of tensor data written."""
    hdr: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for name, dtype, shape in entries:
        n = torch.empty((), dtype=dtype).element_size()
        for s in shape:
            n *= s
        hdr[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        it = iter(produce)
        for name, dtype, shape in entries:  # not zip(): its cached result tuple would keep t alive
            t = next(it)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"internal: {name} produced {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
            f.write(memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()))
            del t  # before the next tensor is read: one output tensor alive at a time
        f.flush()
        os.fsync(f.fileno())
    return off


# -- the checkpoint -------------------------------------------------------------------------------

def checkpoint_files(src: Path) -> dict[str, Path]:
    """Tensor name -> shard path for a save_pretrained directory (sharded or not)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
        files = {}
        for name, shard in wm.items():
            files[name] = src / shard
        for p in set(files.values()):
            if not p.is_file():
                raise CheckpointError(f"checkpoint shard {p} named in {index.name} is missing")
        return files
    single = src / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{src} has no model.safetensors or model.safetensors.index.json "
                              "(only safetensors checkpoints can be pruned by streaming)")
    return {name: single for name in SafetensorsFile(single).header}


def saved_expert_jobs(config: Any, plan: Plan, prefix: str, files: dict[str, Path]
                      ) -> dict[str, tuple[str, str, tuple[int, ...], Rule] | None]:
    """MoE checkpoints on disk hold one 2-D tensor per expert (``{layer}.{saved_moe_prefix}.
    experts.{e}.{name}``) and, for Mixtral, the router under ``block_sparse_moe.gate``, names
    that are not the in-memory (stacked) parameters. Maps each such tensor name in ``files`` to
    ``(in-memory name it stands for, output name with layer and expert renumbered, its source
    shape, its 2-D rule)``, or to None when its layer or expert is dropped. Empty on dense models."""
    from minitron_fast.models import view_class_for_config

    view_cls = view_class_for_config(config)
    src = plan.source_geometry()
    if not src.is_moe:
        return {}
    pat = view_cls.saved_expert_pattern()
    role_of = {n: r for r, n in view_cls.saved_expert_names.items()}
    router = view_cls.saved_router_name()
    H, F = src.hidden_size, src.moe_intermediate_size
    new_index = {old: new for new, old in enumerate(plan.layers)}
    hid = None if len(plan.hidden) == H else torch.as_tensor(plan.hidden, dtype=torch.long)
    out: dict[str, Any] = {}
    for name in files:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        m = pat.match(rest)
        i = int(rest.split(".", 1)[0])
        if m is None:
            if rest.split(".", 1)[1] == router and router != view_cls.memory_names["router"]:
                meta = f"{prefix}{i}.{view_cls.memory_names['router']}"
                kept = plan.experts.get(i)
                ex = None if kept is None or len(kept) == src.num_experts else torch.as_tensor(kept, dtype=torch.long)
                out[name] = None if i not in new_index else (
                    meta, f"{prefix}{new_index[i]}.{router}", (src.num_experts, H), Rule(ex, hid))
            continue
        e, role = int(m.group(2)), role_of[m.group(3)]
        if i not in new_index or e not in plan.experts[i]:
            out[name] = None
            continue
        j = plan.experts[i].index(e)
        kept = plan.expert_neurons[i][j]
        nr = None if len(kept) == F else torch.as_tensor(kept, dtype=torch.long)
        meta = f"{prefix}{i}.{view_cls.memory_names['down' if role == 'down' else 'gate_up']}"
        new = f"{prefix}{new_index[i]}.{view_cls.saved_expert_name(j, m.group(3))}"
        out[name] = ((meta, new, (H, F), Rule(hid, nr)) if role == "down" else (meta, new, (F, H), Rule(nr, hid)))
    return out


def load_private(src_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                 attn_implementation: str | None = None) -> torch.nn.Module:
    """Loads a ``save_pretrained`` safetensors checkpoint (or ``"demo"``) into private memory.

    ``from_pretrained`` leaves fp32 weights as copy-on-write mappings of the files: compacting
    them in place then allocates the pruned size as new anonymous memory while the file pages
    stay mapped (measured by ``bench prune``, case ``inplace_loaded``). Here the model is built
    with its parameters uninitialized (``no_init_weights``: pages untouched until written) and
    every tensor is filled with positioned reads, so the process owns every page, peaks at the
    model's size and, after ``apply_plan``, ends at the pruned size. Tensors stored in another
    dtype are converted one at a time. Checkpoint and model must match name for name.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from minitron_fast.models.loading import default_attn_implementation, load_config, resolve_model_path

    src = resolve_model_path(src_dir)
    config = load_config(src)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    files = checkpoint_files(src)
    ignored = view_class_for_config(config).ignored_checkpoint_suffixes
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation or default_attn_implementation("cpu", config))
    model.tie_weights()  # no_init_weights also skips the tying from_config does otherwise
    names = dict(model.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}
    for n, p in names.items():
        first.setdefault(id(p), n)
    tied = {n for n, p in names.items() if first[id(p)] != n}  # later names of a shared parameter
    extra = [n for n in files if n not in names and not n.endswith(ignored)]
    if extra:
        raise CheckpointError(f"checkpoint tensor {extra[0]} is not a parameter of a {type(model).__name__} "
                              f"with this config; is {src} the model the config describes?")
    readers: dict[Path, SafetensorsFile] = {}
    try:
        with torch.no_grad():
            for name, p in names.items():
                if name in tied:
                    continue  # filled through the name it was first seen under (or the checkpoint's copy)
                if name not in files:
                    raise CheckpointError(f"checkpoint in {src} has no tensor {name}")
                r = readers.setdefault(files[name], SafetensorsFile(files[name]))
                if name not in r.header:
                    raise CheckpointError(f"tensor {name} is missing from {files[name]}")
                st_dtype, shape, begin, _ = r.header[name]
                if shape != tuple(p.shape):
                    raise CheckpointError(f"checkpoint tensor {name} has shape {shape}, but the config says "
                                          f"{tuple(p.shape)}")
                if st_dtype == p.dtype:
                    r.read_into(p.data, begin)
                else:
                    tmp = torch.empty(shape, dtype=st_dtype)
                    r.read_into(tmp, begin)
                    p.data.copy_(tmp)
                    del tmp
    finally:
        for r in readers.values():
            r.close()
    return model.eval()


def prune_checkpoint(src_dir: str | os.PathLike, plan: Plan, out_dir: str | os.PathLike, *, streaming: bool = True,
                     overwrite: bool = False, scores_file: str | os.PathLike | None = None,
                     record: dict[str, Any] | None = None, chunk_bytes: int = 64 << 20,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, impl: str = "auto", progress: bool = True,
                     load_kwargs: dict[str, Any] | None = None) -> Path:
    """Prunes the checkpoint in ``src_dir`` (a ``save_pretrained`` directory or ``"demo"``) to
    ``plan`` and writes a stock HF checkpoint to ``out_dir`` (config, safetensors, tokenizer
    files, ``minitron.json`` with the source, plan and scores-file hash), atomically.

    ``streaming=True`` reads only the kept slices of each tensor from the shards (peak memory
    near the largest output tensor); ``streaming=False`` loads the model into private memory
    (``load_private``: peak the model's size), prunes it in place (``apply_plan``: it ends at the
    pruned size) and saves it (``load_kwargs``: ``load_model``'s device, dtype, attention; the
    dtype defaults to the checkpoint's). A CUDA device, or a MoE checkpoint (per-expert tensors on
    disk, stacked in memory by transformers' loader), loads through ``load_model`` instead.
    ``src_dir`` is never written to.

    Example:
        >>> prune_checkpoint("llama-8b/", plan, "llama-4b/", streaming=True)
    """
    from minitron_fast.models.loading import load_config, meta_model, resolve_model_path

    src = resolve_model_path(src_dir)
    out = Path(out_dir)
    if same_or_inside(out, src) or same_or_inside(src, out):
        raise MinitronError(f"refusing to write {out}: it overlaps the input model directory {src}; choose another --out")
    if out.exists() and not overwrite:
        raise MinitronError(f"output directory {out} already exists; pass --overwrite or choose another --out")
    config = load_config(src)
    validate_plan(plan, config)
    rec = {**minitron_record(source=src_dir, plan=plan, scores_file=scores_file,
                             scores_sha256=plan.info.get("scores_sha256")),
           "streaming": bool(streaming), **(record or {})}
    if not streaming:
        from minitron_fast.models.export import export_hf
        from minitron_fast.prune.surgery import apply_plan

        kw = dict(load_kwargs or {})
        dtype = kw.pop("dtype", None) or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) \
            or torch.float32
        if plan.source_geometry().is_moe or torch.device(kw.get("device") or "cpu").type != "cpu":
            from minitron_fast.models.loading import load_model

            model = load_model(src, dtype=dtype, **kw)
        else:
            model = load_private(src, dtype=dtype, attn_implementation=kw.get("attn_implementation"))
        apply_plan(model, plan, impl=impl, progress=progress)
        return export_hf(model, out, tokenizer_from=src, record=rec, overwrite=overwrite, protect=[src])

    files = checkpoint_files(src)
    meta = meta_model(config)
    rules = named_rules(meta, plan)
    expected = {n: tuple(p.shape) for n, p in meta.named_parameters(remove_duplicate=False)}
    tied = getattr(config, "tie_word_embeddings", False)
    prefix = layers_prefix(meta)
    new_index = {old: new for new, old in enumerate(plan.layers)}
    readers: dict[Path, SafetensorsFile] = {}

    def reader(p: Path) -> SafetensorsFile:
        if p not in readers:
            readers[p] = SafetensorsFile(p)
        return readers[p]

    try:
        # the output tensors, in source order: (new name, source name, dtype, new shape, rule)
        jobs = []
        moe_names = saved_expert_jobs(config, plan, prefix, files)  # {} on dense models
        covered: set[str] = set()
        for name in sorted(files, key=lambda n: (str(files[n]), n)):
            if name.endswith(view_class_for_config(config).ignored_checkpoint_suffixes):
                continue
            if name in moe_names:  # a per-expert (or renamed router) tensor, as save_pretrained writes them
                if moe_names[name] is None:
                    continue  # a dropped layer or expert: never read
                meta_name, new_name, src_shape, rule = moe_names[name]
                dtype, shape, _, _ = reader(files[name]).header[name]
                if shape != src_shape:
                    raise CheckpointError(f"checkpoint tensor {name} has shape {shape}, but the config says "
                                          f"{src_shape}")
                covered.add(meta_name)
                jobs.append((new_name, name, dtype, rule.shape(shape), rule))
                continue
            if name not in expected:
                raise CheckpointError(f"checkpoint tensor {name} is not a parameter of a {type(meta).__name__} "
                                      f"with this config; is {src} the model the config describes?")
            hdr = reader(files[name]).header
            if name not in hdr:
                raise CheckpointError(f"tensor {name} is missing from {files[name]}")
            dtype, shape, _, _ = hdr[name]
            if shape != expected[name]:
                raise CheckpointError(f"checkpoint tensor {name} has shape {shape}, but the config says "
                                      f"{expected[name]}")
            new_name = name
            if name.startswith(prefix):
                i = int(name[len(prefix):].split(".", 1)[0])
                if i not in new_index:
                    continue  # a dropped layer: never read
                new_name = f"{prefix}{new_index[i]}.{name[len(prefix):].split('.', 1)[1]}"
            rule = rules.get(name, Rule())
            jobs.append((new_name, name, dtype, rule.shape(shape), rule))
        names = {j[1] for j in jobs}
        for n in expected:
            dropped = n.startswith(prefix) and int(n[len(prefix):].split(".", 1)[0]) not in new_index
            if n not in files and n not in covered and not dropped and not (tied and n.endswith("lm_head.weight")):
                raise CheckpointError(f"checkpoint in {src} has no tensor {n}")
        del names
        # shard the output by size
        shards: list[list[tuple]] = [[]]
        size = 0
        for j in jobs:
            n = torch.empty((), dtype=j[2]).element_size()
            for s in j[3]:
                n *= s
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(j)
            size += n
        pbar = None
        if progress:
            from tqdm.auto import tqdm

            pbar = tqdm(total=len(jobs), desc="streaming prune", unit="tensor")
        with atomic_dir(out, overwrite=overwrite) as tmp:
            weight_map, total = {}, 0
            for k, shard in enumerate(shards):
                fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"

                def produce(shard=shard):
                    for new_name, name, dtype, shape, rule in shard:
                        if isinstance(rule, ExpertRule):  # a stacked [E, R, C] expert tensor: read whole, slice
                            t = reader(files[name]).read_rows(name, None, None, chunk_bytes=chunk_bytes)
                            rule.apply_(t, impl="torch")
                        else:
                            t = reader(files[name]).read_rows(name, rule.rows, rule.cols, chunk_bytes=chunk_bytes)
                            rule.apply_affine_(t)  # Gemma's embedding rescale (the in-place pruner does the same)
                        if pbar is not None:
                            pbar.update(1)
                        yield t
                        del t

                total += write_safetensors_streaming(tmp / fname, [(j[0], j[2], j[3]) for j in shard], produce())
                weight_map.update({j[0]: fname for j in shard})
            if len(shards) > 1:
                (tmp / "model.safetensors.index.json").write_text(json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
            pruned_config(config, plan).save_pretrained(tmp)
            copy_tokenizer_files(src, tmp)
            (tmp / "minitron.json").write_text(json.dumps(rec, indent=2, sort_keys=True, default=str) + "\n")
        if pbar is not None:
            pbar.close()
    finally:
        for r in readers.values():
            r.close()
    return out
