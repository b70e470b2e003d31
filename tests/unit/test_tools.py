"""Tool calls: the Qwen/Hermes format, the calculator, the registry and its routing of calls."""

from __future__ import annotations

import pytest

from spmd_rlhf.config import ConfigError
from spmd_rlhf.rollout.toolbox import Calculator, FunctionTool, PythonTool, build_toolbox, calculate, format_number
from spmd_rlhf.rollout.tools import ToolCall, ToolSettings, parse_tool_call
from tests.integration.custom_tools import Echo

SETTINGS = ToolSettings(timeout_s=5)


def test_parse_the_qwen_format() -> None:
    text = 'Let me add.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>'
    assert parse_tool_call(text) == ToolCall("calculator", {"expression": "2+2"})
    as_string = '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}</tool_call>'
    assert parse_tool_call(as_string) == ToolCall("python", {"code": "print(1)"})
    assert parse_tool_call('<tool_call>{"name": "calculator"}</tool_call>') == ToolCall("calculator", {})
    first = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    assert parse_tool_call(first).name == "a"


@pytest.mark.parametrize("text", ["no call here", '<tool_call>{"name": "calculator"}', '{"name": "x"}</tool_call>'])
def test_no_complete_call(text: str) -> None:
    assert parse_tool_call(text) is None


@pytest.mark.parametrize("text, error", [
    ("<tool_call>calculator(2+2)</tool_call>", "not valid JSON"),
    ('<tool_call>{"arguments": {}}</tool_call>', 'needs a JSON object {"name"'),
    ('<tool_call>{"name": "c", "arguments": "[1"}</tool_call>', "arguments are not a JSON object"),
    ('<tool_call>{"name": "c", "arguments": 3}</tool_call>', "arguments are not a JSON object"),
])
def test_malformed_calls_parse_to_errors(text: str, error: str) -> None:
    call = parse_tool_call(text)
    assert call is not None and call.error is not None and error in call.error


@pytest.mark.parametrize("expression, value", [
    ("437+548", 985), ("007+048", 55), ("2*(3+4)-5", 9), ("7/2", 3.5), ("7//2", 3), ("-7%3", 2), ("2**10", 1024),
    ("1.05*2", 2.1), ("0.5+0.25", 0.75), ("  12 ", 12),
])
def test_calculator_values(expression: str, value: float) -> None:
    assert calculate(expression) == pytest.approx(value)


@pytest.mark.parametrize("expression", [
    "__import__('os').system('true')", "x+1", "(1).__class__", "[1, 2]", "lambda: 1", "1 if 1 else 2", "2**1000",
    "10**60*10**60", "1/0", "'a'*3", "2+", "1" * 600,
])
def test_calculator_refuses_anything_else(expression: str) -> None:
    (result,) = Calculator(SETTINGS).run([_request({"expression": expression})])
    assert result.status == "error" and result.text.startswith("Error: ")


def test_number_format() -> None:
    assert [format_number(v) for v in (985, 985.0, 0.1 + 0.2, 1 / 3, -2.5)] == ["985", "985", "0.3", "0.333333333333",
                                                                                "-2.5"]


def _request(arguments: dict, create: dict | None = None):
    from spmd_rlhf.rollout.tools import ToolRequest

    return ToolRequest(arguments, create or {})


def test_registry_routes_one_batch_per_tool_and_rows_see_only_their_tools() -> None:
    box, sandbox = build_toolbox(["calculator", "tests.integration.custom_tools:Echo"], SETTINGS)
    echo = box.tools["echo"]
    assert isinstance(echo, Echo) and echo.settings == SETTINGS
    every = box.allowed({})
    only_echo = box.allowed({"tools_kwargs": {"echo": {"create_kwargs": {"k": 1}}}})
    assert set(every) == {"calculator", "echo"} and only_echo == {"echo": {"k": 1}}
    # a parquet row: the tools other rows name come back as nulls, so do their missing kwargs
    parquet = {"tools_kwargs": {"echo": {"create_kwargs": {"k": 1, "j": None}}, "calculator": None}}
    assert box.allowed(parquet) == {"echo": {"k": 1}}
    assert box.allowed({"tools_kwargs": {"echo": {"create_kwargs": None}}}) == {"echo": {}}
    calls = [(ToolCall("echo", {"text": "a"}), every), (ToolCall("calculator", {"expression": "1+2"}), every),
             (ToolCall("echo", {"text": "b"}), only_echo), (ToolCall("calculator", {"expression": "1"}), only_echo),
             (ToolCall(error="bad"), every), (ToolCall("nope", {}), every)]
    results = box.run(calls)
    assert [r.text for r in results] == ["a", "3", "b", "Error: unknown tool 'calculator'; the tools are: echo",
                                         "Error: bad", "Error: unknown tool 'nope'; the tools are: calculator, echo"]
    assert [r.status for r in results] == ["ok", "ok", "ok", "error", "error", "error"]
    assert echo.batches == [2], "every call of a turn to one tool goes in one batch"
    sandbox.close()


def test_a_tool_that_raises_fails_its_calls_not_the_rollout() -> None:
    box, _ = build_toolbox(["tests.integration.custom_tools.Broken"], SETTINGS)
    results = box.run([(ToolCall("broken", {}), box.allowed(None))] * 2)
    assert [r.status for r in results] == ["error", "error"] and "RuntimeError: boom" in results[0].text


def test_built_in_and_dotted_names() -> None:
    box, sandbox = build_toolbox(["python", "tests.integration.custom_tools:lookup"], SETTINGS)
    assert isinstance(box.tools["python"], PythonTool) and isinstance(box.tools["lookup"], FunctionTool)
    assert box.tools["lookup"].description.startswith("Look")
    sandbox.close()
    for names, match in [(["abacus"], r"tools\[0\]='abacus' is not a built-in tool"),
                         (["calculator", "no.such.module:fn"], r"tools\[1\]: cannot import 'no.such.module'"),
                         (["tests.integration.custom_tools:missing"], "has no 'missing'"),
                         (["spmd_rlhf.rollout.tools:CALL_OPEN"], "is not a Tool"),
                         (["calculator", "calculator"], "two tools are named 'calculator'")]:
        with pytest.raises(ConfigError, match=match):
            build_toolbox(names, SETTINGS)
