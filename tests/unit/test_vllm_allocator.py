"""Expandable segments are switched off around vLLM engine calls on CUDA and restored after."""

import torch

from spmd_rlhf.rollout import vllm_compat


def _record(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    return calls


def test_toggled_around_the_call_when_expandable_segments_are_on(monkeypatch):
    calls = _record(monkeypatch)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512,expandable_segments:True")
    with vllm_compat.vllm_allocator("cuda"):
        assert calls == ["expandable_segments:False"]
    assert calls == ["expandable_segments:False", "expandable_segments:True"]


def test_restored_even_when_the_call_raises(monkeypatch):
    calls = _record(monkeypatch)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        with vllm_compat.vllm_allocator("cuda"):
            raise RuntimeError("engine failed")
    except RuntimeError:
        pass
    assert calls[-1] == "expandable_segments:True"


def test_untouched_on_cpu_or_without_expandable_segments(monkeypatch):
    calls = _record(monkeypatch)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with vllm_compat.vllm_allocator("cpu"):
        pass
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    with vllm_compat.vllm_allocator("cuda"):
        pass
    assert calls == []
