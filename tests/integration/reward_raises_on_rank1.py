"""A reward function for fault tests: exact-answer scoring, except that rank 1 raises an error the
scorer does not catch (a ``BaseException``) on its ``CRASH_AT_CALL``-th call.

The calls of a rank are counted in its process, or, with ``CALLS_DIR_VAR`` set, in a file of that
directory per rank: the sandbox (``reward.sandbox.custom_function=true``) spreads them over workers."""

from __future__ import annotations

import fcntl
import os

from spmd_rlhf.rewards.registry import get_reward_fn

# With 2 ranks the embedded default scores 16 prompts x 8 samples = 128 responses per rank and step,
# after half of the held-out prompts before step 1: with 32 held-out prompts, calls 1-16 are that
# evaluation, 17-144 step 1, 145-272 step 2, and call 300 falls in step 3.
CRASH_AT_CALL = 300
MESSAGE = "reward server on rank 1 went away"
CALLS_DIR_VAR = "SPMD_RLHF_TEST_REWARD_CALLS_DIR"
_calls = 0


class RewardCrash(BaseException):
    """Not an ``Exception``: the scorer's fault tolerance does not turn it into a 0.0 score."""


def _count() -> int:
    """This rank's calls so far, this one included."""
    global _calls
    folder = os.environ.get(CALLS_DIR_VAR)
    if not folder:
        _calls += 1
        return _calls
    with open(os.path.join(folder, f"calls_rank{os.environ.get('RANK', '0')}"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # the sandbox's workers count in parallel
        f.seek(0)
        calls = len(f.read()) + 1
        f.write("x")
    return calls


def reward(data_source, solution_str, ground_truth, extra_info=None):
    calls = _count()
    if os.environ.get("RANK") == "1" and calls == CRASH_AT_CALL:
        raise RewardCrash(f"{MESSAGE} (call {calls})")
    return get_reward_fn(data_source)(data_source=data_source, solution_str=solution_str, ground_truth=ground_truth,
                                      extra_info=extra_info)
