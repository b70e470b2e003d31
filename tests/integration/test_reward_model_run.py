"""A trained reward model in the loop: rule + model rewards by weight, and a critic from its weights."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.launch import REPO_ROOT, torchrun

pytestmark = pytest.mark.slow


def _train_rm(out_dir):
    spec = importlib.util.spec_from_file_location("train_reward_model", REPO_ROOT / "tools" / "train_reward_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.train_reward_model(str(out_dir), steps=150, seed=0)


def test_reward_model_scores_in_training_and_initialises_the_critic(tmp_path):
    rm_dir = tmp_path / "rm"
    _train_rm(rm_dir)
    run_dir = tmp_path / "run"
    torchrun(["-m", "spmd_rlhf.train", "algorithm=ppo", f"hydra.run.dir={run_dir}", "trainer.total_steps=3",
              "trainer.sft.steps=50", "data.arithmetic.num_val=16", "logging.progress_bar=false",
              f"reward.model.path={rm_dir}", "reward.model.weight=0.5", "reward.rule_weight=1.0",
              f"critic.init_from={rm_dir}"], nproc=2, timeout=300)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "actor/pg_loss" in r]
    assert len(steps) == 3
    for r in steps:
        # reward = 1.0 * rule + 0.5 * model score (means over every rank's samples)
        assert r["rollout/reward"] == pytest.approx(r["reward/mean"] + 0.5 * r["reward/model_score"], abs=1e-5)
        assert r["reward/model_score"] != 0.0
    # a critic from the reward model starts from its (non-zero) scores, not from a zero head
    assert abs(steps[0]["critic/values_mean"]) > 1e-3
