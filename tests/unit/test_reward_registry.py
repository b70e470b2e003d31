"""Reward registry, custom functions and the fault-tolerant scorer."""

import threading
import time
from pathlib import Path

import pytest

from spmd_rlhf.rewards import math as reward_math
from spmd_rlhf.rewards.registry import RewardScorer, get_reward_fn, known_sources, load_function


def test_builtin_sources_registered() -> None:
    for source in ("gsm8k", "openai/gsm8k", "arithmetic"):
        fn = get_reward_fn(source)
        assert fn(data_source=source, solution_str="#### 4", ground_truth="4", extra_info=None) == 1.0
    assert {"gsm8k", "openai/gsm8k", "arithmetic"} <= set(known_sources())


def test_unknown_source_error_names_fix() -> None:
    with pytest.raises(ValueError, match="reward.custom_function") as info:
        get_reward_fn("no_such_source")
    assert "gsm8k" in str(info.value)


def test_load_function_by_module() -> None:
    assert load_function("spmd_rlhf.rewards.math:compute_score") is reward_math.compute_score


def _write_module(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "my_reward.py"
    path.write_text(body)
    return path


CUSTOM = '''
import math
import time

def exact(data_source, solution_str, ground_truth, extra_info=None):
    return float(solution_str.strip() == ground_truth)

def with_extras(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": 1.0, "length": float(len(solution_str)), "note": "ignored"}

def raises(data_source, solution_str, ground_truth, extra_info=None):
    raise RuntimeError("boom")

def nan(data_source, solution_str, ground_truth, extra_info=None):
    return math.nan

def text(data_source, solution_str, ground_truth, extra_info=None):
    return "1.0"

def slow(data_source, solution_str, ground_truth, extra_info=None):
    time.sleep(float(solution_str))
    return 1.0
'''


@pytest.fixture
def custom(tmp_path: Path) -> str:
    return str(_write_module(tmp_path, CUSTOM))


def test_load_function_by_file(custom: str) -> None:
    fn = load_function(f"{custom}:exact")
    assert fn(data_source="x", solution_str=" a ", ground_truth="a", extra_info=None) == 1.0


def test_load_function_errors(tmp_path: Path, custom: str) -> None:
    with pytest.raises(FileNotFoundError, match="reward.custom_function"):
        load_function(f"{tmp_path}/missing.py:f")
    with pytest.raises(ValueError, match="reward.custom_function"):
        load_function(f"{custom}:no_such_function")
    with pytest.raises(ValueError, match="reward.custom_function"):
        load_function("no_such_package_xyz.mod:f")
    with pytest.raises(ValueError, match="reward.custom_function"):
        load_function("no_colon")


def _score(scorer: RewardScorer, responses: list[str], source: str = "s") -> tuple:
    n = len(responses)
    return scorer.score([source] * n, responses, ["a"] * n, [None] * n)


def test_scorer_builtin_and_mean() -> None:
    scorer = RewardScorer(None, timeout_s=5.0)
    scores, metrics = _score(scorer, ["#### 3", "#### 4"], source="gsm8k")
    assert scores == [0.0, 0.0]
    scores, metrics = scorer.score(["gsm8k", "arithmetic"], ["#### 3", "#### 4"], ["3", "5"],
                                   [None, {}])
    assert scores == [1.0, 0.0]
    assert metrics["reward/mean"] == 0.5
    assert metrics["reward/errors"] == 0.0 and metrics["reward/timeouts"] == 0.0


def test_scorer_unknown_source_uses_default_only_when_asked() -> None:
    with pytest.raises(ValueError, match="reward.custom_function"):
        _score(RewardScorer(None, timeout_s=5.0), ["#### 1"], source="mystery")
    scores, _ = RewardScorer(None, 5.0, default_source="gsm8k").score(
        ["mystery"], ["#### 1"], ["1"], [None])
    assert scores == [1.0]
    with pytest.raises(ValueError, match="reward.default_source"):
        RewardScorer(None, 5.0, default_source="mystery")


@pytest.mark.parametrize("in_sandbox", [True, False])
def test_scorer_counts_raising_and_bad_values(custom: str, caplog: pytest.LogCaptureFixture, in_sandbox: bool) -> None:
    scores, metrics = _score(RewardScorer(f"{custom}:raises", 5.0, sandbox_custom=in_sandbox), ["a", "b"])
    assert scores == [0.0, 0.0] and metrics["reward/errors"] == 2.0
    logged = [r.getMessage() for r in caplog.records if "boom" in r.getMessage()]
    assert len(logged) == 1 and "RuntimeError: boom" in logged[0]  # logged once, with the user's message
    for name in ("nan", "text"):
        scores, metrics = _score(RewardScorer(f"{custom}:{name}", 5.0, sandbox_custom=in_sandbox), ["a"])
        assert scores == [0.0] and metrics["reward/errors"] == 1.0


def test_scorer_dict_result_extra_metrics(custom: str) -> None:
    scores, metrics = _score(RewardScorer(f"{custom}:with_extras", 5.0), ["ab", "abcd"])  # in the sandbox
    assert scores == [1.0, 1.0]
    assert metrics["reward/extra/length"] == 3.0
    assert "reward/extra/note" not in metrics


def test_scorer_timeout_main_thread(custom: str) -> None:
    scorer = RewardScorer(f"{custom}:slow", timeout_s=0.2, sandbox_custom=False)  # SIGALRM in this process
    start = time.monotonic()
    scores, metrics = _score(scorer, ["5", "0"])
    assert time.monotonic() - start < 3.0  # the 5 s row was cut at 0.2 s (slack for a busy machine)
    assert scores == [0.0, 1.0]
    assert metrics["reward/timeouts"] == 1.0 and metrics["reward/errors"] == 0.0


def test_scorer_timeout_off_main_thread(custom: str) -> None:
    scorer = RewardScorer(f"{custom}:slow", timeout_s=0.2, sandbox_custom=False)  # an abandoned thread
    result: dict = {}

    def work() -> None:
        start = time.monotonic()
        result["out"] = _score(scorer, ["4", "0"])
        result["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    scores, metrics = result["out"]
    assert result["elapsed"] < 2.5  # the 4 s row was cut at 0.2 s (slack for a busy machine)
    assert scores == [0.0, 1.0] and metrics["reward/timeouts"] == 1.0


def test_scorer_bad_timeout() -> None:
    with pytest.raises(ValueError, match="reward.timeout_s"):
        RewardScorer(None, timeout_s=0)
