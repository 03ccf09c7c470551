"""The divergence registry is the only source of divergence facts: a torch-only divergence added
in one file (here written to a temporary module and imported) is taken by the fused loss (dense
and top-k teachers, float64 as the judge, gradients included), refused by the native rows in one
line, and accepted by the trainer's config and the KD step, with nothing else changed. Reading
a config that names a divergence imports no torch."""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest
import torch

from minitron_fast.ops.kd_loss import divergences
from tests import ROOT

PLUGIN = textwrap.dedent('''
    """Symmetric KL, KL(p_t || p_s) + KL(p_s || p_t): a torch-only divergence in one file."""
    from minitron_fast.ops.kd_loss.divergences import REGISTRY, Divergence, register


    def rows(ls, lt, beta):
        kf, gf = REGISTRY["forward_kl"].rows(ls, lt, beta)
        kr, gr = REGISTRY["reverse_kl"].rows(ls, lt, beta)
        return kf + kr, gf + gr


    def reference(ls, lt, beta):
        return REGISTRY["forward_kl"].reference(ls, lt, beta) + REGISTRY["reverse_kl"].reference(ls, lt, beta)


    register(Divergence("sym_kl", None, "KL(p_t || p_s) + KL(p_s || p_t)", rows, reference,
                        {"dense": ("torch",), "topk": ("torch",)}, needs_teacher_support=True))
''')


@pytest.fixture
def sym_kl(tmp_path, monkeypatch):
    """Imports the one-file plugin; the registry (one dict, shared by every module that reads it)
    loses the divergence again when the test ends."""
    (tmp_path / "sym_kl_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("sym_kl_plugin", None)
    try:
        importlib.import_module("sym_kl_plugin")
        yield "sym_kl"
    finally:
        divergences.REGISTRY.pop("sym_kl", None)
        sys.modules.pop("sym_kl_plugin", None)


def _problem(seed=0, N=23, H=16, V=37):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=g, dtype=torch.float64)
    ws = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    ht = torch.randn(N, H, generator=g, dtype=torch.float64)
    wt = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = -100
    return hs, ws, ht, wt, labels


def test_a_torch_only_divergence_in_one_file_runs_everywhere(sym_kl):
    from minitron_fast.distill.config import load_config
    from minitron_fast.errors import KDInputError
    from minitron_fast.ops.kd_step import KDLossOptions, KDSpec
    from minitron_fast.ops.kd_loss import fused_linear_kd_loss, kd_loss_reference

    assert sym_kl in divergences.names()
    hs, ws, ht, wt, labels = _problem()
    h = hs.float().requires_grad_(True)
    w = ws.float().requires_grad_(True)
    for impl in ("torch", "auto"):  # auto resolves to the torch rows: the only ones that run it
        h.grad = w.grad = None
        got = fused_linear_kd_loss(h, w, ht.float(), wt.float(), labels=labels, divergence=sym_kl, temperature=2.0,
                                   impl=impl, chunk_size=8)
        got.backward()
        h64, w64 = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        ref = kd_loss_reference(h64 @ w64.T, ht @ wt.T, labels=labels, divergence=sym_kl, temperature=2.0)
        ref.backward()
        assert abs(float(got) - float(ref)) <= 1e-5 * abs(float(ref)), (impl, float(got), float(ref))
        for a, b in ((h.grad, h64.grad), (w.grad, w64.grad)):
            assert float((a.double() - b).abs().max() / b.abs().max()) <= 1e-5
    # its forward plus reverse KL parts, each from the registry, add up
    parts = sum(float(fused_linear_kd_loss(hs.float(), ws.float(), ht.float(), wt.float(), labels=labels,
                                           divergence=d, temperature=2.0, impl="torch"))
                for d in ("forward_kl", "reverse_kl"))
    assert abs(parts - float(ref)) <= 1e-5 * abs(float(ref))
    # a top-k teacher with its tail bucket; without the tail it is refused (needs_teacher_support)
    zt = ht.float() @ wt.float().T
    vals, idx = zt.topk(37, dim=-1)
    full_k = fused_linear_kd_loss(hs.float(), ws.float(), teacher_topk=(vals, idx), labels=labels, divergence=sym_kl,
                                  teacher_topk_tail_lse=torch.full((23,), -float("inf")), impl="torch")
    dense = fused_linear_kd_loss(hs.float(), ws.float(), teacher_logits=zt, labels=labels, divergence=sym_kl,
                                 impl="torch")
    assert abs(float(full_k) - float(dense)) <= 1e-5 * abs(float(dense))
    with pytest.raises(KDInputError, match="needs teacher_topk_tail_lse"):
        fused_linear_kd_loss(hs.float(), ws.float(), teacher_topk=(vals[:, :5], idx[:, :5]), labels=labels,
                             divergence=sym_kl)
    with pytest.raises(KDInputError, match=r"impl='cpp' cannot run divergence='sym_kl'.*'torch', 'auto'"):
        fused_linear_kd_loss(hs.float(), ws.float(), ht.float(), wt.float(), labels=labels, divergence=sym_kl,
                             impl="cpp")
    # the trainer's config and the KD step take it, with no list of names anywhere else
    assert load_config(None, ["teacher=t", "student=s", f"loss.divergence={sym_kl}"]).loss.divergence == sym_kl
    assert KDSpec(loss=KDLossOptions(divergence=sym_kl)).loss.divergence == sym_kl


def test_register_refuses_what_the_kernels_could_not_run():
    d = divergences.REGISTRY["jsd"]
    with pytest.raises(ValueError, match="registered already"):
        divergences.register(d)
    from dataclasses import replace

    with pytest.raises(ValueError, match="names native rows"):
        divergences.register(replace(d, name="x", code=None))
    with pytest.raises(ValueError, match="kernel code 2 is taken"):
        divergences.register(replace(d, name="y"))
    assert "x" not in divergences.REGISTRY and "y" not in divergences.REGISTRY


def test_reading_configs_and_recipes_imports_no_torch():
    code = ("import sys\n"
            "from minitron_fast.distill.config import load_config\n"
            "load_config(None, ['teacher=t', 'student=s', 'loss.divergence=jsd'])\n"
            "from minitron_fast.pipeline.recipe import load_recipe\n"
            "load_recipe('demo')\n"
            "import minitron_fast.ops.kd_loss\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr
