"""Code reward: the completion's Python block run against the row's test cases in the sandbox.

``ground_truth`` (a JSON string or a dict) holds the tests, in the conventions of verl's code data
sources (APPS, CodeContests, TACO, Codeforces) and of assert-based sets (MBPP, HumanEval-style):

- ``{"inputs": [...], "outputs": [...]}``: stdin/stdout pairs (strings, or lists of lines);
- the same with ``"fn_name"``: call-based, each input is the argument list of ``fn_name`` (a function,
  or a method of ``class Solution``) and each output its return value (APPS' list-wrapped outputs pass too);
- ``{"assert_case": [...]}`` (or ``"test_list"``, ``"asserts"``): one assert statement per test, with an
  optional ``"test_setup_code"`` run before it.

Each test is its own sandboxed program (in parallel over the pool's workers). The score is the fraction
of tests passed (or 1/0 for all passed with ``code_score="all_pass"``); a completion without a code
block scores 0. Assert and call-based tests only pass when the harness reaches its final line (a
random marker printed after the checks), so exiting early with status 0 does not pass.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

from ..sandbox import Outcome, Program, Status
from .registry import register_sandboxed_reward
from .sandboxed import RewardContext, RewardPlan

CODE_SOURCES = ("code", "codecontests", "apps", "codeforces", "taco")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.S)
_PYTHON_TAGS = {"python", "python3", "py", ""}
_ASSERT_KEYS = ("assert_case", "test_list", "asserts")


def extract_code(text: str) -> str | None:
    """The last fenced Python block (```python, ```py or an untagged fence) of ``text``; None if none."""
    blocks = [body for tag, body in _FENCE.findall(text) if tag.lower() in _PYTHON_TAGS]
    return blocks[-1] if blocks else None


@dataclass(frozen=True)
class CodeTest:
    """One test: ``kind`` is "stdio" (stdin -> expected stdout), "call" (args -> return) or "assert"."""

    kind: str
    given: Any  # stdin text, the argument list, or the assert statement
    expected: Any = None  # expected stdout text or return value
    fn_name: str = ""
    setup: str = ""


def _as_text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(str(v) for v in value) + "\n"
    return str(value)


def parse_tests(ground_truth: str | dict) -> list[CodeTest]:
    """The test cases in ``ground_truth``; ValueError when it holds none in a known form."""
    spec = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    if isinstance(spec, list):
        spec = {"assert_case": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"code ground_truth must be a JSON object, got {type(spec).__name__}")
    for key in _ASSERT_KEYS:
        if key in spec:
            setup = str(spec.get("test_setup_code") or "")
            return [CodeTest("assert", str(line), setup=setup) for line in spec[key]]
    if "inputs" in spec and "outputs" in spec:
        inputs, outputs = spec["inputs"], spec["outputs"]
        if len(inputs) != len(outputs):
            raise ValueError(f"code ground_truth has {len(inputs)} inputs but {len(outputs)} outputs")
        fn_name = spec.get("fn_name")
        if fn_name:
            return [CodeTest("call", list(i) if isinstance(i, (list, tuple)) else [i], o, fn_name=str(fn_name))
                    for i, o in zip(inputs, outputs)]
        return [CodeTest("stdio", _as_text(i), _as_text(o)) for i, o in zip(inputs, outputs)]
    raise ValueError(f"code ground_truth has no tests: expected 'inputs'/'outputs' or one of {_ASSERT_KEYS}, "
                     f"got keys {sorted(spec)}")


def _harness(code: str, case: CodeTest, marker: str) -> str:
    """The program that runs ``case`` against ``code``; it prints ``marker`` last (call: with the result)."""
    if case.kind == "assert":
        return f"{code}\n\n{case.setup}\n{case.given}\nprint({marker!r})\n"
    args = json.dumps(json.dumps(case.given))
    return (f"{code}\n\n"
            "import json as _json\n"
            f"_fn = globals().get({case.fn_name!r}) or getattr(globals()['Solution'](), {case.fn_name!r})\n"
            f"_result = _fn(*_json.loads({args}))\n"
            f"print({marker!r} + _json.dumps(_result))\n")


def _numbers_close(a: str, b: str) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6)


def outputs_match(actual: str, expected: str) -> bool:
    """Judge stdout: equal up to trailing whitespace per line and trailing blank lines, else equal
    token by token where numeric tokens may differ by 1e-6 (relative or absolute)."""
    lines = [line.rstrip() for line in actual.rstrip().splitlines()]
    if lines == [line.rstrip() for line in expected.rstrip().splitlines()]:
        return True
    got, want = actual.split(), expected.split()
    return len(got) == len(want) and all(g == w or _numbers_close(g, w) for g, w in zip(got, want))


def _returned(stdout: str, marker: str) -> tuple[bool, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith(marker):
            try:
                return True, json.loads(line[len(marker):])
            except ValueError:
                return False, None
    return False, None


def case_passed(case: CodeTest, outcome: Outcome, marker: str) -> bool:
    """Whether ``outcome`` (of the program ``_harness`` made for ``case``) passes the test."""
    if outcome.status is not Status.OK:
        return False
    if case.kind == "stdio":
        return outputs_match(outcome.stdout, str(case.expected))
    if case.kind == "assert":
        return outcome.stdout.rstrip().splitlines()[-1:] == [marker]
    found, value = _returned(outcome.stdout, marker)
    if not found:
        return False
    expected = json.loads(json.dumps(case.expected))  # tuples as lists, like the returned value
    return value == expected or (isinstance(expected, list) and len(expected) == 1 and value == expected[0])


def plan_code_reward(solution_str: str, ground_truth: str, extra_info: dict | None, ctx: RewardContext) -> RewardPlan:
    """Sandbox programs for every test of the row, and how their outcomes become the score."""
    del extra_info  # part of the reward signature; unused
    cases = parse_tests(ground_truth)
    code = extract_code(solution_str)
    if code is None or not cases:
        return RewardPlan([], lambda outcomes: {"score": 0.0, "code_pass_rate": 0.0, "code_no_block": 1.0})
    marker = f"__spmd_rlhf_done_{secrets.token_hex(8)}__"
    jobs = [Program(code if c.kind == "stdio" else _harness(code, c, marker),
                    stdin=c.given if c.kind == "stdio" else "", limits=ctx.limits) for c in cases]

    def finish(outcomes: list[Outcome]) -> dict[str, float]:
        passed = sum(case_passed(c, o, marker) for c, o in zip(cases, outcomes))
        rate = passed / len(cases)
        score = rate if ctx.code_score == "fraction" else float(passed == len(cases))
        timeouts = sum(o.status is Status.TIMEOUT for o in outcomes)
        return {"score": score, "code_pass_rate": rate, "code_no_block": 0.0, "code_test_timeouts": float(timeouts)}

    return RewardPlan(jobs, finish)


register_sandboxed_reward(*CODE_SOURCES)(plan_code_reward)
