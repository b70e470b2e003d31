"""GRPO advantages: group-normalised, outcome-level (one scalar per sequence).

Implements the advantage of GRPO (Shao et al., 2024, "DeepSeekMath", outcome
supervision): for the n responses sampled from one prompt,

    A_i = (r_i - mean(r)) / (std(r) + eps)

and every token of response i gets A_i. ``std`` is the unbiased (Bessel-
corrected, n - 1) standard deviation, as ``torch.std`` in verl.

Departures from the paper:
  * ``eps`` is added to the std (not inside a sqrt), so a group whose rewards
    are all equal gets advantage 0 rather than NaN.
  * ``norm_by_std=False`` gives the mean-centred advantage of Dr. GRPO
    (Liu et al., 2025), which drops the division by std.
  * A group of size 1 has no baseline other than its own reward, so its
    advantage is 0 (the unbiased std would be NaN; we never compute it).
"""

import torch
from torch import Tensor


def grpo_advantages(rewards_GN: Tensor, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-normalised advantages.

    Args:
        rewards_GN: [num_groups, n] scalar reward of each sample; row g holds the
            n responses to prompt g.
        norm_by_std: divide the centred reward by (group std + eps).
        eps: added to the std before dividing.

    Returns:
        [num_groups, n] one advantage per sample (sequence-level); the caller
        broadcasts it over the response tokens with ``broadcast_to_tokens``.
    """
    assert rewards_GN.dim() == 2, f"expected [num_groups, n], got {tuple(rewards_GN.shape)}"
    centred_GN = rewards_GN - rewards_GN.mean(dim=-1, keepdim=True)
    if not norm_by_std:
        return centred_GN
    if rewards_GN.shape[-1] == 1:
        return torch.zeros_like(rewards_GN)  # single-sample group: no baseline, advantage 0
    std_G1 = rewards_GN.std(dim=-1, keepdim=True, correction=1)
    return centred_GN / (std_G1 + eps)


def broadcast_to_tokens(adv_B: Tensor, mask_BT: Tensor) -> Tensor:
    """Give every valid token of sequence b the advantage adv_B[b]; padding gets 0."""
    assert adv_B.dim() == 1 and mask_BT.dim() == 2 and adv_B.shape[0] == mask_BT.shape[0]
    return adv_B[:, None] * mask_BT.to(adv_B.dtype)
