"""Reward shaping and group filters of DAPO (Yu et al., 2025, "DAPO: An Open-Source LLM
Reinforcement Learning System at Scale").

* ``overlong_penalty``: DAPO's soft overlong punishment with L_max = ``max_len`` and
  L_cache = ``buffer_len``, scaled by ``penalty_factor``:

      0                                            if len <= L_max - L_cache
      ((L_max - L_cache) - len) / L_cache * factor if L_max - L_cache < len <= L_max
      -factor                                      if len > L_max

  The paper adds it to the rule reward; the caller does the same.
* ``keep_groups``: DAPO's dynamic-sampling filter keeps the groups whose rewards are not all equal
  (their GRPO advantages would all be 0). We generalise it to "population std > min_std", which is
  also the reward-variance filter; ``min_std=0`` is DAPO's filter. A group of one has std 0 and is
  dropped (its advantage is 0 under every group estimator here).

Departure: an all-equal group's std is exactly 0 here. Computed naively it need not be: in float32
``torch.std`` of eight copies of 0.1 is 7.5e-9, which would keep a group DAPO drops.
"""

import torch
from torch import Tensor


def overlong_penalty(lengths_B: Tensor, max_len: int, buffer_len: int, penalty_factor: float) -> Tensor:
    """Per-response penalty [B] (<= 0, float) for response lengths ``lengths_B``; 0 when ``buffer_len`` is 0."""
    if not 0 <= buffer_len <= max_len:
        raise ValueError(f"algorithm.overlong.buffer_len={buffer_len} must be in [0, rollout.max_new_tokens="
                         f"{max_len}]; set it to a part of the generation budget, or 0 to turn the penalty off")
    if penalty_factor < 0:
        raise ValueError(f"algorithm.overlong.penalty_factor={penalty_factor} must be >= 0; it is the penalty's size")
    lengths_B = lengths_B.to(torch.promote_types(lengths_B.dtype, torch.float32))
    if buffer_len == 0:
        return torch.zeros_like(lengths_B)
    expected_len = max_len - buffer_len
    penalty_B = (expected_len - lengths_B) / buffer_len * penalty_factor
    return penalty_B.clamp(min=-penalty_factor, max=0.0)


def _group_std_f64(rewards_GN: Tensor) -> Tensor:
    assert rewards_GN.dim() == 2 and rewards_GN.shape[1] > 0, f"expected [num_groups, n], got {tuple(rewards_GN.shape)}"
    rewards_GN = rewards_GN.double()
    std_G = rewards_GN.std(dim=-1, correction=0)
    all_equal_G = rewards_GN.amax(dim=-1) == rewards_GN.amin(dim=-1)
    return torch.where(all_equal_G, 0.0, std_G)


def group_std(rewards_GN: Tensor) -> Tensor:
    """Population standard deviation [G] of each group's rewards; exactly 0 for an all-equal group."""
    return _group_std_f64(rewards_GN).to(torch.promote_types(rewards_GN.dtype, torch.float32))


def keep_groups(rewards_GN: Tensor, min_std: float) -> Tensor:
    """[G] bool: True for the groups whose population reward std is > ``min_std`` (compared in
    float64). ``min_std=0`` drops exactly the all-equal groups; a negative one keeps every group."""
    return _group_std_f64(rewards_GN) > min_std
