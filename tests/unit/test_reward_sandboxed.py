"""User reward functions in the sandbox (the default, reward.sandbox.custom_function): results, failures,
timeouts, a BaseException that stops the run, paths relative to the caller, and no process left behind
by a function that forks a child which never returns."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from spmd_rlhf.rewards.registry import RewardScorer
from spmd_rlhf.rewards.sandboxed import RewardAborted

CUSTOM = '''
import os, time

def exact(data_source, solution_str, ground_truth, extra_info=None):
    return float(solution_str.strip() == ground_truth)

def extras(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": 1.0, "length": len(solution_str), "source_is_s": float(data_source == "s"),
            "n": float(extra_info["n"][1])}

def forks(data_source, solution_str, ground_truth, extra_info=None):
    pid = os.fork()
    if pid == 0:
        time.sleep(1000)
    with open(solution_str, "w") as f:
        f.write(str(pid))
    return 1.0

def raises(data_source, solution_str, ground_truth, extra_info=None):
    raise RuntimeError("boom")

class Crash(BaseException):
    pass

def crashes(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "crash":
        raise Crash("reward server went away")
    return 1.0

def slow(data_source, solution_str, ground_truth, extra_info=None):
    time.sleep(float(solution_str))
    return 1.0
'''


@pytest.fixture
def custom(tmp_path: Path) -> str:
    path = tmp_path / "my_reward.py"
    path.write_text(CUSTOM)
    return str(path)


def scorer_for(custom: str, name: str, timeout_s: float = 5.0) -> RewardScorer:
    return RewardScorer(f"{custom}:{name}", timeout_s, sandbox_workers=2, sandbox_custom=True)


def test_results_and_extras(custom: str) -> None:
    scorer = scorer_for(custom, "exact")
    try:
        scores, metrics = scorer.score(["s", "s"], ["a", "b"], ["a", "a"], [None, None])
        assert scores == [1.0, 0.0] and metrics["reward/errors"] == 0.0
    finally:
        scorer.close()
    np = pytest.importorskip("numpy")
    scorer = scorer_for(custom, "extras")
    try:  # extra_info with a numpy array (as read from parquet) reaches the function as a list
        scores, metrics = scorer.score(["s", "t"], ["ab", "abcd"], ["", ""], [{"n": np.arange(3)}] * 2)
        assert scores == [1.0, 1.0]
        assert metrics["reward/extra/length"] == 3.0 and metrics["reward/extra/source_is_s"] == 0.5
        assert metrics["reward/extra/n"] == 1.0
    finally:
        scorer.close()


def test_forked_child_does_not_outlive_the_call(custom: str, tmp_path: Path) -> None:
    scorer = scorer_for(custom, "forks")
    out = tmp_path / "pid.txt"
    try:
        scores, _ = scorer.score(["s"], [str(out)], [""], [None])
        assert scores == [1.0]
        child = int(out.read_text())
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and Path(f"/proc/{child}").exists():
            time.sleep(0.02)
        assert not Path(f"/proc/{child}").exists()  # killed and reaped once the call returned
    finally:
        scorer.close()


def test_errors_and_timeouts(custom: str) -> None:
    scorer = scorer_for(custom, "raises")
    try:
        scores, metrics = scorer.score(["s"] * 2, ["a", "b"], ["a"] * 2, [None] * 2)
        assert scores == [0.0, 0.0] and metrics["reward/errors"] == 2.0
    finally:
        scorer.close()
    scorer = scorer_for(custom, "slow", timeout_s=0.5)
    try:
        scorer.score(["s"], ["0"], [""], [None])  # the pool starts
        start = time.monotonic()
        scores, metrics = scorer.score(["s"] * 3, ["100", "0", "100"], [""] * 3, [None] * 3)
        assert scores == [0.0, 1.0, 0.0]
        assert metrics["reward/timeouts"] == 2.0 and metrics["reward/errors"] == 0.0
        assert time.monotonic() - start < 0.5 + 3.0  # two workers: the two sleepers overlap
    finally:
        scorer.close()


def test_a_base_exception_stops_the_caller_with_its_message(custom: str) -> None:
    """As in the trainer's process: an Exception scores 0, a BaseException that is none ends the run."""
    scorer = scorer_for(custom, "crashes")
    try:
        with pytest.raises(RewardAborted, match=r"Crash: reward server went away"):
            scorer.score(["s"] * 3, ["a", "crash", "b"], [""] * 3, [None] * 3)
        assert scorer.score(["s"], ["a"], [""], [None])[0] == [1.0]  # the pool serves on
    finally:
        scorer.close()


def test_relative_file_and_module_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers run in their own directory: a relative file path and a module beside the caller still load."""
    (tmp_path / "my_rewards_beside.py").write_text(CUSTOM)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend("")
    for path in ("my_rewards_beside.py:exact", "my_rewards_beside:exact"):
        scorer = RewardScorer(path, 5.0, sandbox_workers=1)  # the default: in the sandbox
        try:
            scores, metrics = scorer.score(["s", "s"], ["a", "b"], ["a", "a"], [None, None])
            assert scores == [1.0, 0.0] and metrics["reward/errors"] == 0.0, path
        finally:
            scorer.close()


def test_a_reward_file_whose_imports_map_more_than_the_memory_limit(tmp_path: Path) -> None:
    """A module that maps more address space at import than ``memory_mb`` (as a CUDA build of torch
    does) loads before the limit; a call may then add up to ``memory_mb``, and one that adds more
    scores 0 with a MemoryError, the worker replaced."""
    from spmd_rlhf.sandbox import SandboxLimits

    path = tmp_path / "big_import.py"
    path.write_text(
        "import mmap, os\n"
        "MAPPED = mmap.mmap(-1, 600 << 20)  # 600 MB of address space, untouched (no resident memory)\n"
        "def small(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    x = bytearray(64 << 20)\n"
        "    return float(len(x) == 64 << 20 and os.environ['OPENBLAS_NUM_THREADS'] == '1')\n"
        "def hog(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    x = bytearray(700 << 20)\n"
        "    return 1.0\n")
    limits = SandboxLimits(memory_mb=512)
    for name, want, errors in (("small", 1.0, 0.0), ("hog", 0.0, 1.0)):
        scorer = RewardScorer(f"{path}:{name}", 30.0, sandbox_workers=1, sandbox_custom=True, sandbox_limits=limits)
        try:
            scores, metrics = scorer.score(["s"], ["a"], ["a"], [None])
            assert scores == [want] and metrics["reward/errors"] == errors, (name, scores, metrics)
        finally:
            scorer.close()
