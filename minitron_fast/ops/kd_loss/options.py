"""Options of the KD loss: validation (one-line errors), the per-call configuration, chunk sizing,
and the one row implementation a call runs (``resolve_rows_impl``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from minitron_fast.errors import KDInputError
from minitron_fast.ops._dispatch import resolve_impl
from minitron_fast.ops.kd_loss.divergences import REGISTRY
from minitron_fast.ops.kd_loss.params import REDUCTIONS, KDLossOptions, check_softcap  # noqa: F401  (re-exported)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# Default chunk: about 576 MB for all fp32 [chunk, V] buffers of a call (the torch forward-KL
# path uses 3 of them: 384 rows at V=128,256; the C++ row kernel 2: 576 rows), a multiple of 64
# rows in [64, 1024]. Fewer, larger chunks make the chunk GEMMs more efficient.
_WORKSPACE_BYTES = 576 * 2**20


# row implementations; which one runs a call is resolved once, up front (resolve_rows_impl)
KD_IMPLS = ("triton", "cpp", "torch")


def default_chunk_size(V: int, N: int, n_buffers: int = 3) -> int:
    """Rows per chunk: ``_WORKSPACE_BYTES / (n_buffers 4 V)`` rounded down to a multiple of 64, in
    [64, 1024], at most N."""
    c = max(64, min(1024, (_WORKSPACE_BYTES // (n_buffers * 4 * max(V, 1))) // 64 * 64))
    return max(1, min(c, N))


def _n_buffers(cfg, teacher_kind, need_ce) -> int:
    """How many ``[chunk, V]`` fp32 buffers ``run`` fills per chunk: the C++ rows need only the
    student's and a dense teacher's logits (CE alone works in place)."""
    if cfg.impl == "cpp":  # the student's (and a dense teacher's) logits, + the CE gradient's buffer
        if cfg.divergence is None:
            return 1
        return (1 if teacher_kind == "topk" else 2) + (1 if need_ce else 0)
    return 3


@dataclass(frozen=True)
class _Cfg:
    divergence: Optional[str]  # None: cross-entropy only
    beta: float
    temperature: float
    t2_scaling: bool
    hard_label_weight: float
    ignore_index: int
    chunk_size: int
    impl: str  # the one row implementation of this call: "torch", "cpp" or "triton"
    softcap: Optional[float] = None
    dtype: Optional[torch.dtype] = None  # the student head's GEMM dtype (sources.compute_dtype)
    teacher_dtype: Optional[torch.dtype] = None  # the teacher head's

    @property
    def kd_scale(self) -> float:
        return self.temperature ** 2 if self.t2_scaling else 1.0


def _check_float(name: str, t: torch.Tensor, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise KDInputError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if dim and t.dim() != dim:
        raise KDInputError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_common(divergence, beta, temperature, reduction, num_items, hard_label_weight, chunk_size):
    KDLossOptions(divergence=divergence, beta=beta, temperature=temperature, reduction=reduction,
                  hard_label_weight=hard_label_weight, chunk_size=chunk_size).validate()
    _check_num_items(num_items)


def validate_options(divergence="forward_kl", beta=0.5, temperature=1.0, reduction="mean",
                     hard_label_weight=0.0, chunk_size=None, softcap=None) -> None:
    """Checks loss options without tensors (``KDLossOptions.validate``, the one definition): raises
    a one-line ``KDInputError`` naming the option. The divergences are the registry's."""
    KDLossOptions(divergence=divergence, beta=beta, temperature=temperature, reduction=reduction,
                  hard_label_weight=hard_label_weight, chunk_size=chunk_size, softcap=softcap).validate()


def _check_num_items(num_items):
    """A number is checked here; a tensor's value (often on the device) is checked when the call's
    ``DeviceReads`` reads it."""
    if num_items is None:
        return
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1 or num_items.dtype == torch.bool or num_items.is_complex():
            raise KDInputError(f"num_items must be a positive number or a one-element real tensor, got a "
                               f"{num_items.dtype} tensor of shape {tuple(num_items.shape)}")
        return
    _check_items_value(num_items)


def _check_items_value(v) -> float:
    v = float(v)
    if not v > 0:
        raise KDInputError(f"num_items must be positive, got {v}")
    return v


class DeviceReads:
    """Everything one call of the loss must learn about its (device) tensors on the host, read in
    **one** transfer: the input checks whose outcome is a tensor (labels inside the vocabulary,
    top-k indices inside it), a tensor ``num_items``, and the valid-token count of each chunk
    (``chunks.layout``: which chunks hold only ignored tokens, and the divisor of ``"mean"``).

    Each read of a device tensor (``.item()``, ``bool()``, ``int()``, ``.tolist()``) stalls the host
    until the device has drained its queue. Read one by one, the checks, the valid count (twice) and
    each chunk's "any token valid?" made 25-30 stalls per micro-batch at real sizes (issue 23). The
    checks are queued as the arguments are checked (``check``) and raised, first queued first, when
    the forward reads them together with the counts (``read``); a failed check's message, which may
    read the device again, is built only then.
    """

    def __init__(self):
        self._checks = []  # (bad: 0-dim bool tensor, True when the input is bad; message: () -> str)

    def check(self, bad, message):
        self._checks.append((bad, message))

    def read(self, counts=None, num_items=None):
        """The call's one host read. Raises the first failed check (and a ``num_items`` that is not
        positive) as ``KDInputError``; returns ``(counts, num_items)`` as a list of ints (or None)
        and a float (or None).

        ``counts``: ``[n_chunks]`` int64 valid tokens per chunk, or None (no labels);
        ``num_items``: None, a number or a one-element tensor (on any device)."""
        items = num_items
        parts = [bad.reshape(1) for bad, _ in self._checks]
        if counts is not None:
            parts.append(counts.reshape(-1))
        if isinstance(num_items, torch.Tensor):
            if parts and num_items.is_cpu and not parts[0].is_cpu:
                # host memory: reading it waits for no device (a blocking copy of it to the device
                # would synchronize the stream)
                items = num_items.item()
            else:
                parts.append(num_items.reshape(1))
        if parts:
            # float64 holds the flags, the counts (< 2**53) and num_items (any dtype) exactly
            host = torch.cat([p.to(parts[0].device, torch.float64) for p in parts]).tolist()
            for (_, message), flag in zip(self._checks, host):
                if flag:
                    raise KDInputError(message())
            if counts is not None:
                n = len(self._checks)
                counts = [int(x) for x in host[n:n + counts.numel()]]
            if isinstance(items, torch.Tensor):
                items = host[-1]
        return counts, None if items is None else _check_items_value(items)


def _check_labels(labels, N, V, ignore_index, device, reads):
    """Labels as int64 ``[N]``; the range check is queued on ``reads`` (``DeviceReads``)."""
    if labels is None:
        return None
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise KDInputError(f"labels must be an integer tensor, got {labels.dtype}")
    labels = labels.reshape(-1)
    if labels.numel() != N:
        raise KDInputError(f"labels has {labels.numel()} entries, expected one per token ({N})")
    if labels.device != device:
        raise KDInputError(f"labels is on {labels.device}, the hidden states on {device}")
    labels = labels.long()
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    reads.check(bad.any(), lambda: f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}; found "
                                   f"{int(labels[bad][0])}")
    return labels


def _divisor(reduction, num_items, n_valid):
    """The divisor of the loss (a host number): ``num_items`` (as ``DeviceReads.read`` returned it)
    for ``"mean"`` when given, else the valid-token count."""
    if reduction == "sum" or reduction == "none":
        return 1.0
    if num_items is not None:
        return float(num_items)
    return float(max(n_valid, 1))  # 0 valid tokens: the sum is 0, so is the mean


def _cpp_fn(name):
    """``minitron_fast._C.<name>``, or None when the extension is missing or predates it."""
    from minitron_fast._ext import _C

    return getattr(_C, name, None) if _C is not None else None


def _supported(divergence, form) -> tuple[str, ...]:
    """Row implementations that can run ``divergence`` (None: CE only) with a teacher of ``form``,
    from the registry (its ``impls`` and the ``_C`` symbol of its C++ rows), the built extension
    and what triton can run here."""
    if divergence is None:
        impls, symbol = ("torch", "cpp"), "ce_rows"
    else:
        d = REGISTRY[divergence]
        impls, symbol = d.impls[form], d.cpp.get(form)
    if "cpp" in impls and (symbol is None or _cpp_fn(symbol) is None):
        impls = tuple(i for i in impls if i != "cpp")  # a _C built before these rows existed
    return impls


def resolve_rows_impl(impl, t, *, op, divergence, teacher_kind) -> str:
    """The one row implementation a call runs; never a silent fallback.

    ``"auto"``: Triton on CUDA tensors, the C++ rows on CPU tensors, each when it supports the
    options, else torch. An explicit ``impl`` that cannot run the options raises a one-line
    error naming the ones that can."""
    form = None if divergence is None else ("topk" if teacher_kind == "topk" else "dense")
    supported = _supported(divergence, form)
    if impl == "auto":
        prefer = "triton" if t.is_cuda else "cpp"
        choice = resolve_impl("auto", t, op=op, choices=KD_IMPLS)
        return prefer if prefer in supported and choice == prefer else "torch"
    resolved = resolve_impl(impl, t, op=op, choices=KD_IMPLS)
    if resolved not in supported:
        what = ("cross-entropy" if divergence is None else
                f"divergence={divergence!r} with a {'top-k' if form == 'topk' else 'dense'} teacher")
        raise KDInputError(f"{op}: impl={impl!r} cannot run {what}; the implementations that can: "
                           f"{', '.join(repr(i) for i in supported + ('auto',))}")
    return resolved
