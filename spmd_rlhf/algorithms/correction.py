"""Rollout correction: the engine/actor log-prob mismatch and truncated importance sampling.

The rollout engine samples with its own numerics (bf16 kernels, another attention), so the
trainer's log-prob of a sampled token differs from the engine's. Truncated importance sampling
(Yao et al., 2025, "Your efficient RL framework secretly brings you off-policy RL training")
re-weights each token's policy loss by

    w_t = min(exp(old_t - engine_t), cap)        (detached; 0 off the mask)

where ``old_t`` is the trainer's log-prob before the update and ``engine_t`` the engine's. The
mismatch is reported as the mean and max of |old_t - engine_t| over sampled tokens. Everything
here is a tensor function: no host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def truncated_is_weights(old_BT: Tensor, engine_BT: Tensor, mask_BT: Tensor, cap: float) -> Tensor:
    """``min(exp(old - engine), cap)`` at masked tokens, 0 elsewhere, detached."""
    assert cap > 0, "a cap of 0 means no correction: do not ask for weights"
    mask = mask_BT.bool()
    log_ratio_BT = torch.where(mask, old_BT - engine_BT, 0.0).clamp(max=20.0)
    return torch.exp(log_ratio_BT).clamp(max=cap).masked_fill(~mask, 0.0).detach()


def mismatch_sums(old_BT: Tensor, engine_BT: Tensor, mask_BT: Tensor) -> dict[str, Tensor]:
    """Sum (``rollout/logprob_diff``, to be divided by the token count) and max
    (``rollout/logprob_diff/max``) of |old - engine| over masked tokens, as 0-dim tensors."""
    diff_BT = torch.where(mask_BT.bool(), (old_BT - engine_BT).abs(), 0.0).detach()
    return {"rollout/logprob_diff": diff_BT.sum(),
            "rollout/logprob_diff/max": diff_BT.amax() if diff_BT.numel() else diff_BT.sum()}
