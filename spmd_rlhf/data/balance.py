"""Deal weighted items (groups of samples, weighted by tokens) over ranks so each gets a similar load.

Split placement hands each training rank whole prompt groups. Ranks wait for the slowest, so the
groups are dealt by tokens: longest first, each into the currently lightest bin (the greedy
LPT rule). Pure functions of their arguments: every rank computes the same deal.
"""

from __future__ import annotations


def balanced_bins(weights: list[int], bins: int, equal_counts: bool = True) -> list[list[int]]:
    """Indices of ``weights`` dealt into ``bins`` lists, longest first into the lightest bin.

    With ``equal_counts`` every bin gets ``len(weights) // bins`` items (which must divide): a full
    bin takes no more. Ties (equal weights, equal loads) go to the lower index, so the deal is
    deterministic. Each bin's indices are returned in ascending order.
    """
    assert bins >= 1, bins
    assert not equal_counts or len(weights) % bins == 0, (len(weights), bins)
    capacity = len(weights) // bins if equal_counts else len(weights)
    loads = [0] * bins
    dealt: list[list[int]] = [[] for _ in range(bins)]
    for index in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        open_bins = [b for b in range(bins) if len(dealt[b]) < capacity]
        target = min(open_bins, key=lambda b: (loads[b], b))
        dealt[target].append(index)
        loads[target] += weights[index]
    return [sorted(indices) for indices in dealt]


def deal_mini_batches(group_tokens: list[int], groups_per_mini: int, bins: int) -> list[list[int]]:
    """Per rank, the group indices it holds: every mini-batch (groups ``[m * groups_per_mini,
    (m + 1) * groups_per_mini)``) is dealt by ``balanced_bins`` on its own, so a group stays in its
    mini-batch, each rank holds ``groups_per_mini // bins`` groups of every mini-batch, and each
    rank's list runs mini-batch by mini-batch."""
    assert groups_per_mini >= 1 and len(group_tokens) % groups_per_mini == 0, (len(group_tokens), groups_per_mini)
    assert groups_per_mini % bins == 0, (groups_per_mini, bins)
    per_rank: list[list[int]] = [[] for _ in range(bins)]
    for start in range(0, len(group_tokens), groups_per_mini):
        mini = balanced_bins(group_tokens[start:start + groups_per_mini], bins, equal_counts=True)
        for rank, indices in enumerate(mini):
            per_rank[rank].extend(start + i for i in indices)
    return per_rank
