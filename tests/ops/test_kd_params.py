"""``KDLossOptions``, the one definition of the KD loss's options: ``fused_linear_kd_loss``'s
option keywords are its fields with its defaults (so the two cannot drift), the other entry points
take a subset with the same defaults, the module is built on it, and one call takes one spelling."""
from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

from minitron_fast.errors import KDInputError
from minitron_fast.losses import FusedLinearKDLoss
from minitron_fast.ops.kd_loss import fused_linear_cross_entropy, fused_linear_kd_loss, kd_loss_from_logits
from minitron_fast.ops.kd_loss.params import DEFAULTS, OPTION_NAMES, KDLossOptions
from tests import ROOT


def _defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if n in OPTION_NAMES}


def test_the_functional_api_is_the_dataclass():
    assert _defaults(fused_linear_kd_loss) == {n: getattr(DEFAULTS, n) for n in OPTION_NAMES}
    for fn in (kd_loss_from_logits, fused_linear_cross_entropy):  # subsets, the same defaults
        d = _defaults(fn)
        assert d and d == {n: getattr(DEFAULTS, n) for n in d}, fn.__name__


def test_options_and_keywords_give_the_same_loss_and_one_spelling_per_call():
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(9, 8, generator=g), torch.randn(13, 8, generator=g)
    th, tW = torch.randn(9, 6, generator=g), torch.randn(13, 6, generator=g)
    y = torch.randint(0, 13, (9,), generator=g)
    opts = KDLossOptions(divergence="jsd", beta=0.3, temperature=2.0, hard_label_weight=0.5, chunk_size=4)
    a = fused_linear_kd_loss(h, W, th, tW, labels=y, options=opts)
    b = fused_linear_kd_loss(h, W, th, tW, labels=y, **opts.as_kwargs())
    c = FusedLinearKDLoss(options=opts)(h, W, th, tW, labels=y)
    d = FusedLinearKDLoss("jsd", beta=0.3, temperature=2.0, hard_label_weight=0.5, chunk_size=4)(h, W, th, tW, labels=y)
    assert float(a) == float(b) == float(c) == float(d)
    with pytest.raises(KDInputError, match=r"either as options= or as keywords, not both \(temperature"):
        fused_linear_kd_loss(h, W, th, tW, labels=y, options=opts, temperature=3.0)


def test_the_module_reads_and_fixes_its_options():
    fn = FusedLinearKDLoss("reverse_kl", temperature=2.0)
    assert fn.options == KDLossOptions(divergence="reverse_kl", temperature=2.0)
    assert (fn.divergence, fn.temperature, fn.beta) == ("reverse_kl", 2.0, 0.5)
    with pytest.raises(AttributeError, match="fixed at construction"):
        fn.temperature = 3.0
    with pytest.raises(KDInputError, match="beta must lie in"):
        FusedLinearKDLoss("jsd", beta=2.0)
    with pytest.raises(TypeError, match="unknown options \\['temprature'\\]"):
        FusedLinearKDLoss(temprature=2.0)


def test_the_dataclass_imports_no_torch():
    code = ("import sys\nfrom minitron_fast.ops.kd_loss.params import KDLossOptions\n"
            "KDLossOptions(divergence='jsd').validate()\nprint('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_the_kd_step_spec_holds_the_options_and_leaves_the_steps_own_to_the_step():
    """``KDSpec.loss`` is a ``KDLossOptions``; the fields the step sets (``STEP_SETS``) and the models'
    facts (``MODEL_FACTS``) are its fields; one the step sets, given, is refused naming why."""
    from minitron_fast.ops.kd_spec import MODEL_FACTS, STEP_SETS, KDSetupError, KDSpec

    assert set(STEP_SETS) | set(MODEL_FACTS) <= set(OPTION_NAMES)
    assert KDSpec().loss == DEFAULTS
    spec = KDSpec(lm_weight=0.5, loss=KDLossOptions(impl="torch", t2_scaling=True, softcap=30.0))
    assert spec.lm_only().loss == spec.loss and (spec.lm_only().kd_weight, spec.lm_only().lm_weight) == (0.0, 1.0)
    with pytest.raises(KDSetupError, match=r"^KDSpec\.loss\.reduction='sum': the step sums over valid tokens"):
        KDSpec(loss=KDLossOptions(reduction="sum"))
    with pytest.raises(KDSetupError, match=r"^KDSpec\.loss\.hard_label_weight=0\.5: .*set lm_weight"):
        KDSpec(loss=KDLossOptions(hard_label_weight=0.5))
    with pytest.raises(KDSetupError, match=r"^KDSpec\.loss: impl='fused' is not one of"):
        KDSpec(loss=KDLossOptions(impl="fused"))
    with pytest.raises(KDSetupError, match="must be a KDLossOptions"):
        KDSpec(loss={"temperature": 2.0})


def test_the_spec_module_imports_no_torch():
    code = ("import sys\nfrom minitron_fast.ops.kd_spec import KDSpec\nKDSpec()\nprint('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
