"""A reward function for fault tests: exact-answer scoring, except that rank 1 raises an error the
scorer does not catch (a ``BaseException``) on its ``CRASH_AT_CALL``-th call."""

from __future__ import annotations

import os

from spmd_rlhf.rewards.registry import get_reward_fn

# With 2 ranks the embedded default scores 16 prompts x 8 samples = 128 responses per rank and step,
# after half of the held-out prompts before step 1: with 32 held-out prompts, calls 1-16 are that
# evaluation, 17-144 step 1, 145-272 step 2, and call 300 falls in step 3.
CRASH_AT_CALL = 300
MESSAGE = "reward server on rank 1 went away"
_calls = 0


class RewardCrash(BaseException):
    """Not an ``Exception``: the scorer's fault tolerance does not turn it into a 0.0 score."""


def reward(data_source, solution_str, ground_truth, extra_info=None):
    global _calls
    _calls += 1
    if os.environ.get("RANK") == "1" and _calls == CRASH_AT_CALL:
        raise RewardCrash(f"{MESSAGE} (call {_calls})")
    return get_reward_fn(data_source)(data_source=data_source, solution_str=solution_str, ground_truth=ground_truth,
                                      extra_info=extra_info)
