"""GRPO advantages against hand-computed values."""

import torch
from torch.testing import assert_close

from spmd_rlhf.algorithms.advantages import broadcast_to_tokens, grpo_advantages


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
