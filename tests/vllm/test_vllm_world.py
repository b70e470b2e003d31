"""The generation ranks' own vLLM world (``rollout/vllm_world.py``) beside a split topology: 3
ranks on gloo, the last one generating; what vLLM does in that world is mimicked (no vLLM
started), so this is fast. See ``workers/vllm_world_worker.py`` for the checks."""

from __future__ import annotations

from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "vllm" / "workers" / "vllm_world_worker.py"


def test_vllm_world_leaves_the_job_world_alone():
    torchrun([str(WORKER)], 3, timeout=120)
