"""Sandboxed tools for real (the Python interpreter, function tools by dotted path: output, errors,
timeouts, nothing left running) and a real run of recipe=tiny_arithmetic_tools that learns to use the tool."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil
import pytest

from spmd_rlhf.rollout.toolbox import build_toolbox
from spmd_rlhf.rollout.tools import ToolCall, ToolSettings
from tests.launch import REPO_ROOT, child_env, run_reaped


@pytest.fixture(scope="module")
def box():
    toolbox, sandbox = build_toolbox(["python", "calculator", "tests.integration.custom_tools:lookup",
                                      "tests.integration.custom_tools:nap"], ToolSettings(timeout_s=2.0))
    yield toolbox
    sandbox.close()


def run(box, *calls: tuple[str, dict], row: dict | None = None):
    allowed = box.allowed(row)
    return box.run([(ToolCall(name, arguments), allowed) for name, arguments in calls])


def test_python_tool_prints_errors_and_times_out(box) -> None:
    start = time.monotonic()
    ok, failed, looping, empty = run(box, ("python", {"code": "print(sum(range(10)))"}),
                                     ("python", {"code": "1/0"}),
                                     ("python", {"code": "while True:\n    pass"}),
                                     ("python", {"code": "  "}))
    assert (ok.text, ok.status) == ("45\n", "ok")
    assert failed.status == "error" and "ZeroDivisionError" in failed.text
    assert looping.status == "timeout" and looping.text == "Error: timed out after 2 s"
    assert empty.status == "error" and "takes {\"code\"" in empty.text
    assert time.monotonic() - start < 30, "the calls of a batch run in parallel, the loop is cut at 2 s"


def test_python_tool_output_is_cut(box) -> None:
    (result,) = run(box, ("python", {"code": "print('x' * 5000)"}))
    assert result.status == "ok" and result.text.startswith("x" * 1000)
    assert result.text.endswith("[4001 more characters]"), "1000 of 5000 characters and the newline kept"


def test_function_tools_get_the_rows_create_kwargs_and_time_out(box) -> None:
    row = {"tools_kwargs": {"lookup": {"create_kwargs": {"table": {"pi": 3.14}}}}}
    found, missing = run(box, ("lookup", {"key": "pi"}), ("lookup", {"key": "e"}), row=row)
    assert (found.text, found.status) == ("3.14", "ok")
    assert missing.status == "error" and "no entry 'e'" in missing.text
    rested, stuck = run(box, ("nap", {"seconds": 0.01}), ("nap", {"seconds": 30}))
    assert (rested.text, rested.status) == ("rested", "ok")
    assert stuck.status == "timeout"


def test_the_sandbox_ends_with_close() -> None:
    toolbox, sandbox = build_toolbox(["python"], ToolSettings(timeout_s=2.0))
    (result,) = toolbox.run([(ToolCall("python", {"code": "print(1)"}), toolbox.allowed(None))])
    assert result.text == "1\n"
    assert build_toolbox(["calculator"], ToolSettings())[1].worker_pids() == [], "no sandbox until a tool needs it"
    workers = [psutil.Process(pid) for pid in sandbox.worker_pids()]
    sandbox.close()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def test_tools_recipe_learns_to_call_the_tool(tmp_path: Path) -> None:
    """The CLI of the README: 30 steps of recipe=tiny_arithmetic_tools (its warm start, 800 steps) log the
    tool metrics, the held-out evaluation generates through the tools (sampled, so that the warm start's
    share of calls shows), and the policy learns that calling the calculator pays: held-out accuracy and
    calls per sample rise (measured: accuracy 0.125 -> 0.578, calls 0.25 -> 0.88; about 90 s on 2 busy cores)."""
    run_dir = tmp_path / "run"
    proc = run_reaped([sys.executable, "-m", "spmd_rlhf.train", "recipe=tiny_arithmetic_tools",
                       "trainer.total_steps=30", "data.arithmetic.num_val=128", "rollout.val_temperature=1.0",
                       f"hydra.run.dir={run_dir}", "logging.progress_bar=false"],
                      timeout=600, env=child_env(), cwd=REPO_ROOT)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [s for s in steps if "rollout/turns" in s]
    assert len(train) == 30
    for step in train:
        assert 1.0 <= step["rollout/turns"] <= 2.0, "max_turns=2"
        assert 0.0 <= step["rollout/tool_errors"] <= step["rollout/tool_calls"] and step["rollout/tool_timeouts"] == 0.0
        # the engine's logprobs of the generated tokens, aligned across turns, are the actor's (fp32 on a CPU)
        assert step["rollout/logprob_diff"] < 1e-4
    assert train[0]["rollout/tool_calls"] > 0, "the warm start calls the calculator in a share of its demonstrations"
    first, last = (sum(s["rollout/tool_calls"] for s in part) / 5 for part in (train[:5], train[-5:]))
    assert last >= first + 0.3, f"tool calls per sample {first:.2f} -> {last:.2f}"
    evals = [s for s in steps if "eval/turns" in s]
    assert len(evals) == 2, "before and after"
    # a single-turn evaluation has exactly 1 turn per response; 128 samples at the warm start's rate of
    # answered calls all answering directly would have odds far below 1e-3
    assert all(1.0 < s["eval/turns"] <= 2.0 for s in evals), evals
    before, after = evals[0]["eval/accuracy"], evals[1]["eval/accuracy"]
    assert after >= before + 0.3, f"held-out accuracy {before:.3f} -> {after:.3f}"
