"""VLLMEngine's sleep/wake order and its level-2 buffer restore, against a fake vLLM (no vLLM needed).

The real engine is checked on a GPU (tests/gpu); this pins the order the trainer relies on:
wake weights -> sync -> wake KV cache -> generate -> sleep, and that nothing generates from
weights a level-2 sleep discarded.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from spmd_rlhf.rollout import vllm_compat
from spmd_rlhf.rollout.base import SamplingConfig
from spmd_rlhf.rollout.vllm_engine import VLLMEngine
from spmd_rlhf.rollout.vllm_memory import VLLMMemory


class FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("cos_sin_cache", torch.arange(4.0), persistent=False)


class OneRank:
    def size(self) -> int:
        return 1


class OwnWorld:
    """The colocated world: nothing to enter."""

    @contextlib.contextmanager
    def entered(self):
        yield


class FakeLLM:
    def __init__(self, calls: list):
        self.model, self.calls = FakeModel(), calls

    def sleep(self, level):
        self.calls.append(("sleep", level))
        self.model.cos_sin_cache.fill_(float("nan"))  # what discarding device memory looks like

    def wake_up(self, tags):
        self.calls.append(("wake_up", tuple(tags)))


@pytest.fixture
def engine(monkeypatch):
    calls: list = []
    eng = object.__new__(VLLMEngine)  # the state machine only; construction needs vLLM
    eng.llm, eng._memory, eng._world = FakeLLM(calls), VLLMMemory("cpu", 2, enabled=True), OwnWorld()
    eng._weights_loaded, eng.weight_version = False, 0
    eng.wants_full_weights, eng.device, eng.tp_mesh = True, torch.device("cpu"), OneRank()
    eng._image_token, eng._banned = None, []  # a text policy
    monkeypatch.setattr(vllm_compat, "driver_model", lambda llm: llm.model)
    monkeypatch.setattr(vllm_compat, "load_full_weights", lambda llm, weights, device: calls.append(("load",)))
    monkeypatch.setattr(vllm_compat, "reset_prefix_cache", lambda llm: calls.append(("reset_prefix_cache",)))
    return eng, calls


def test_step_order_and_level2_buffers(engine):
    eng, calls = engine
    eng.load_weights([[("w", torch.zeros(1))]])
    eng.sleep()
    assert eng._weights_loaded is False, "level 2 discarded the weights"
    with pytest.raises(RuntimeError, match="no weights"):
        eng.generate([[1, 2]], SamplingConfig(max_new_tokens=2))
    calls.clear()
    eng.wake()
    assert torch.equal(eng.llm.model.cos_sin_cache, torch.arange(4.0)), "buffers restored on waking"
    eng.load_weights([[("w", torch.zeros(1))]])
    assert calls == [("wake_up", ("weights",)), ("load",), ("reset_prefix_cache",)]
    assert "kv_cache" in eng._memory.asleep, "the KV cache wakes only when generating (after any actor offload)"
    assert eng.weight_version == 2 and eng._weights_loaded


def test_level1_keeps_weights_and_cpu_never_sleeps(engine):
    eng, calls = engine
    eng._memory.level = 1
    eng.load_weights([])
    eng.sleep()
    assert eng._weights_loaded and ("sleep", 1) in calls
    eng.wake()
    eng._memory.enabled, eng._memory.asleep = False, set()
    calls.clear()
    eng.sleep()
    eng.wake()
    assert calls == []
