"""Give prepared GSM8K rows (``tools/prepare_gsm8k.py``'s output) the Python tool, for recipe=gsm8k_tools.

Usage::

    python tools/prepare_gsm8k_tools.py --in-dir data/gsm8k --out-dir data/gsm8k_tools

Reads ``IN/train.*`` and ``IN/test.*`` (jsonl or parquet) and writes the same rows, in the same
format, with a system message first that describes the ``python`` tool in the Qwen/Hermes format
(the one ``spmd_rlhf.rollout.tools`` parses: ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``).
The reward stays GSM8K's (the number after "####").
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare_gsm8k import write_rows  # noqa: E402  (a script beside this one)

TOOL = {"type": "function", "function": {
    "name": "python",
    "description": "Run a Python program and return what it prints (no network; time and memory are limited).",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
}}
SYSTEM = (
    "You are a helpful assistant that solves math word problems. Check your arithmetic with Python.\n\n"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    f"{json.dumps(TOOL)}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": "python", "arguments": {"code": "print(48 / 2 + 48)"}}\n</tool_call>\n'
    "The tool answers with what the program prints. Give the final answer after \"####\"."
)


def with_tool(row: dict) -> dict:
    """``row`` with the system message that describes the tool before its messages."""
    prompt = row["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    return {**row, "prompt": [{"role": "system", "content": SYSTEM}, *list(prompt)]}


def read_rows(path: str) -> list[dict]:
    """The rows of a jsonl or parquet file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_file(in_dir: str, split: str) -> tuple[str, str]:
    """``(path, format)`` of ``in_dir``'s file of ``split``; SystemExit naming what is missing."""
    for fmt in ("parquet", "jsonl"):
        path = os.path.join(in_dir, f"{split}.{fmt}")
        if os.path.isfile(path):
            return path, fmt
    raise SystemExit(f"no {split}.parquet or {split}.jsonl in {in_dir!r}; run tools/prepare_gsm8k.py first")


def main(argv: list[str] | None = None) -> int:
    """Convert both splits; prints the counts. Returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-dir", required=True, help="tools/prepare_gsm8k.py's --out-dir")
    parser.add_argument("--out-dir", required=True, help="directory for the rows with the tool")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    for split in ("train", "test"):
        path, fmt = split_file(args.in_dir, split)
        rows = [with_tool(row) for row in read_rows(path)]
        out = os.path.join(args.out_dir, f"{split}.{fmt}")
        write_rows(rows, out, fmt)
        print(f"{split}: {len(rows)} rows -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
