"""Engine/actor logprob mismatch and truncated importance sampling weights (hand-computed)."""

from __future__ import annotations

import math

import torch

from spmd_rlhf.data.batch import collate, response_tensor
from spmd_rlhf.trainer.experience import rollout_correction


def test_mismatch_and_tis_weights_by_hand():
    # two rows: prompt [5, 6] + response of 2 tokens; prompt [7] + response of 3 tokens
    batch = collate([[5, 6], [7]], [[1, 2], [3, 4, 0]], pad_id=0)
    engine = response_tensor([[-1.0, -2.0], [-0.5, -0.1, -3.0]], batch, [2, 1])
    old = torch.full_like(batch.loss_mask_BT, 99.0)  # padding: must be ignored
    old[0, 1:3] = torch.tensor([-1.5, -1.0])  # diffs 0.5, 1.0; log-ratios -0.5, +1.0
    old[1, 0:3] = torch.tensor([-0.5, -0.4, -1.0])  # diffs 0, 0.3, 2.0; log-ratios 0, -0.3, +2.0
    weights, metrics = rollout_correction(old, engine, batch.loss_mask_BT, tis_cap=2.0)
    assert math.isclose(metrics["rollout/logprob_diff"], (0.5 + 1.0 + 0.0 + 0.3 + 2.0) / 5, rel_tol=1e-6)
    assert math.isclose(metrics["rollout/logprob_diff/max"], 2.0, rel_tol=1e-6)
    expected = torch.zeros_like(old)
    expected[0, 1:3] = torch.tensor([math.exp(-0.5), 2.0])  # e^1 = 2.72 capped at 2
    expected[1, 0:3] = torch.tensor([1.0, math.exp(-0.3), 2.0])
    torch.testing.assert_close(weights, expected)
    assert not weights.requires_grad
    assert math.isclose(metrics["rollout/tis_weight"], float(expected[batch.loss_mask_BT.bool()].mean()), rel_tol=1e-6)


def test_tis_off_returns_no_weights():
    batch = collate([[5]], [[1]], pad_id=0)
    lp = response_tensor([[-0.25]], batch, [1])
    weights, metrics = rollout_correction(lp, lp, batch.loss_mask_BT, tis_cap=0.0)
    assert weights is None
    assert metrics == {"rollout/logprob_diff": 0.0, "rollout/logprob_diff/max": 0.0}
