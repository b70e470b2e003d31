"""The tiny Qwen3-MoE under FSDP2 on 1 and 2 gloo ranks (``workers/moe_worker.py``): experts
sharded, both weight syncs bit-identical, TorchEngine logprobs exact (also expert-parallel at
tp = 2), and one GRPO step that moves the experts and routers and lands on the same weights on 1
and 2 ranks up to float summation order."""

from __future__ import annotations

import pytest
import torch

from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "moe_worker.py"
CHECKS = ["experts_sharded", "syncs_identical", "engine_logprobs", "grpo_step"]
CHECKS_2 = CHECKS[:3] + ["expert_parallel"] + CHECKS[3:]
RTOL, ATOL = 1e-5, 1e-6
MOVED = 1e-4  # AdamW at lr 1e-3 moves every weight with a gradient by about 1e-3

pytestmark = pytest.mark.slow


def run(tmp_path, nproc: int) -> dict:
    path = tmp_path / f"world{nproc}.pt"
    torchrun([str(WORKER), str(path)], nproc, timeout=240)
    result = torch.load(path)
    assert result["world"] == nproc and result["passed"] == (CHECKS_2 if nproc == 2 else CHECKS)
    return result


def test_moe_step_is_the_same_on_one_and_two_ranks(tmp_path):
    one, two = run(tmp_path, 1), run(tmp_path, 2)
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                 "model.layers.0.mlp.gate.weight", "lm_head.weight"):
        moved = (two["weights"][name] - two["initial"][name]).abs().max()
        assert moved > MOVED, f"{name} did not move ({moved})"
    for name, weight in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], weight, rtol=RTOL, atol=ATOL, msg=name)
    for key in ("actor/grad_norm", "actor/pg_loss"):
        assert abs(one["metrics"][key] - two["metrics"][key]) <= 1e-4 * max(1.0, abs(one["metrics"][key])), key
    assert one["metrics"]["actor/grad_norm"] > 0
    assert 0 <= two["metrics"]["rollout/logprob_diff"] < 1e-5  # same weights in the engine: float noise only
