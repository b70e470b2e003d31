"""Advantage estimators and whitening against hand-computed values and against each other."""

import torch
from torch.testing import assert_close

from spmd_rlhf.algorithms.advantages import (
    broadcast_to_tokens,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    masked_moments,
    masked_whiten,
    outcome_token_rewards,
    remax_advantages,
    rloo_advantages,
)


def test_grpo_normalised_by_unbiased_std():
    # group [5,1,1,1]: mean 2, centred [3,-1,-1,-1], unbiased var (9+1+1+1)/3 = 4, std 2
    #   -> [1.5, -0.5, -0.5, -0.5]
    # group [1,1,1,5]: mirror image -> [-0.5, -0.5, -0.5, 1.5]
    # group [2,2,2,2]: centred 0 everywhere, std 0 -> 0 / (0 + eps) = 0 (no NaN)
    rewards = torch.tensor([[5.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 5.0], [2.0, 2.0, 2.0, 2.0]])
    expected = torch.tensor([[1.5, -0.5, -0.5, -0.5], [-0.5, -0.5, -0.5, 1.5], [0.0, 0.0, 0.0, 0.0]])
    assert_close(grpo_advantages(rewards, eps=0.0)[:2], expected[:2], rtol=0, atol=1e-6)
    assert_close(grpo_advantages(rewards), expected, rtol=0, atol=1e-6)


def test_grpo_eps_is_added_to_std():
    # [5,1,1,1], std 2: 3 / (2 + 1e-6) = 1.49999925000037..., -1 / (2 + 1e-6) = -0.49999975000012...
    rewards = torch.tensor([[5.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([[1.4999992500003750, -0.4999997500001250, -0.4999997500001250, -0.4999997500001250]],
                            dtype=torch.float64)
    assert_close(grpo_advantages(rewards, eps=1e-6), expected, rtol=0, atol=1e-12)


def test_grpo_without_std_is_mean_centred():
    rewards = torch.tensor([[5.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    # means 2 and 0.5
    expected = torch.tensor([[3.0, -1.0, -1.0, -1.0], [-0.5, 0.5, -0.5, 0.5]])
    assert_close(grpo_advantages(rewards, norm_by_std=False), expected, rtol=0, atol=1e-6)


def test_grpo_group_of_one_gets_zero():
    rewards = torch.tensor([[0.7], [3.0]])
    expected = torch.zeros(2, 1)
    assert_close(grpo_advantages(rewards), expected, rtol=0, atol=0)
    assert_close(grpo_advantages(rewards, norm_by_std=False), expected, rtol=0, atol=0)


def test_broadcast_to_tokens_zeroes_padding():
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    expected = torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, 0.0]])
    assert_close(broadcast_to_tokens(adv, mask), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- token batch with shifted spans
#
# B=4, T=6; responses start at different columns and end at different columns:
#   row 0: columns 1..3   row 1: columns 2..5 (to the last column)   row 2: column 4 only
#   row 3: no response column
SPAN_MASK = torch.tensor([
    [0, 1, 1, 1, 0, 0],
    [0, 0, 1, 1, 1, 1],
    [0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 0],
], dtype=torch.float32)
# token rewards and values on the valid columns (the 0s below are overwritten with padding garbage)
SPAN_REWARDS = torch.tensor([
    [0.0, 1.0, 0.0, 2.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 4.0],
    [0.0, 0.0, 0.0, 0.0, 3.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
])
SPAN_VALUES = torch.tensor([
    [0.0, 1.0, 2.0, 4.0, 0.0, 0.0],
    [0.0, 0.0, 2.0, 2.0, 2.0, 2.0],
    [0.0, 0.0, 0.0, 0.0, 1.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
])
GARBAGE = (float("nan"), float("inf"), -1e6)


def padded(x: torch.Tensor, mask: torch.Tensor, fill: float) -> torch.Tensor:
    """x on the valid columns, ``fill`` everywhere else."""
    return torch.where(mask.bool(), x, fill)


def random_spans(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A [rows, cols] mask with one contiguous span per row at a random start and length (possibly empty)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, cols)
    for b in range(rows):
        start = int(torch.randint(0, cols, (1,), generator=g))
        length = int(torch.randint(0 if b == 0 else 1, cols - start + 1, (1,), generator=g))
        mask[b, start : start + length] = 1.0
    return mask


def test_outcome_token_rewards_at_last_valid_column():
    # row 0 ends at column 3, row 1 at column 5, row 2 at column 4; row 3 has none
    rewards = torch.tensor([2.0, -1.0, 0.5, 7.0])
    expected = torch.tensor([
        [0.0, 0.0, 0.0, 2.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, -1.0],
        [0.0, 0.0, 0.0, 0.0, 0.5, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ])
    assert_close(outcome_token_rewards(rewards, SPAN_MASK), expected, rtol=0, atol=0)
    assert_close(outcome_token_rewards(rewards, SPAN_MASK.bool()), expected, rtol=0, atol=0)
    # integer rewards come back as float
    assert outcome_token_rewards(torch.tensor([1, 0, 1, 1]), SPAN_MASK).dtype == torch.float32


def test_gae_by_hand():
    # gamma = 0.5, lam = 0.5 (gamma * lam = 0.25); the value after each row's last column is 0.
    # row 0, columns 1..3: r = [1, 0, 2], V = [1, 2, 4]
    #   col 3: delta = 2 + 0.5*0 - 4 = -2            A = -2
    #   col 2: delta = 0 + 0.5*4 - 2 = 0             A = 0 + 0.25*(-2) = -0.5
    #   col 1: delta = 1 + 0.5*2 - 1 = 1             A = 1 + 0.25*(-0.5) = 0.875
    #   returns A + V = [1.875, 1.5, 2]
    # row 1, columns 2..5: r = [0, 0, 0, 4], V = [2, 2, 2, 2]
    #   col 5: delta = 4 - 2 = 2                     A = 2
    #   col 4: delta = 0 + 0.5*2 - 2 = -1            A = -1 + 0.25*2 = -0.5
    #   col 3: delta = -1                            A = -1 + 0.25*(-0.5) = -1.125
    #   col 2: delta = -1                            A = -1 + 0.25*(-1.125) = -1.28125
    #   returns = [0.71875, 0.875, 1.5, 4]
    # row 2, column 4: r = 3, V = 1: A = 3 - 1 = 2, return 3. Row 3: nothing.
    expected_adv = torch.tensor([
        [0.0, 0.875, -0.5, -2.0, 0.0, 0.0],
        [0.0, 0.0, -1.28125, -1.125, -0.5, 2.0],
        [0.0, 0.0, 0.0, 0.0, 2.0, 0.0],
        [0.0] * 6,
    ])
    expected_ret = torch.tensor([
        [0.0, 1.875, 1.5, 2.0, 0.0, 0.0],
        [0.0, 0.0, 0.71875, 0.875, 1.5, 4.0],
        [0.0, 0.0, 0.0, 0.0, 3.0, 0.0],
        [0.0] * 6,
    ])
    for fill in (0.0,) + GARBAGE:
        adv, ret = gae_advantages(padded(SPAN_REWARDS, SPAN_MASK, fill), padded(SPAN_VALUES, SPAN_MASK, fill),
                                  SPAN_MASK, gamma=0.5, lam=0.5)
        assert_close(adv, expected_adv, rtol=0, atol=1e-6)
        assert_close(ret, expected_ret, rtol=0, atol=1e-6)


def test_gae_carries_no_graph():
    values = SPAN_VALUES.clone().requires_grad_(True)
    adv, ret = gae_advantages(SPAN_REWARDS, values, SPAN_MASK, 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


def test_discounted_returns_by_hand():
    # gamma = 0.5, G_t = r_t + 0.5 * G_{t+1} within the span:
    #   row 0 r = [1, 0, 2]:    G = [1 + 0.5*1, 0 + 0.5*2, 2] = [1.5, 1, 2]
    #   row 1 r = [0, 0, 0, 4]: G = [0.5, 1, 2, 4]
    #   row 2 r = [3]:          G = [3]
    expected = torch.tensor([
        [0.0, 1.5, 1.0, 2.0, 0.0, 0.0],
        [0.0, 0.0, 0.5, 1.0, 2.0, 4.0],
        [0.0, 0.0, 0.0, 0.0, 3.0, 0.0],
        [0.0] * 6,
    ])
    for fill in (0.0,) + GARBAGE:
        out = discounted_returns(padded(SPAN_REWARDS, SPAN_MASK, fill), SPAN_MASK, gamma=0.5)
        assert_close(out, expected, rtol=0, atol=1e-6)


def test_gae_lam1_gamma1_is_reward_to_go_minus_values():
    # reward-to-go computed independently: reversed cumulative sum of the masked rewards (the span
    # is contiguous, so every column after the span adds 0)
    mask = random_spans(6, 10, seed=1)
    g = torch.Generator().manual_seed(2)
    rewards = padded(torch.randn(6, 10, generator=g, dtype=torch.float64), mask, float("nan"))
    values = padded(torch.randn(6, 10, generator=g, dtype=torch.float64), mask, float("nan"))
    clean = torch.where(mask.bool(), rewards, 0.0)
    to_go = clean.flip(-1).cumsum(-1).flip(-1)
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(adv, torch.where(mask.bool(), to_go - values, 0.0), rtol=0, atol=1e-12)
    assert_close(ret, torch.where(mask.bool(), to_go, 0.0), rtol=0, atol=1e-12)
    assert_close(discounted_returns(rewards, mask, 1.0), torch.where(mask.bool(), to_go, 0.0), rtol=0, atol=1e-12)


def test_gae_lam0_is_one_step_td_error():
    # delta_t = r_t + gamma * V_{t+1} - V_t, with V_{t+1} = 0 when column t+1 is not in the span
    mask = random_spans(6, 10, seed=3)
    g = torch.Generator().manual_seed(4)
    rewards = padded(torch.randn(6, 10, generator=g, dtype=torch.float64), mask, float("nan"))
    values = padded(torch.randn(6, 10, generator=g, dtype=torch.float64), mask, float("nan"))
    clean_v = torch.where(mask.bool(), values, 0.0)
    next_v = torch.cat([clean_v[:, 1:], torch.zeros(6, 1, dtype=torch.float64)], dim=1)
    td = torch.where(mask.bool(), rewards + 0.9 * next_v - values, 0.0)
    adv, _ = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.0)
    assert_close(adv, td, rtol=0, atol=1e-12)


def test_reinforce_pp_outcome_returns_with_gamma1_are_the_outcome_reward():
    mask = random_spans(6, 10, seed=5)
    rewards = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.25, 3.0])
    returns = discounted_returns(outcome_token_rewards(rewards, mask), mask, gamma=1.0)
    assert_close(returns, rewards[:, None] * mask, rtol=0, atol=0)


def test_rloo_by_hand():
    # [5, 1, 1, 1]: for 5 the others' mean is 3/3 = 1 -> 4; for a 1 it is (5+1+1)/3 = 7/3 -> 1 - 7/3 = -4/3
    # [0, 1, 0, 1]: for a 0 the others' mean is 2/3 -> -2/3; for a 1 it is 1/3 -> 2/3
    rewards = torch.tensor([[5.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([[4.0, -4 / 3, -4 / 3, -4 / 3], [-2 / 3, 2 / 3, -2 / 3, 2 / 3]], dtype=torch.float64)
    assert_close(rloo_advantages(rewards), expected, rtol=0, atol=1e-12)
    assert_close(rloo_advantages(torch.tensor([[0.7], [3.0]])), torch.zeros(2, 1), rtol=0, atol=0)


def test_rloo_baseline_excludes_the_sample():
    g = torch.Generator().manual_seed(6)
    rewards = torch.randn(3, 5, generator=g, dtype=torch.float64)
    n = rewards.shape[1]
    # explicit leave-one-out mean
    loo = torch.stack([torch.cat([rewards[:, :i], rewards[:, i + 1 :]], dim=1).mean(dim=1) for i in range(n)], dim=1)
    adv = rloo_advantages(rewards)
    assert_close(adv, rewards - loo, rtol=0, atol=1e-12)
    # = n/(n-1) times the mean-centred advantage
    assert_close(adv, n / (n - 1) * grpo_advantages(rewards, norm_by_std=False), rtol=0, atol=1e-12)
    # raising r_0 by d raises A_0 by exactly d (its own reward is not in its baseline)
    # and lowers every other A_j of the group by d/(n-1)
    bumped = rewards.clone()
    bumped[0, 0] += 2.0
    delta = rloo_advantages(bumped) - adv
    assert_close(delta[0], torch.tensor([2.0] + [-0.5] * 4, dtype=torch.float64), rtol=0, atol=1e-12)
    assert_close(delta[1:], torch.zeros(2, 5, dtype=torch.float64), rtol=0, atol=0)


def test_remax_subtracts_the_greedy_reward():
    # group 0 greedy 0.5: [1, 0, 0.5] -> [0.5, -0.5, 0]; group 1 greedy 2: [2, 3, -1] -> [0, 1, -3]
    rewards = torch.tensor([[1.0, 0.0, 0.5], [2.0, 3.0, -1.0]])
    expected = torch.tensor([[0.5, -0.5, 0.0], [0.0, 1.0, -3.0]])
    assert_close(remax_advantages(rewards, torch.tensor([0.5, 2.0])), expected, rtol=0, atol=0)


# whitening: valid values 2, 4, 4, 4, 5, 5, 7, 9 spread over the shifted spans
WHITEN_VALUES = torch.tensor([
    [0.0, 2.0, 4.0, 4.0, 0.0, 0.0],
    [0.0, 0.0, 4.0, 5.0, 5.0, 7.0],
    [0.0, 0.0, 0.0, 0.0, 9.0, 0.0],
    [0.0] * 6,
])


def test_masked_moments_by_hand():
    # sum 2+4+4+4+5+5+7+9 = 40; squares 4+16+16+16+25+25+49+81 = 232; count 8
    for fill in GARBAGE:
        total, total_sq, count = masked_moments(padded(WHITEN_VALUES, SPAN_MASK, fill), SPAN_MASK)
        for got, want in ((total, 40.0), (total_sq, 232.0), (count, 8.0)):
            assert got.dtype == torch.float64 and got.dim() == 0
            assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=0)


def test_masked_whiten_by_hand():
    # mean 40/8 = 5, population var 232/8 - 25 = 4, std 2: (x - 5)/2
    #   row 0 [2, 4, 4] -> [-1.5, -0.5, -0.5]; row 1 [4, 5, 5, 7] -> [-0.5, 0, 0, 1]; row 2 [9] -> [2]
    # (eps = 1e-8 changes the std by 2*(sqrt(1 + 2.5e-9) - 1) ~ 2.5e-9: below the tolerance)
    expected = torch.tensor([
        [0.0, -1.5, -0.5, -0.5, 0.0, 0.0],
        [0.0, 0.0, -0.5, 0.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, 0.0, 2.0, 0.0],
        [0.0] * 6,
    ])
    # shift_mean=False adds the mean 5 back on valid columns
    expected_unshifted = torch.where(SPAN_MASK.bool(), expected + 5.0, 0.0)
    for fill in GARBAGE:
        values = padded(WHITEN_VALUES, SPAN_MASK, fill)
        assert_close(masked_whiten(values, SPAN_MASK), expected, rtol=0, atol=1e-6)
        assert_close(masked_whiten(values, SPAN_MASK, shift_mean=False), expected_unshifted, rtol=0, atol=1e-6)


def test_masked_whiten_with_given_moments():
    # global moments of a larger batch: count 10, mean 4, var 16 -> sum 40, sum_sq 10*(16 + 4^2) = 320
    # (x - 4)/4: row 0 [2, 4, 4] -> [-0.5, 0, 0]; row 1 [4, 5, 5, 7] -> [0, 0.25, 0.25, 0.75]; row 2 [9] -> [1.25]
    moments = (torch.tensor(40.0, dtype=torch.float64), torch.tensor(320.0, dtype=torch.float64),
               torch.tensor(10.0, dtype=torch.float64))
    expected = torch.tensor([
        [0.0, -0.5, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.25, 0.25, 0.75],
        [0.0, 0.0, 0.0, 0.0, 1.25, 0.0],
        [0.0] * 6,
    ])
    assert_close(masked_whiten(WHITEN_VALUES, SPAN_MASK, moments=moments, eps=0.0), expected, rtol=0, atol=1e-6)


def test_summed_moments_whiten_like_the_whole_batch():
    # two "ranks" holding rows 0-1 and rows 2-3: summed moments give the whole batch's whitening
    values = padded(WHITEN_VALUES, SPAN_MASK, float("nan"))
    parts = [(values[:2], SPAN_MASK[:2]), (values[2:], SPAN_MASK[2:])]
    summed = tuple(sum(ms) for ms in zip(*(masked_moments(v, m) for v, m in parts)))
    whole = masked_whiten(values, SPAN_MASK)
    split = torch.cat([masked_whiten(v, m, moments=summed) for v, m in parts])
    assert_close(split, whole, rtol=0, atol=1e-7)
    # whereas the local moments of one part alone give something else
    assert (masked_whiten(*parts[0]) - whole[:2]).abs().max() > 0.1


def test_masked_whiten_all_padding_is_zero():
    out = masked_whiten(torch.full((2, 3), float("nan")), torch.zeros(2, 3))
    assert_close(out, torch.zeros(2, 3), rtol=0, atol=0)


def test_grpo_equal_group_gets_exactly_zero_in_float32() -> None:
    # mean of eight float32 0.7s differs from 0.7 by ~6e-8; the advantage must still be exactly 0
    rewards_GN = torch.full((1, 8), 0.7, dtype=torch.float32)
    assert torch.equal(grpo_advantages(rewards_GN), torch.zeros(1, 8))
    assert torch.equal(grpo_advantages(rewards_GN, norm_by_std=False), torch.zeros(1, 8))
