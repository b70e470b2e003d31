"""PPO with a critic and three critic-free variants learn on the embedded default, 2 ranks.

Each run is ``torchrun --nproc-per-node 2 -m spmd_rlhf.train algorithm=NAME`` with the embedded
default shortened to STEPS GRPO-family steps (the warm start is unchanged). Held-out accuracy
(greedy, 256 problems) must rise by at least 10 points. Full-length figures for every algorithm
are in BENCHMARKS.md (``tools/bench_embedded.py --algorithms ...``).
"""

from __future__ import annotations

import json

import pytest

from tests.launch import torchrun

STEPS = 100
pytestmark = pytest.mark.slow


def _evals(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records, [r for r in records if "eval/arithmetic/accuracy" in r]


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "dapo", "reinforce_pp"])
def test_algorithm_learns(tmp_path, algorithm):
    run_dir = tmp_path / algorithm
    torchrun(["-m", "spmd_rlhf.train", f"algorithm={algorithm}", f"hydra.run.dir={run_dir}",
              f"trainer.total_steps={STEPS}", "logging.progress_bar=false"], nproc=2, timeout=420)
    records, evals = _evals(run_dir)
    before, after = evals[0]["eval/arithmetic/accuracy"], evals[-1]["eval/arithmetic/accuracy"]
    assert after >= before + 0.10, f"{algorithm}: held-out accuracy {before:.3f} -> {after:.3f}"
    steps = [r for r in records if "actor/pg_loss" in r]
    assert len(steps) == STEPS
    if algorithm == "ppo":
        assert all("critic/vf_loss" in r for r in steps)
        # the zero-initialised head starts at V = 0; a learning critic's mean value follows the returns
        gap = [abs(r["critic/values_mean"] - r["critic/returns_mean"]) for r in steps]
        assert sum(gap[-10:]) / 10 < 0.5 * gap[0], f"the critic does not follow its returns: {gap[0]:.3f} -> {gap[-10:]}"
    if algorithm == "dapo":
        assert all(r["rollout/dynamic_sampling/rounds"] >= 1 for r in steps)
        assert any(r["rollout/dynamic_sampling/rounds"] > 1 for r in steps), "no group was ever dropped"
    if algorithm in ("rloo", "reinforce_pp", "ppo"):
        assert all("actor/kl_coef" in r and "actor/kl_loss" not in r for r in steps), "KL in the reward only"
