"""``recipe=tiny_qwen2_5_vl`` end to end under torchrun (2 gloo ranks, a few seconds): the built-in shapes
task's images go through the TorchEngine's prefill and the actor's forward on the directory of
``tools/make_tiny_model.py qwen2_5_vl``; GRPO steps complete, rewards and held-out metrics are logged,
the engine gets every update, and ``rollout/logprob_diff`` is float noise."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.launch import REPO_ROOT, child_env, torchrun

pytestmark = pytest.mark.slow


# colocated (both ranks train and generate), and split (one training rank, one generation rank: the
# generation rank's engine reads the images of its own copy of the prompts)
PLACEMENTS = {"colocate": [], "split": ["distributed.placement=split", "distributed.generation_ranks=1"]}


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_recipe_runs_with_images_and_logs_logprob_diff(tmp_path, placement):
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_tiny_model.py"), "qwen2_5_vl",
                    str(tmp_path / "outputs" / "tiny_qwen2_5_vl")], env=child_env(), check=True, capture_output=True,
                   timeout=120)
    run_dir = tmp_path / "run"
    torchrun(["-m", "spmd_rlhf.train", "recipe=tiny_qwen2_5_vl", f"hydra.run.dir={run_dir}",
              "logging.progress_bar=false",
              "trainer.total_steps=3", "trainer.batch_size=16", "trainer.mini_batch_size=16", "rollout.n=4",
              "data.shapes.num_train=64", "data.shapes.num_val=16", *PLACEMENTS[placement]], nproc=2, timeout=300,
             cwd=tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward/mean" in r]
    assert len(steps) == 3
    assert all(0.0 <= r["reward/mean"] <= 1.0 and r["rollout/response_length/max"] <= 2 for r in steps)
    # the TorchEngine holds the actor's own fp32 weights after every sync, and reads the same pixels and
    # M-RoPE positions as the actor's forward: the gap is float noise
    assert all(0 <= r["rollout/logprob_diff"] < 1e-5 for r in steps), [r["rollout/logprob_diff"] for r in steps]
    assert [r["rollout/weight_version"] for r in steps] == sorted({r["rollout/weight_version"] for r in steps})
    evals = [r for r in records if "eval/shapes/accuracy" in r]
    assert len(evals) == 2 and all(r["eval/examples"] == 16 for r in evals)  # before and after
