"""Math answers by equivalence (math-verify), its time limit, and the routing of math vs GSM8K sources."""

from __future__ import annotations

import time

import pytest

from spmd_rlhf.rewards.math_equiv import MATH_SOURCES, check
from spmd_rlhf.rewards.registry import RewardScorer, get_reward_fn

EQUIVALENT = [
    ("\\boxed{0.5}", "\\frac{1}{2}"),  # decimal vs LaTeX fraction
    ("The answer is $\\frac{1}{2}$.", "0.5"),  # LaTeX in prose vs decimal
    ("so it is 1/2", "0.5"),  # plain fraction, no box
    ("\\boxed{\\frac12}", "1/2"),  # short \frac
    ("\\boxed{[1,2)}", "[1,2)"),  # interval
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}"),  # sets ignore order
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),  # simplification
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),  # symbolic
    ("\\boxed{\\frac{1}{2}}", "\\boxed{0.5}"),  # a boxed ground truth
]
DIFFERENT = [
    ("\\boxed{2}", "3"),
    ("\\boxed{0.5}", "\\frac{1}{3}"),
    ("\\boxed{0.33}", "\\frac{1}{3}"),  # not within rounding
    ("\\boxed{[1,2]}", "[1,2)"),  # closed vs half-open
    ("\\boxed{(1,2)}", "[1,2]"),
    ("\\boxed{\\{1,2,3\\}}", "\\{1,2\\}"),
    ("no answer here", "3"),
]


@pytest.mark.parametrize(("answer", "truth"), EQUIVALENT)
def test_equivalent(answer: str, truth: str) -> None:
    assert check(answer, truth) is True


@pytest.mark.parametrize(("answer", "truth"), DIFFERENT)
def test_different(answer: str, truth: str) -> None:
    assert check(answer, truth) is False


@pytest.fixture(scope="module")
def scorer():
    scorer = RewardScorer(None, timeout_s=5.0, sandbox_workers=2, math_timeout_s=1.5)
    yield scorer
    scorer.close()


def test_math_sources_scored_by_equivalence(scorer: RewardScorer) -> None:
    sources = ["HuggingFaceH4/MATH-500", "lighteval/MATH", "math", "aime24"]
    assert set(sources) <= set(MATH_SOURCES)
    answers = ["\\boxed{0.5}", "$\\frac{1}{2}$", "\\boxed{2}", "\\boxed{\\frac{3}{6}}"]
    scores, metrics = scorer.score(sources, answers, ["\\frac{1}{2}", "0.5", "3", "1/2"], [None] * 4)
    assert scores == [1.0, 1.0, 0.0, 1.0]
    assert metrics["reward/mean"] == 0.75 and metrics["reward/errors"] == 0.0 and metrics["reward/timeouts"] == 0.0


def test_gsm8k_keeps_its_numeric_rule(scorer: RewardScorer) -> None:
    # the numeric rule cannot read \frac; math-verify can: the same row scores 0 for gsm8k, 1 for math
    scores, _ = scorer.score(["gsm8k", "math"], ["\\boxed{\\frac{1}{2}}"] * 2, ["0.5"] * 2, [None] * 2)
    assert scores == [0.0, 1.0]
    assert get_reward_fn("gsm8k")(data_source="gsm8k", solution_str="#### 1,000", ground_truth="1000") == 1.0


def test_pathological_expression_times_out_and_scores_zero(scorer: RewardScorer) -> None:
    start = time.monotonic()  # 9^(9^(9^9)) expands an integer inside C: no signal can stop it, a kill can
    scores, metrics = scorer.score(["math", "math"], ["$9^{9^{9^{9}}}$", "\\boxed{4}"], ["1", "4"], [None, None])
    assert scores == [0.0, 1.0]
    assert metrics["reward/timeouts"] == 1.0 and metrics["reward/errors"] == 0.0
    assert time.monotonic() - start < 1.5 + 4.0  # the limit, plus the other row and a loaded machine
    scores, _ = scorer.score(["math"], ["\\boxed{0.5}"], ["1/2"], [None])  # the replaced worker serves
    assert scores == [1.0]
