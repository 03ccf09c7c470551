"""Loading on CUDA, checked on the CPU: the attention kernel a dtype can run, and devices that
are not there (GPU-path defects: flash-attention chosen for fp32 models; ``cuda:N`` past the
device count)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from minitron_fast.errors import MinitronError
from minitron_fast.models import loading


@pytest.fixture
def cuda_with_flash_attn(monkeypatch):
    """Makes this a machine with 2 CUDA devices and flash-attn installed, as far as loading can
    tell (call it after building models: transformers would then look for flash-attn too)."""
    def enable():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    return enable


@pytest.mark.parametrize("dtype,want", [
    (None, "sdpa"), (torch.float32, "sdpa"), ("float32", "sdpa"),
    (torch.bfloat16, "flash_attention_2"), ("float16", "flash_attention_2"),
])
def test_flash_attention_is_the_default_only_for_half_models(cuda_with_flash_attn, tiny_builders, dtype, want):
    config = tiny_builders["llama"]().config
    cuda_with_flash_attn()
    assert loading.default_attn_implementation("cuda", config, dtype) == want
    assert loading.default_attn_implementation("cpu", config, dtype) == "sdpa"


def test_flash_attention_with_fp32_is_refused_in_one_line_before_loading(tiny_builders, tmp_path, monkeypatch):
    m = tiny_builders["llama"]()
    m.save_pretrained(tmp_path / "m")
    opened = []
    monkeypatch.setattr(loading, "check_tensor_shapes", lambda *a, **k: opened.append(a))
    with pytest.raises(MinitronError) as e:
        loading.load_model(tmp_path / "m", dtype=torch.float32, attn_implementation="flash_attention_2")
    msg = str(e.value)
    assert "\n" not in msg and "bfloat16" in msg and "sdpa" in msg and "float32" in msg
    assert not opened  # refused before the checkpoint is read
    loading.check_attn_dtype("flash_attention_2", torch.bfloat16)  # half precision passes
    loading.check_attn_dtype("sdpa", torch.float32)


def test_a_cuda_index_past_the_device_count_names_the_devices(cuda_with_flash_attn):
    from minitron_fast.configtools import DeviceConfig, OptionError

    cuda_with_flash_attn()
    with pytest.raises(MinitronError) as e:
        loading.check_device("cuda:3")
    assert "cuda:0, cuda:1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(OptionError) as e:
        DeviceConfig(device="cuda:2").resolved_device("prune.")
    assert "prune.device=cuda:2" in str(e.value) and "2 CUDA devices (cuda:0, cuda:1)" in str(e.value)
