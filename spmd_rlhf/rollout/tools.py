"""Tools a policy may call in a multi-turn rollout: the call format, the interface and the registry.

A tool call is the Qwen/Hermes chat templates' format, inside the assistant's text::

    <tool_call>{"name": "calculator", "arguments": {"expression": "437+548"}}</tool_call>

``parse_tool_call`` reads the first complete one of a turn; whatever is wrong with it (no JSON, no
``name``, arguments that are not an object) comes back as a ``ToolCall`` with ``error`` set, which
the rollout answers with an error tool message: a malformed call never raises.

A tool is any object with the ``Tool`` interface: a ``name``, a ``description`` and ``parameters``
(a JSON schema of the arguments, for prompts and documentation) and ``run(requests)``, which answers
a batch of calls (every call to this tool of one turn, across the samples) with one ``ToolResult``
each and must not raise for a bad call. ``rollout.multi_turn.tools`` names built-in tools
(``calculator``, ``python``: ``rollout/toolbox.py``) or custom ones by dotted path
``pkg.module:obj`` (or ``pkg.module.obj``), where ``obj`` is

* a ``Tool`` instance, or a ``Tool`` class (called as ``obj(settings: ToolSettings)``), or
* a plain function ``fn(**arguments, **create_kwargs) -> str``; it runs in a sandbox worker
  (``spmd_rlhf.sandbox``, a ``Call`` limited to ``rollout.multi_turn.tool_timeout_s``) and what it
  raises becomes the error message.

Per row, ``extra_info.tools_kwargs`` (verl's convention) ``{tool name: {"create_kwargs": {...}}}``
limits the row to the tools it names and hands each one its ``create_kwargs`` with every call.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..config import ConfigError

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
OK, ERROR, TIMEOUT = "ok", "error", "timeout"  # ToolResult.status


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: ``name`` and ``arguments``, or ``error`` saying why it cannot run."""

    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class ToolRequest:
    """One call to a tool: its arguments and the row's ``create_kwargs`` for this tool."""

    arguments: dict[str, Any]
    create_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolResult:
    """What a call gives back to the policy: ``text`` (the tool message), and how it ended."""

    text: str
    status: str = OK  # ok | error | timeout


@dataclass(frozen=True)
class ToolSettings:
    """What a tool may take from the configuration."""

    timeout_s: float = 30.0  # rollout.multi_turn.tool_timeout_s
    max_output_chars: int = 1000  # longer tool messages are cut to this (the rest costs response tokens)


@runtime_checkable
class Tool(Protocol):
    """A tool the policy can call (see the module docstring)."""

    name: str
    description: str
    parameters: dict[str, Any]

    def run(self, requests: Sequence[ToolRequest]) -> list[ToolResult]:
        """One result per request, in order; a bad request gets an error result, never an exception."""
        ...


def parse_tool_call(text: str) -> ToolCall | None:
    """The first complete ``<tool_call>...</tool_call>`` of ``text``; None when there is none."""
    start = text.find(CALL_OPEN)
    end = text.find(CALL_CLOSE, start + len(CALL_OPEN)) if start >= 0 else -1
    if start < 0 or end < 0:
        return None
    body = text[start + len(CALL_OPEN):end].strip()
    try:
        payload = json.loads(body)
    except ValueError as exc:
        return ToolCall(error=f"the tool call is not valid JSON ({exc.msg} at character {exc.pos})")
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return ToolCall(error='the tool call needs a JSON object {"name": ..., "arguments": {...}}')
    arguments = payload.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return ToolCall(payload["name"], error="the tool call's arguments are not a JSON object")
    if not isinstance(arguments, dict):
        return ToolCall(payload["name"], error="the tool call's arguments are not a JSON object")
    return ToolCall(payload["name"], arguments)


def cut(text: str, limit: int) -> str:
    """``text`` with at most ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters]"


def load_object(path: str, key: str) -> Any:
    """The object at ``pkg.module:name`` or ``pkg.module.name``; ``ConfigError`` naming ``key`` if absent."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{key}: {path!r} is neither a built-in tool nor a dotted path pkg.module:name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import {module_name!r} for tool {path!r} ({exc}); fix the path or "
                          "PYTHONPATH") from exc
    if not hasattr(module, attr):
        raise ConfigError(f"{key}: module {module_name!r} has no {attr!r} (tool {path!r})")
    return getattr(module, attr)


class ToolBox:
    """The tools of a run by name, and per row the subset it may call."""

    def __init__(self, tools: Sequence[Tool]):
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self.tools:
                raise ConfigError(f"rollout.multi_turn.tools: two tools are named {tool.name!r}; keep one")
            self.tools[tool.name] = tool

    def allowed(self, extra_info: dict | None) -> dict[str, dict[str, Any]]:
        """The tools a row may call, each with its ``create_kwargs``: all of them, or the ones its
        ``extra_info.tools_kwargs`` names (nulls, which parquet writes for the keys of other rows, are
        dropped)."""
        per_row = (extra_info or {}).get("tools_kwargs")
        if not isinstance(per_row, dict) or not per_row:
            return {name: {} for name in self.tools}
        allowed = {}
        for name, kwargs in per_row.items():
            if kwargs is None:  # parquet fills the tools other rows name with nulls
                continue
            create = kwargs.get("create_kwargs") if isinstance(kwargs, dict) else None
            create = create if isinstance(create, dict) else {}
            allowed[str(name)] = {k: v for k, v in create.items() if v is not None}
        return allowed

    def run(self, calls: Sequence[tuple[ToolCall, dict[str, dict[str, Any]]]]) -> list[ToolResult]:
        """Answer ``(call, the row's allowed tools)`` pairs: every tool runs its batch once."""
        results: list[ToolResult | None] = [None] * len(calls)
        batches: dict[str, list[int]] = {}
        for i, (call, allowed) in enumerate(calls):
            if call.error is not None:
                results[i] = ToolResult(f"Error: {call.error}", ERROR)
            elif call.name not in allowed or call.name not in self.tools:
                names = ", ".join(sorted(n for n in allowed if n in self.tools)) or "none"
                results[i] = ToolResult(f"Error: unknown tool {call.name!r}; the tools are: {names}", ERROR)
            else:
                batches.setdefault(call.name, []).append(i)
        for name, rows in batches.items():
            requests = [ToolRequest(calls[i][0].arguments, calls[i][1][name]) for i in rows]
            for i, result in zip(rows, _run_guarded(self.tools[name], requests)):
                results[i] = result
        return results  # type: ignore[return-value]


def _run_guarded(tool: Tool, requests: list[ToolRequest]) -> list[ToolResult]:
    """``tool.run``; a tool that raises anyway fails its whole batch with the error, the run goes on."""
    try:
        results = tool.run(requests)
        assert len(results) == len(requests), f"tool {tool.name} answered {len(results)} of {len(requests)} calls"
        return list(results)
    except Exception as exc:  # noqa: BLE001 (a custom tool's bug must not end the run)
        return [ToolResult(f"Error: tool {tool.name} failed: {type(exc).__name__}: {exc}", ERROR)] * len(requests)


def build_tools(names: Sequence[str], settings: ToolSettings,
                builtins: dict[str, Callable[[ToolSettings], Tool]], function_tool: Callable[..., Tool]) -> ToolBox:
    """The ``ToolBox`` of ``rollout.multi_turn.tools``: built-in names, or dotted paths of a Tool
    (an instance, or a class taking ``ToolSettings``) or of a plain function (``function_tool``)."""
    tools = []
    for i, name in enumerate(names):
        key = f"rollout.multi_turn.tools[{i}]"
        if name in builtins:
            tools.append(builtins[name](settings))
            continue
        if "." not in name:
            raise ConfigError(f"{key}={name!r} is not a built-in tool ({', '.join(sorted(builtins))}) nor a dotted "
                              "path pkg.module:tool")
        obj = load_object(name, key)
        if isinstance(obj, type):
            obj = obj(settings)  # a Tool class takes the settings
        elif not isinstance(obj, Tool) and callable(obj):
            obj = function_tool(name, obj, settings)
        if not isinstance(obj, Tool):
            raise ConfigError(f"{key}={name!r} is not a Tool (name, description, parameters, run) nor a function")
        tools.append(obj)
    return ToolBox(tools)

