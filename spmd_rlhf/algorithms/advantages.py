"""Advantage estimators and whitening: GRPO, RLOO, ReMax, REINFORCE++ returns and GAE.

Token layout: ``[B, T]`` rows whose ``mask_BT`` is 1 on ONE contiguous span of response columns
that starts and ends at row-dependent columns. Values at masked columns (even NaN or inf) never
reach a result: every estimator selects with ``torch.where``, never multiplies by the mask.

Outcome-level estimators (one scalar per sequence; ``broadcast_to_tokens`` spreads it):

* GRPO (Shao et al., 2024, "DeepSeekMath", outcome supervision): for the n responses to one
  prompt, ``A_i = (r_i - mean(r)) / (std(r) + eps)`` with the unbiased (n - 1) std, as
  ``torch.std`` in verl. Departures: ``eps`` is added to the std (not inside a sqrt), so an
  all-equal group gets 0 rather than NaN; ``norm_by_std=False`` is the mean-centred advantage of
  Dr. GRPO (Liu et al., 2025); a group of one gets 0 (its unbiased std would be NaN).
* RLOO (Ahmadian et al., 2024, "Back to Basics"): ``A_i = r_i - mean_{j != i} r_j``, the
  leave-one-out baseline, which equals ``n / (n - 1) * (r_i - mean(r))``. A group of one has no
  other sample, so its advantage is 0 (the paper needs n >= 2).
* ReMax (Li et al., 2023): ``A_i = r_i - r(greedy response to the same prompt)``.

Token-level estimators (``token_rewards_BT`` carries the reward of each column, e.g. the outcome
reward at the last response column from ``outcome_token_rewards`` minus a KL penalty):

* REINFORCE++ (Hu, 2025): the discounted reward-to-go ``G_t = r_t + gamma * G_{t+1}`` within a
  row's span (``discounted_returns``), whitened over the batch by the caller (``masked_whiten``).
* GAE (Schulman et al., 2016): ``delta_t = r_t + gamma * V_{t+1} - V_t`` and
  ``A_t = delta_t + gamma * lam * A_{t+1}``; the value after the last response token is 0 (the
  episode ends there); returns ``A_t + V_t`` are the critic's targets. Masked columns are skipped
  (the recursion carries over them), so the span could even contain gaps; no whitening inside.
  Both token-level estimators run without autograd: they produce targets, and a value tensor
  that requires grad must not carry the critic's graph into the policy loss.

Whitening (``masked_whiten``) uses the population variance over valid columns and, when given,
moments already summed over ranks (``masked_moments`` returns them as float64 sums so that a
distributed caller can all-reduce them). verl uses the unbiased variance there; on a batch of
thousands of tokens the two differ by a factor of 1 + 1/(N - 1).
"""

import torch
from torch import Tensor


def _float_dtype(*tensors: Tensor) -> torch.dtype:
    """The promoted dtype of ``tensors``, at least float32 (integer rewards become float32)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


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
    # a group whose rewards are all equal has advantage exactly 0 (in float32 the mean of eight
    # 0.7s is not 0.7, and dividing that residue by std + eps would give about 0.06)
    equal_G1 = (rewards_GN.amax(dim=-1, keepdim=True) == rewards_GN.amin(dim=-1, keepdim=True))
    centred_GN = torch.where(equal_G1, torch.zeros_like(centred_GN), centred_GN)
    if not norm_by_std:
        return centred_GN
    if rewards_GN.shape[-1] == 1:
        return torch.zeros_like(rewards_GN)  # single-sample group: no baseline, advantage 0
    std_G1 = rewards_GN.std(dim=-1, keepdim=True, correction=1)
    return centred_GN / (std_G1 + eps)


def rloo_advantages(rewards_GN: Tensor) -> Tensor:
    """Leave-one-out advantages [G, N]: each reward minus the mean of the other n - 1 of its group."""
    assert rewards_GN.dim() == 2, f"expected [num_groups, n], got {tuple(rewards_GN.shape)}"
    n = rewards_GN.shape[-1]
    if n == 1:
        return torch.zeros_like(rewards_GN)  # no other sample to compare with
    others_mean_GN = (rewards_GN.sum(dim=-1, keepdim=True) - rewards_GN) / (n - 1)
    return rewards_GN - others_mean_GN


def remax_advantages(rewards_GN: Tensor, greedy_rewards_G: Tensor) -> Tensor:
    """ReMax advantages [G, N]: each reward minus the reward of its group's greedy response."""
    assert rewards_GN.dim() == 2 and greedy_rewards_G.shape == rewards_GN.shape[:1], (
        f"rewards {tuple(rewards_GN.shape)} and greedy rewards {tuple(greedy_rewards_G.shape)} disagree")
    return rewards_GN - greedy_rewards_G[:, None]


def broadcast_to_tokens(adv_B: Tensor, mask_BT: Tensor) -> Tensor:
    """Give every valid token of sequence b the advantage adv_B[b]; padding gets 0."""
    assert adv_B.dim() == 1 and mask_BT.dim() == 2 and adv_B.shape[0] == mask_BT.shape[0]
    return adv_B[:, None] * mask_BT.to(adv_B.dtype)


def outcome_token_rewards(rewards_B: Tensor, mask_BT: Tensor) -> Tensor:
    """[B, T]: rewards_B[b] at the last valid column of row b, 0 elsewhere (and on rows without one)."""
    assert rewards_B.dim() == 1 and mask_BT.dim() == 2 and rewards_B.shape[0] == mask_BT.shape[0]
    cols_T = torch.arange(mask_BT.shape[1], device=mask_BT.device)
    last_B = torch.where(mask_BT.bool(), cols_T, -1).amax(dim=-1)  # -1 on a row without a valid column
    is_last_BT = cols_T[None, :] == last_B[:, None]
    return torch.where(is_last_BT, rewards_B[:, None].to(_float_dtype(rewards_B)), 0.0)


@torch.no_grad()
def gae_advantages(token_rewards_BT: Tensor, values_BT: Tensor, mask_BT: Tensor, gamma: float,
                   lam: float) -> tuple[Tensor, Tensor]:
    """GAE over each row's response columns: (advantages_BT, returns_BT), both 0 at padding.

    The recursion runs from the last column to the first; at a masked column it carries the next
    valid column's value and advantage unchanged, and nothing follows the last valid column, so
    the bootstrap value there is 0.
    """
    assert token_rewards_BT.shape == values_BT.shape == mask_BT.shape and mask_BT.dim() == 2
    dtype = _float_dtype(token_rewards_BT, values_BT)
    valid_BT = mask_BT.bool()
    rewards_BT = torch.where(valid_BT, token_rewards_BT.to(dtype), 0.0)
    values_BT = torch.where(valid_BT, values_BT.to(dtype), 0.0)
    next_value_B = values_BT.new_zeros(values_BT.shape[0])
    next_adv_B = values_BT.new_zeros(values_BT.shape[0])
    columns = []
    for t in reversed(range(values_BT.shape[1])):
        valid_B = valid_BT[:, t]
        delta_B = rewards_BT[:, t] + gamma * next_value_B - values_BT[:, t]
        adv_B = delta_B + gamma * lam * next_adv_B
        next_value_B = torch.where(valid_B, values_BT[:, t], next_value_B)
        next_adv_B = torch.where(valid_B, adv_B, next_adv_B)
        columns.append(torch.where(valid_B, adv_B, 0.0))
    advantages_BT = torch.stack(columns[::-1], dim=1)
    returns_BT = torch.where(valid_BT, advantages_BT + values_BT, 0.0)
    return advantages_BT, returns_BT


def discounted_returns(token_rewards_BT: Tensor, mask_BT: Tensor, gamma: float) -> Tensor:
    """Reward-to-go [B, T] within each row's span: G_t = r_t + gamma * G_{t+1}; 0 at padding.

    This is GAE with values 0 and lam = 1 (every TD error is then the reward itself)."""
    advantages_BT, _ = gae_advantages(token_rewards_BT, torch.zeros_like(token_rewards_BT), mask_BT, gamma, 1.0)
    return advantages_BT


def masked_moments(values_BT: Tensor, mask_BT: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(sum, sum of squares, count) of the valid values, as detached 0-dim float64 tensors.

    Sums add across ranks: all-reduce them (SUM) and pass them to ``masked_whiten`` to whiten
    with the global mean and variance."""
    assert values_BT.shape == mask_BT.shape
    valid_BT = mask_BT.bool()
    x_BT = torch.where(valid_BT, values_BT.detach().double(), 0.0)
    return x_BT.sum(), x_BT.square().sum(), valid_BT.sum().double()


def masked_whiten(values_BT: Tensor, mask_BT: Tensor, moments: tuple[Tensor, Tensor, Tensor] | None = None,
                  shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) on valid columns, 0 at padding; same dtype as ``values_BT``.

    ``moments`` are ``masked_moments`` outputs, possibly summed over ranks; without them the local
    batch's are used. ``var`` is the population variance. ``shift_mean=False`` adds the mean back
    (the scale is normalised, the location kept), as verl does for GAE advantages it does not
    want centred."""
    assert values_BT.shape == mask_BT.shape
    if moments is None:
        moments = masked_moments(values_BT, mask_BT)
    total, total_sq, count = (m.to(device=values_BT.device, dtype=torch.float64) for m in moments)
    count = count.clamp(min=1.0)
    mean = total / count
    var = (total_sq / count - mean.square()).clamp(min=0.0)
    whitened_BT = (values_BT.double() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened_BT = whitened_BT + mean
    return torch.where(mask_BT.bool(), whitened_BT, 0.0).to(values_BT.dtype)
