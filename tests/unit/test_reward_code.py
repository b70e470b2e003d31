"""The code reward: code extraction, test formats, output judging, scoring in the sandbox."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from spmd_rlhf.rewards.code import CODE_SOURCES, extract_code, outputs_match, parse_tests
from spmd_rlhf.rewards.registry import RewardScorer, get_reward_fn
from spmd_rlhf.sandbox import SandboxLimits

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
MUL = "a, b = map(int, input().split())\nprint(a * b)\n"
STDIO = json.dumps({"inputs": ["1 2\n", "2 2\n", "3 0\n"], "outputs": ["3\n", "4\n", "3\n"]})


def block(code: str, tag: str = "python") -> str:
    return f"Here is my solution.\n```{tag}\n{code}```\nDone."


def test_extract_code() -> None:
    text = "```python\nfirst = 1\n```\ntext\n```cpp\nint main() {}\n```\n```py\nsecond = 2\n```"
    assert extract_code(text) == "second = 2\n"
    assert extract_code("```\nplain = 3\n```") == "plain = 3\n"
    assert extract_code("```cpp\nint x;\n```") is None
    assert extract_code("no code at all") is None


def test_parse_tests_formats() -> None:
    stdio = parse_tests({"inputs": [["1 2", "3"]], "outputs": [["x", "y"]]})
    assert [(c.kind, c.given, c.expected) for c in stdio] == [("stdio", "1 2\n3\n", "x\ny\n")]
    call = parse_tests(json.dumps({"inputs": [[1, 2]], "outputs": [[3]], "fn_name": "add"}))
    assert [(c.kind, c.given, c.expected, c.fn_name) for c in call] == [("call", [1, 2], [3], "add")]
    asserts = parse_tests({"test_list": ["assert f(1) == 1"], "test_setup_code": "import math"})
    assert [(c.kind, c.given, c.setup) for c in asserts] == [("assert", "assert f(1) == 1", "import math")]
    for bad in ({"inputs": ["1"], "outputs": []}, {"cases": []}, "[1, 2", 5):
        with pytest.raises(ValueError):
            parse_tests(bad if not isinstance(bad, int) else json.dumps(bad))


@pytest.mark.parametrize(("actual", "expected", "same"), [
    ("3\n", "3", True),
    ("1 2  \n3\n\n", "1 2\n3", True),  # trailing spaces and blank lines
    ("1 2 3", "1 2\n3", True),  # token by token
    ("0.3333333", "0.333333333", True),  # |diff| 3.3e-8 < 1e-6
    ("1000000.5", "1000000", True),  # relative 5e-7 < 1e-6
    ("1.5", "1.6", False),
    ("3", "4", False),
    ("1 2", "1 2 3", False),
    ("", "0", False),
])
def test_outputs_match(actual: str, expected: str, same: bool) -> None:
    assert outputs_match(actual, expected) is same


@pytest.fixture(scope="module")
def scorer():
    scorer = RewardScorer(None, timeout_s=5.0, sandbox_workers=2,
                          sandbox_limits=SandboxLimits(timeout_s=1.0, memory_mb=256))
    yield scorer
    scorer.close()


def score(scorer: RewardScorer, responses: list[str], truth: str, source: str = "codecontests"):
    n = len(responses)
    return scorer.score([source] * n, responses, [truth] * n, [None] * n)


def test_stdio_fraction_passed(scorer: RewardScorer) -> None:
    # MUL on (1 2 | 2 2 | 3 0) prints 2, 4, 0 against 3, 4, 3: one of three passes
    scores, metrics = score(scorer, [block(ADD), block(MUL), "no code"], STDIO)
    assert scores == pytest.approx([1.0, 1 / 3, 0.0])
    assert metrics["reward/extra/code_pass_rate"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert metrics["reward/extra/code_no_block"] == pytest.approx(1 / 3)
    assert metrics["reward/errors"] == 0.0


def test_all_pass_mode() -> None:
    scorer = RewardScorer(None, timeout_s=5.0, sandbox_workers=1, code_score="all_pass")
    try:
        scores, metrics = score(scorer, [block(ADD), block(MUL)], STDIO)
        assert scores == [1.0, 0.0]
        assert metrics["reward/extra/code_pass_rate"] == pytest.approx((1 + 1 / 3) / 2)
    finally:
        scorer.close()
    with pytest.raises(ValueError, match="reward.code_score"):
        RewardScorer(None, timeout_s=5.0, code_score="most")


def test_timeouts_and_crashes_fail_their_tests(scorer: RewardScorer) -> None:
    code = "n = int(input())\nif n == 2:\n    while True:\n        pass\nif n == 3:\n    raise ValueError\nprint(2 * n)\n"
    truth = json.dumps({"inputs": ["1", "2", "3", "4"], "outputs": ["2", "4", "6", "8"]})
    scores, metrics = score(scorer, [block(code)], truth)
    assert scores == [0.5]  # 1 and 4 pass; 2 times out, 3 raises
    assert metrics["reward/extra/code_test_timeouts"] == 1.0
    assert metrics["reward/timeouts"] == 0.0  # a slow program fails its test; the reward itself did not time out


def test_call_based(scorer: RewardScorer) -> None:
    truth = json.dumps({"fn_name": "add", "inputs": [[1, 2], [3, 4], [0, 0]], "outputs": [[3], 7, [1]]})
    function = "def add(a, b):\n    return a + b\n"
    method = "class Solution:\n    def add(self, a, b):\n        return a + b\n"
    printing = "def add(a, b):\n    print(a + b)\n"  # prints instead of returning: returns None
    scores, _ = score(scorer, [block(function), block(method), block(printing)], truth, source="apps")
    assert scores == pytest.approx([2 / 3, 2 / 3, 0.0])  # 0 + 0 = 0, not the expected 1


def test_assert_based_and_early_exit(scorer: RewardScorer) -> None:
    truth = json.dumps({"assert_case": ["assert f(2) == 4", "assert f(3) == 9", "assert f(0) == 1"]})
    square = "def f(x):\n    return x * x\n"
    exits = ["import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "raise SystemExit\n"]
    scores, _ = score(scorer, [block(square)] + [block(e) for e in exits], truth, source="code")
    assert scores == pytest.approx([2 / 3, 0.0, 0.0, 0.0])


def test_malformed_ground_truth_is_an_error(scorer: RewardScorer) -> None:
    scores, metrics = score(scorer, [block(ADD)], "{not json")
    assert scores == [0.0] and metrics["reward/errors"] == 1.0


def test_plain_reward_function_and_sources() -> None:
    assert {"code", "codecontests", "apps", "codeforces", "taco"} == set(CODE_SOURCES)
    fn = get_reward_fn("taco")
    result = fn(data_source="taco", solution_str=block(ADD), ground_truth=STDIO, extra_info=None)
    assert result["score"] == 1.0


def _children_alive() -> set[int]:
    pids = set()
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        pids |= {int(p) for p in Path(f"/proc/{os.getpid()}/task/{tid}/children").read_text().split()}
    return {p for p in pids if Path(f"/proc/{p}").exists()}


def test_close_ends_the_sandbox() -> None:
    before = _children_alive()
    scorer = RewardScorer(None, timeout_s=5.0, sandbox_workers=2)
    scores, _ = score(scorer, [block(ADD)], STDIO)
    started = _children_alive() - before
    assert scores == [1.0] and len(started) == 2  # the program pool's workers
    scorer.close()
    assert _children_alive() - before == set()
    assert score(scorer, [block(ADD)], STDIO)[0] == [1.0]  # a later batch starts the pool again
    scorer.close()
