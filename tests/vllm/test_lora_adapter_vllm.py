"""``model.lora.sync=adapter``: vLLM generating with the actor's adapters loaded from memory gives
the log-probs that the merged weights give, and the actor's (2 ranks, one engine each; see the worker).

Tolerance: every side computes in fp32; the adapter path adds ``s * (x A^T) B^T`` to ``x W^T``
where the merged one computes ``x (W + s B A)^T`` (and PEFT a third order): sums in other orders,
~3e-5 of a log-prob with this model's large logits (weights N(0, 0.3)). 1e-4 is the bound the
engine-vs-actor checks use; adapters the engine did not apply, or a stale adapter, move these
log-probs by more than 1 (the base-model gap, asserted > 1e-2). In bf16 (GPU) the two paths round
differently (B A is not rounded to bf16 on the adapter path): not checked here."""

from __future__ import annotations

import json

import pytest

from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "vllm" / "workers" / "lora_adapter_worker.py"


@pytest.mark.slow
def test_adapter_sync_gives_the_log_probs_of_merged_sync(tmp_path):
    torchrun([str(WORKER), str(tmp_path / "result")], 2, timeout=400, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    first, second = json.loads((tmp_path / "result.json").read_text())
    for round_ in (first, second):
        assert round_["same_tokens"], round_
        assert round_["max_gap"] < 1e-4 and max(round_["actor_gap"]) < 1e-4, round_
        assert round_["base_gap"] > 1e-2, round_  # the adapters are applied
    # the first push loads the base weights and the adapters, every later one the adapters alone
    assert first["pushed_bytes"] == first["base_bytes"] + first["adapter_bytes"]
    assert second["pushed_bytes"] == second["adapter_bytes"]
    assert second["weight_version"] > first["weight_version"]
