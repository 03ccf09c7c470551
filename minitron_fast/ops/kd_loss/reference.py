"""The float64 ground truth of the KD loss: materializes ``[N, V]`` and takes each divergence's
definitional formula from the registry (tests and benchmark correctness checks only)."""
from __future__ import annotations

import math

import torch

from minitron_fast.ops.kd_loss.divergences import REGISTRY, canonical


def kd_loss_reference(student_logits, teacher_logits=None, *, teacher_topk=None, labels=None, divergence="forward_kl",
                      beta=0.5, temperature=1.0, ignore_index=-100, hard_label_weight=0.0, reduction="mean",
                      num_items=None, t2_scaling=False, kd_weight=1.0, teacher_topk_tail_lse=None, softcap=None):
    """Straightforward float64 math on full logits ``[N, V]`` (differentiable through autograd).

    ``softcap`` caps both sides' logits (``c tanh(z / c)``, before the temperature; the CE term
    uses the capped student logits). With ``teacher_topk_tail_lse`` both distributions are taken
    over the k + 1 buckets (the teacher's top-k entries and the rest), as ``fused_linear_kd_loss``
    defines them."""
    zs = student_logits.double()
    N, V = zs.shape
    T = float(temperature)

    def cap(z):
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    zs = cap(zs)
    ls = torch.log_softmax(zs / T, -1)
    if teacher_topk is not None:
        vals, idx = teacher_topk
        idx = idx.long()
        vals = cap(vals.double())
        if teacher_topk_tail_lse is not None:
            lt = torch.log_softmax(torch.cat([vals, teacher_topk_tail_lse.double()[:, None]], 1) / T, -1)
            out_mask = torch.ones_like(ls, dtype=torch.bool).scatter(1, idx, False)
            tail_s = torch.logsumexp(torch.where(out_mask, ls, -math.inf), -1, keepdim=True)
            ls = torch.cat([ls.gather(1, idx), tail_s], 1)
        else:
            zt = torch.full((N, V), -math.inf, dtype=torch.float64, device=zs.device).scatter(1, idx, vals)
            lt = torch.log_softmax(zt / T, -1)
    else:
        zt = teacher_logits.double()
        lt = torch.log_softmax(torch.where(torch.isneginf(zt), zt, cap(zt)) / T, -1)
    div = canonical(divergence, float(beta))
    kd = REGISTRY[div].reference(ls, lt, float(beta))
    rows = kd_weight * kd * (T * T if t2_scaling else 1.0)
    valid = torch.ones(N, dtype=torch.bool, device=zs.device) if labels is None else labels != ignore_index
    if hard_label_weight > 0:
        lab = torch.where(valid, labels, 0)
        ce = torch.logsumexp(zs, -1) - zs.gather(1, lab[:, None]).squeeze(1)
        rows = rows + hard_label_weight * ce
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    div_ = float(num_items) if num_items is not None else max(int(valid.sum()), 1)
    return rows.sum() / div_
