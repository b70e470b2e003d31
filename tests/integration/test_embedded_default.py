"""The embedded default, shortened, end to end under torchrun with 2 ranks (gloo)."""

from __future__ import annotations

import json

import pytest

from tests.launch import torchrun

STEPS = 40


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_embedded_default_learns_under_torchrun(tmp_path):
    run_dir = tmp_path / "placed" / "run"
    proc = torchrun(
        ["-m", "spmd_rlhf.train", f"hydra.run.dir={run_dir}", f"trainer.total_steps={STEPS}",
         "logging.progress_bar=false", "trainer.peak_tflops=0.001"],  # a peak for the CPU: perf/mfu/* logged
        nproc=2, timeout=420, cwd=tmp_path,  # not the repository: works from any directory
    )
    records = _records(run_dir / "metrics.jsonl")
    assert (run_dir / ".hydra" / "config.yaml").is_file()

    evals = [r for r in records if "eval/arithmetic/accuracy" in r]
    assert [r["step"] for r in evals] == [0, STEPS], "held-out evaluation before the first and after the last step"
    before, after = (r["eval/arithmetic/accuracy"] for r in evals)
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    assert after >= before + 0.05, f"GRPO did not improve held-out accuracy: {before:.3f} -> {after:.3f}"

    steps = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for prefix in ("rollout/", "actor/", "reward/", "timing/", "perf/"):
        assert any(k.startswith(prefix) for k in steps[0]), f"no {prefix} metrics"
    for key in ("timing/generate", "timing/reshard", "timing/reference", "timing/update", "perf/tokens_per_s"):
        assert steps[-1][key] > 0
    assert steps[-1]["rollout/weight_version"] > steps[0]["rollout/weight_version"], "weights re-synced each step"
    # on-policy GRPO with the k3 loss: the update is the only actor pass, the reference the only logprob pass
    for key in ("perf/mfu/update", "perf/mfu/logprobs", "perf/tokens_per_s_per_gpu"):
        assert all(r[key] > 0 for r in steps), key
    assert all(r["rollout/logprob_diff"] >= 0 for r in steps), "the update measures the engine mismatch itself"

    table = [line for line in proc.stdout.splitlines() if line.startswith("eval/arithmetic/accuracy")]
    assert len(table) == 1, "rank 0 alone prints the before/after table"
    assert f"{before:6.3f}" in table[0] and f"{after:6.3f}" in table[0]
