"""From rewards to advantages for the configured estimator (``algorithm.adv_estimator``).

The estimators themselves are pure functions in ``algorithms/advantages.py``; this module picks
one, feeds it this rank's tensors and does the one distributed part: whitening over the GLOBAL
batch (moments all-reduced), so that 1, 2 or 4 ranks whiten identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algorithms.advantages import (
    broadcast_to_tokens,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    masked_moments,
    masked_whiten,
    remax_advantages,
    rloo_advantages,
)
from ..config import AlgorithmConfig
from ..distributed.comm import all_reduce_floats


@dataclass
class Advantages:
    advantages_BT: torch.Tensor
    returns_BT: torch.Tensor | None = None  # critic targets (gae only)


def global_whiten(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """``masked_whiten`` with mean and variance over every rank's valid tokens."""
    moments = all_reduce_floats([float(m) for m in masked_moments(values_BT, mask_BT)])
    return masked_whiten(values_BT, mask_BT, moments=tuple(torch.tensor(m, dtype=torch.float64) for m in moments))


def compute_advantages(algo: AlgorithmConfig, token_rewards_BT: torch.Tensor, mask_BT: torch.Tensor, n: int,
                       values_BT: torch.Tensor | None = None,
                       greedy_rewards_G: torch.Tensor | None = None) -> Advantages:
    """Advantages ``[B, T]`` (0 off the response) for this rank's rollout.

    ``token_rewards_BT`` holds the outcome reward at each response's last token, minus the KL
    penalty at every token when KL is in the reward. Outcome estimators (grpo, rloo, remax,
    reinforce_pp_baseline) use its per-sequence sum; token estimators (gae, reinforce_pp) use it
    as is.
    """
    estimator = algo.adv_estimator
    seq_rewards_GN = token_rewards_BT.sum(dim=-1).view(-1, n)
    if estimator == "gae":
        assert values_BT is not None, "gae needs the critic's values"
        adv_BT, returns_BT = gae_advantages(token_rewards_BT, values_BT, mask_BT, algo.gamma, algo.lam)
        if algo.whiten_advantages:
            adv_BT = global_whiten(adv_BT, mask_BT)
        return Advantages(adv_BT, returns_BT)
    if estimator == "reinforce_pp":
        adv_BT = discounted_returns(token_rewards_BT, mask_BT, algo.gamma)
        return Advantages(global_whiten(adv_BT, mask_BT) if algo.whiten_advantages else adv_BT)
    if estimator == "grpo":
        adv_GN = grpo_advantages(seq_rewards_GN, algo.norm_adv_by_std)
    elif estimator == "rloo":
        adv_GN = rloo_advantages(seq_rewards_GN)
    elif estimator == "remax":
        assert greedy_rewards_G is not None, "remax needs the greedy responses' rewards"
        adv_GN = remax_advantages(seq_rewards_GN, greedy_rewards_G)
    elif estimator == "reinforce_pp_baseline":
        adv_GN = grpo_advantages(seq_rewards_GN, norm_by_std=False)
    else:
        raise AssertionError(f"unknown estimator {estimator!r} (validated in config)")
    adv_BT = broadcast_to_tokens(adv_GN.reshape(-1), mask_BT)
    if estimator == "reinforce_pp_baseline" and algo.whiten_advantages:
        adv_BT = global_whiten(adv_BT, mask_BT)
    return Advantages(adv_BT)
