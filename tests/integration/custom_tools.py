"""Custom tools given by dotted path in the tool tests (``rollout.multi_turn.tools``)."""

from __future__ import annotations

import time

from spmd_rlhf.rollout.tools import ToolResult, ToolSettings


def lookup(key: str, table: dict | None = None) -> str:
    """Look ``key`` up in the row's table (``create_kwargs``)."""
    if table is None or key not in table:
        raise KeyError(f"no entry {key!r}")
    return str(table[key])


def nap(seconds: float) -> str:
    """Sleep, then say so."""
    time.sleep(seconds)
    return "rested"


class Echo:
    """A Tool class: repeats its text; remembers the size of every batch it was given."""

    name = "echo"
    description = "Repeat the text."
    parameters = {"type": "object", "properties": {"text": {"type": "string"}}}

    def __init__(self, settings: ToolSettings):
        self.settings = settings
        self.batches: list[int] = []

    def run(self, requests):
        self.batches.append(len(requests))
        return [ToolResult(str(r.arguments.get("text", ""))) for r in requests]


class Broken:
    """A Tool class whose run raises."""

    name = "broken"
    description = "Always fails."
    parameters = {"type": "object"}

    def __init__(self, settings: ToolSettings):
        del settings

    def run(self, requests):
        raise RuntimeError("boom")
