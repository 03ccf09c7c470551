"""Fused linear knowledge-distillation loss (and fused linear cross-entropy) over large vocabularies.

The student's logits ``z_s = h_s @ W_s^T + b_s`` (``[N, V]``) and the teacher's ``z_t`` are never
materialized whole: tokens are processed in chunks of ``chunk_size`` rows, each chunk's logits live
in a few preallocated fp32 ``[chunk, V]`` buffers that are reused for every chunk, the softmax math
runs in fp32 in place, and the gradients for the student hidden states, weight and bias are produced
during the forward pass (accumulated in fp32) and returned, scaled by ``grad_output``, by backward
(as Liger's chunked losses do). Extra memory is O(chunk x V) whatever N is.

Math (per token ``i``; ``T`` is the temperature, ``u = z / T``, ``p = softmax(u)``, ``log`` natural):

- ``forward_kl``: ``KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)`` (the Minitron papers' choice).
- ``reverse_kl``: ``KL(p_s || p_t)``.
- ``jsd`` (generalized, as TRL's GKD and Liger define it): with ``m = beta p_t + (1 - beta) p_s``,
  ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``; ``beta = 0`` is ``forward_kl`` and
  ``beta = 1`` is ``reverse_kl`` (both limits of the formula vanish, so they are special-cased as
  Liger and TRL do).
- The divergence is multiplied by ``T**2`` only when ``t2_scaling=True`` (Hinton et al.'s scaling,
  which keeps gradient magnitudes comparable across temperatures); the default is no scaling.
- ``hard_label_weight = w > 0`` adds ``w * CE(z_s, label)`` computed on the **unscaled** logits
  (temperature 1).
- Tokens whose label is ``ignore_index`` contribute nothing. ``reduction="mean"`` divides the sum
  over valid tokens by their number (0 valid tokens give a loss of 0 and zero gradients, no NaN),
  ``"sum"`` returns the sum, ``"none"`` the per-token losses ``[N]``; ``num_items`` (gradient
  accumulation across micro-batches) replaces the divisor of ``"mean"``.

Gradient w.r.t. the scaled student logits ``u_s`` (divided by ``T`` once more for ``z_s``):
``forward_kl``: ``p_s - p_t``; ``reverse_kl``: ``p_s (log p_s - log p_t - KL)``; ``jsd``:
``(1 - beta) p_s (log p_s - log m - KL(p_s || m))``; CE: ``softmax(z_s) - onehot``.

Row implementations (one resolved per call, ``options.resolve_rows_impl``): ``torch`` (CPU and
CUDA: chunked GEMMs plus in-place fp32 softmax math), ``cpp`` (``csrc/kd_rows.cpp``, CPU) and
``triton`` (CUDA, or the CPU interpreter: the GEMMs stay cuBLAS/torch and the per-chunk softmax,
loss and dlogits run in one Triton kernel, see ``kernels/kd_loss.py``). ``kd_loss_reference`` is
the float64 ground truth the tests use.

The package, one concern per file:
- ``divergences.py``: the divergence registry (torch rows, float64 formulas, kernel codes, impls);
- ``options.py``: argument checks, the per-call config, chunk sizing, the row-impl resolution, and
  ``DeviceReads``, the call's one host read (checks on device values, ``num_items``, chunk counts);
- ``sources.py``: logits from a linear head or given logits, and the mixed-dtype rule;
- ``rows_torch.py`` / ``rows_native.py``: one chunk's rows in torch / in C++ and Triton;
- ``chunks.py``: the chunk layout and loop (softcap, CE term, teacher forms);
- ``autograd.py``: the autograd Functions; ``api.py``: the public functions;
- ``reference.py``: the float64 reference.
"""
from minitron_fast._lazy import exported_names, lazy_getattr

# public names, imported from their modules on first use: the registry (``divergences``) and the
# errors import no torch, so configs that name a divergence stay torch-free
_EXPORTS = {
    "minitron_fast.ops.kd_loss.api": ("KDLossParts", "fused_linear_cross_entropy", "fused_linear_kd_loss",
                                      "kd_loss_from_logits"),
    "minitron_fast.ops.kd_loss.divergences": ("DIVERGENCES", "REGISTRY"),
    "minitron_fast.ops.kd_loss.options": ("KD_IMPLS", "REDUCTIONS", "default_chunk_size", "resolve_rows_impl",
                                          "validate_options"),
    "minitron_fast.errors": ("KDInputError",),
    "minitron_fast.ops.kd_loss.reference": ("kd_loss_reference",),
}
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__all__ = exported_names(_EXPORTS)
