"""DAPO's overlong penalty and the group filters against hand-computed values."""

import pytest
import torch
from torch.testing import assert_close

from spmd_rlhf.algorithms.shaping import group_std, keep_groups, overlong_penalty


def test_overlong_penalty_boundaries():
    # max_len 20, buffer 4 -> free up to 16; factor 0.5:
    #   16 -> 0; 17 -> (16 - 17)/4 * 0.5 = -0.125; 18 -> -0.25; 20 -> (16 - 20)/4 * 0.5 = -0.5
    #   25 -> (16 - 25)/4 * 0.5 = -1.125, floored at -0.5; 0 -> 0
    lengths = torch.tensor([0, 16, 17, 18, 20, 25])
    out = overlong_penalty(lengths, max_len=20, buffer_len=4, penalty_factor=0.5)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]), rtol=0, atol=1e-7)


def test_overlong_penalty_whole_budget_as_buffer():
    # buffer = max_len = 8, factor 1: len/8 below 0: 0 -> 0, 2 -> -0.25, 8 -> -1
    out = overlong_penalty(torch.tensor([0.0, 2.0, 8.0]), max_len=8, buffer_len=8, penalty_factor=1.0)
    assert_close(out, torch.tensor([0.0, -0.25, -1.0]), rtol=0, atol=1e-7)


def test_overlong_penalty_off():
    out = overlong_penalty(torch.tensor([5, 30, 1000]), max_len=20, buffer_len=0, penalty_factor=1.0)
    assert_close(out, torch.zeros(3), rtol=0, atol=0)


@pytest.mark.parametrize("buffer_len, factor, key", [
    (21, 1.0, "algorithm.overlong.buffer_len"),
    (-1, 1.0, "algorithm.overlong.buffer_len"),
    (4, -1.0, "algorithm.overlong.penalty_factor"),
])
def test_overlong_penalty_rejects_bad_settings(buffer_len, factor, key):
    with pytest.raises(ValueError, match=key):
        overlong_penalty(torch.tensor([1]), max_len=20, buffer_len=buffer_len, penalty_factor=factor)


REWARDS = torch.tensor([
    [1.0, 3.0, 1.0, 3.0],  # mean 2, deviations +-1: std 1
    [2.0, 2.0, 2.0, 2.0],  # std 0
    [0.0, 0.0, 0.0, 4.0],  # mean 1, squared deviations 1+1+1+9 = 12, /4 = 3: std sqrt(3) = 1.7320508
])


def test_group_std_is_population_std():
    assert_close(group_std(REWARDS), torch.tensor([1.0, 0.0, 1.7320508]), rtol=0, atol=1e-6)


def test_keep_groups():
    assert keep_groups(REWARDS, 0.0).tolist() == [True, False, True]  # DAPO: drop all-equal groups
    assert keep_groups(REWARDS, 1.0).tolist() == [False, False, True]  # std 1 is not > 1
    assert keep_groups(REWARDS, -1.0).tolist() == [True, True, True]  # negative: keep everything
    assert keep_groups(torch.tensor([[0.5]]), 0.0).tolist() == [False]  # a group of one has no variance


def test_all_equal_group_has_exactly_zero_std():
    # float32 torch.std of eight 0.1s is 7.5e-9, not 0; the filter must still drop the group
    rewards = torch.full((2, 8), 0.1)
    rewards[1, 0] = 0.2
    assert group_std(rewards)[0].item() == 0.0
    assert keep_groups(rewards, 0.0).tolist() == [False, True]
