"""VLLMEngine under torchrun (2 ranks, gloo, CPU): against TorchEngine and the FSDP actor.

See ``workers/vllm_engine_worker.py`` for what each check proves. One vLLM engine per process
(vLLM's parallel groups are process-global), so tp=1 and tp=2 are separate launches.
"""

from __future__ import annotations

import json

import pytest

from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "vllm" / "workers" / "vllm_engine_worker.py"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
CHECKS = ["repacked", "greedy_equals_torch", "eos_stops", "sampling"]


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_engine_matches_torch_engine_and_actor(tmp_path, tp):
    torchrun([str(WORKER), str(tmp_path / "result"), str(tp)], 2, timeout=400, env=ENV)
    expected = CHECKS + (["replicas_independent"] if tp == 1 else []) + ["logprobs_after_update"]
    for rank in range(2):
        result = json.loads((tmp_path / f"result.rank{rank}.json").read_text())
        assert result["passed"] == expected
