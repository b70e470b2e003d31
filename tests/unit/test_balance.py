"""Token balancing of groups over training ranks: hand-worked deals, and the invariants on random ones."""

from __future__ import annotations

import random

import pytest

from spmd_rlhf.data.balance import balanced_bins, deal_mini_batches


def test_longest_first_into_the_lightest_bin() -> None:
    # order 5(0) 4(2) 3(4) 3(5) 2(3) 1(1): 0->b0, 2->b1, 4->b1 (4<5), 5->b0 (5<7), 3->b1 (7<8), 1->b0
    assert balanced_bins([5, 1, 4, 2, 3, 3], 2) == [[0, 1, 5], [2, 3, 4]]


def test_equal_counts_close_a_full_bin() -> None:
    # 10 -> b0; the three 1s would all go to b1, but b1 is full after two
    assert balanced_bins([10, 1, 1, 1], 2, equal_counts=True) == [[0, 3], [1, 2]]
    assert balanced_bins([10, 1, 1, 1], 2, equal_counts=False) == [[0], [1, 2, 3]]


def test_ties_go_to_the_lower_index() -> None:
    assert balanced_bins([2, 2, 2, 2], 2) == [[0, 2], [1, 3]]
    assert balanced_bins([0, 0, 0], 3) == [[0], [1], [2]]
    assert balanced_bins([3, 7, 3, 7], 2) == [[0, 1], [2, 3]]  # 7(1)->b0, 7(3)->b1, 3(0)->b0, 3(2)->b1


def test_one_bin_holds_everything() -> None:
    assert balanced_bins([4, 9, 1], 1) == [[0, 1, 2]]


def test_counts_must_divide() -> None:
    with pytest.raises(AssertionError):
        balanced_bins([1, 2, 3], 2)


@pytest.mark.parametrize("seed", range(20))
def test_random_deals_cover_every_index_once_with_equal_counts(seed: int) -> None:
    rng = random.Random(seed)
    bins = rng.choice([1, 2, 3, 4])
    weights = [rng.randint(1, 500) for _ in range(bins * rng.randint(1, 6))]
    dealt = balanced_bins(weights, bins)
    assert sorted(i for b in dealt for i in b) == list(range(len(weights)))
    assert {len(b) for b in dealt} == {len(weights) // bins}
    assert all(b == sorted(b) for b in dealt)
    assert dealt == balanced_bins(list(weights), bins)  # deterministic
    # unconstrained LPT: the heaviest bin exceeds the lightest by at most one item
    free = balanced_bins(weights, bins, equal_counts=False)
    loads = [sum(weights[i] for i in b) for b in free]
    assert max(loads) - min(loads) <= max(weights)


def test_mini_batches_are_dealt_one_by_one() -> None:
    # mini 0 = [10, 1, 1, 1] -> [[0, 3], [1, 2]]; mini 1 = [3, 3, 2, 2] at 4..7 -> [[4, 6], [5, 7]]
    assert deal_mini_batches([10, 1, 1, 1, 3, 3, 2, 2], 4, 2) == [[0, 3, 4, 6], [1, 2, 5, 7]]


def test_every_mini_batch_is_balanced_on_its_own() -> None:
    # mini 0: 9(0)->r0, 9(1)->r1, 1(2)->r0, 1(3)->r1; mini 1: 5(4)->r0, 5(6)->r1, 1(5)->r0, 1(7)->r1
    tokens = [9, 9, 1, 1, 5, 1, 5, 1]
    dealt = deal_mini_batches(tokens, 4, 2)
    assert dealt == [[0, 2, 4, 5], [1, 3, 6, 7]]
    assert [sum(tokens[i] for i in r) for r in dealt] == [16, 16]


@pytest.mark.parametrize("seed", range(10))
def test_random_mini_batch_deals_keep_membership(seed: int) -> None:
    rng = random.Random(seed)
    bins = rng.choice([1, 2, 4])
    per_mini = bins * rng.randint(1, 4)
    minis = rng.randint(1, 4)
    tokens = [rng.randint(1, 300) for _ in range(per_mini * minis)]
    dealt = deal_mini_batches(tokens, per_mini, bins)
    assert sorted(i for r in dealt for i in r) == list(range(len(tokens)))
    for rank in dealt:
        assert len(rank) == minis * (per_mini // bins)
        minis_of = [i // per_mini for i in rank]
        assert minis_of == sorted(minis_of)  # mini-batch by mini-batch
        for m in range(minis):
            assert minis_of.count(m) == per_mini // bins
