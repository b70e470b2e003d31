"""The built-in tools (``calculator``, ``python``) and custom function tools, all behind ``Tool``.

* ``calculator``: ``{"expression": "437+548*2"}``, evaluated in this process by walking its syntax
  tree: numbers, ``+ - * / // % **`` and parentheses only (no names, calls or attributes, so no
  code runs), with bounded exponents and operand sizes.
* ``python``: ``{"code": "..."}`` run as a program in the sandbox (``spmd_rlhf.sandbox``:
  separate processes with wall-clock, CPU and memory limits; the wall clock is
  ``rollout.multi_turn.tool_timeout_s``); the message is its stdout, or its error.
* a function given by dotted path: called as ``fn(**arguments, **create_kwargs)`` in a sandbox
  worker (a ``Call``, killed with whatever it started at the timeout); its return value as text.

One ``SandboxPool`` serves the sandboxed tools of a run; it starts on the first call and ends with
``close()`` (or at interpreter exit: its workers never outlive the process).
"""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..sandbox import Call, Outcome, Program, SandboxLimits, SandboxPool, Status
from .tools import ERROR, TIMEOUT, ToolBox, ToolRequest, ToolResult, ToolSettings, build_tools, cut

_MAX_EXPONENT = 64
_MAX_MAGNITUDE = 10**100
_MAX_EXPRESSION_CHARS = 500
_LEADING_ZEROS = re.compile(r"(?<![\d.])0+(?=\d)")
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
FUNCTION_TARGET = "spmd_rlhf.rollout.toolbox:call_function"
_functions: dict[str, Callable[..., Any]] = {}


class CalculatorError(ValueError):
    """An expression the calculator does not take."""


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression; ``CalculatorError`` for anything else."""
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {_MAX_EXPRESSION_CHARS} characters")
    expression = _LEADING_ZEROS.sub("", expression.strip())  # "007+048": integers as people pad them
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not an arithmetic expression ({exc.msg})") from None
    return _value(tree.body)


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise CalculatorError(f"exponent {right} is larger than {_MAX_EXPONENT}")
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("the result is too large") from None
        if isinstance(result, complex) or abs(result) > _MAX_MAGNITUDE:
            raise CalculatorError("the result is too large or not a real number")
        return result
    raise CalculatorError(f"only numbers, + - * / // % ** and parentheses are allowed, not {type(node).__name__}")


def format_number(value: int | float) -> str:
    """``985``, ``0.5``, ``3.333333333333`` (12 significant digits; whole floats as integers)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.12g}"


class Calculator:
    """Evaluates an arithmetic expression in this process (no code runs: see ``calculate``)."""

    name = "calculator"
    description = "Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses."
    parameters = {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}

    def __init__(self, settings: ToolSettings):
        self.settings = settings

    def run(self, requests: Sequence[ToolRequest]) -> list[ToolResult]:
        return [self._one(r.arguments) for r in requests]

    def _one(self, arguments: dict[str, Any]) -> ToolResult:
        expression = arguments.get("expression")
        if not isinstance(expression, str) or set(arguments) - {"expression"}:
            return ToolResult('Error: the calculator takes {"expression": "<arithmetic>"}', ERROR)
        try:
            return ToolResult(format_number(calculate(expression)))
        except CalculatorError as exc:
            return ToolResult(f"Error: {exc}", ERROR)


class SandboxTools:
    """The one ``SandboxPool`` of a run's sandboxed tools, started on first use."""

    def __init__(self, settings: ToolSettings, workers: int | None = None):
        self.settings = settings
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self._pool: SandboxPool | None = None
        self._lock = threading.Lock()

    def run_many(self, jobs: list[Program | Call]) -> list[Outcome]:
        with self._lock:
            if self._pool is None:
                limits = SandboxLimits(timeout_s=self.settings.timeout_s)
                self._pool = SandboxPool(self.workers, limits)
        return self._pool.run_many(jobs)

    def worker_pids(self) -> list[int]:
        """Process ids of the sandbox's workers (none before the first sandboxed call)."""
        with self._lock:
            return [] if self._pool is None else self._pool.worker_pids()

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None


def _result(outcome: Outcome, settings: ToolSettings, text: str) -> ToolResult:
    """A sandbox outcome as a tool message: ``text`` when it ran, else what went wrong."""
    if outcome.status is Status.OK:
        return ToolResult(cut(text, settings.max_output_chars))
    if outcome.status is Status.TIMEOUT:
        return ToolResult(f"Error: timed out after {settings.timeout_s:g} s", TIMEOUT)
    detail = (outcome.stderr or outcome.status.value).strip()
    return ToolResult(cut(f"Error: {detail}", settings.max_output_chars), ERROR)


class PythonTool:
    """Runs Python code in the sandbox; the message is its standard output."""

    name = "python"
    description = "Run a Python program and return what it prints (no network; time and memory are limited)."
    parameters = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}

    def __init__(self, settings: ToolSettings, sandbox: SandboxTools):
        self.settings = settings
        self.sandbox = sandbox

    def run(self, requests: Sequence[ToolRequest]) -> list[ToolResult]:
        results: list[ToolResult | None] = [None] * len(requests)
        jobs, rows = [], []
        for i, request in enumerate(requests):
            code = request.arguments.get("code")
            if not isinstance(code, str) or not code.strip():
                results[i] = ToolResult('Error: the python tool takes {"code": "<a Python program>"}', ERROR)
                continue
            jobs.append(Program(code))
            rows.append(i)
        for i, outcome in zip(rows, self.sandbox.run_many(jobs) if jobs else []):
            results[i] = _result(outcome, self.settings, outcome.stdout)
        return results  # type: ignore[return-value]


def call_function(path: str, kwargs: dict[str, Any]) -> str:
    """Inside a sandbox worker: the function tool at ``path`` called with ``kwargs``, as text."""
    from .tools import load_object

    if path not in _functions:
        _functions[path] = load_object(path, "rollout.multi_turn.tools")
    value = _functions[path](**kwargs)
    return value if isinstance(value, str) else json.dumps(value, default=str)


class FunctionTool:
    """A plain function given by dotted path, run as a sandboxed ``Call``; exceptions become errors."""

    parameters: dict[str, Any] = {"type": "object"}

    def __init__(self, path: str, fn: Callable[..., Any], settings: ToolSettings, sandbox: SandboxTools):
        self.path = path
        self.name = fn.__name__
        self.description = (fn.__doc__ or "").strip()
        self.settings = settings
        self.sandbox = sandbox

    def run(self, requests: Sequence[ToolRequest]) -> list[ToolResult]:
        jobs: list[Program | Call] = [
            Call(FUNCTION_TARGET, {"path": self.path, "kwargs": {**r.arguments, **r.create_kwargs}},
                 self.settings.timeout_s) for r in requests]
        return [_result(o, self.settings, str(o.value)) for o in self.sandbox.run_many(jobs)]


def build_toolbox(names: Sequence[str], settings: ToolSettings) -> tuple[ToolBox, SandboxTools]:
    """The tools of ``rollout.multi_turn.tools`` and the sandbox they share (close it after the run)."""
    sandbox = SandboxTools(settings)
    builtins = {"calculator": Calculator, "python": lambda s: PythonTool(s, sandbox)}
    return build_tools(names, settings, builtins, lambda path, fn, s: FunctionTool(path, fn, s, sandbox)), sandbox

