"""``recipe=tiny_qwen3_moe`` end to end under torchrun (2 gloo ranks, a few seconds): the directory of
``tools/make_tiny_model.py`` trains with GRPO, the engine gets every update, ``rollout/logprob_diff``
is logged, and the routers' balance loss acts through the real trainer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.launch import REPO_ROOT, child_env, torchrun

pytestmark = pytest.mark.slow


def test_recipe_runs_and_logs_logprob_diff(tmp_path):
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_tiny_model.py"), "qwen3_moe",
                    str(tmp_path / "outputs" / "tiny_qwen3_moe")], env=child_env(), check=True, capture_output=True,
                   timeout=120)
    run_dir = tmp_path / "run"
    torchrun(["-m", "spmd_rlhf.train", "recipe=tiny_qwen3_moe", f"hydra.run.dir={run_dir}", "logging.progress_bar=false",
              "trainer.total_steps=3", "trainer.batch_size=16", "trainer.mini_batch_size=16", "rollout.n=4",
              "algorithm.use_kl_loss=false"], nproc=2, timeout=300, cwd=tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward/mean" in r]
    assert len(steps) == 3
    # the TorchEngine holds the actor's own fp32 weights after every sync: the gap is float noise
    assert all(0 <= r["rollout/logprob_diff"] < 1e-5 for r in steps), [r["rollout/logprob_diff"] for r in steps]
    assert [r["rollout/weight_version"] for r in steps] == sorted({r["rollout/weight_version"] for r in steps})
    # a random model is rarely right: where every reward is 0 the advantages are 0 and the KL loss is off,
    # so the gradient is the balance loss's alone (the model config's coefficient, 0.001)
    unrewarded = [r for r in steps if r["reward/mean"] == 0]
    assert unrewarded, [r["reward/mean"] for r in steps]
    assert all(r["actor/grad_norm"] > 1e-4 for r in unrewarded), [r["actor/grad_norm"] for r in unrewarded]
