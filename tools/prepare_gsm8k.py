"""Turn GSM8K rows ``{"question", "answer"}`` into verl-format prompt rows, split train/test.

Usage::

    python tools/prepare_gsm8k.py --input PATH/train.jsonl --out-dir DIR \
        [--test-fraction 0.05] [--seed 0] [--format jsonl|parquet]

Writes ``DIR/train.<fmt>`` and ``DIR/test.<fmt>``. The split is a deterministic shuffle by
``--seed``; each split keeps the input order. Needs only the standard library (plus pyarrow for
parquet output).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

INSTRUCTION = " Let's think step by step and output the final answer after \"####\"."
DATA_SOURCE = "openai/gsm8k"
_FINAL_ANSWER_RE = re.compile(r"####\s*(\S[^\n]*)")


def ground_truth_of(answer: str) -> str | None:
    """The number after the last ``####`` in a GSM8K answer, commas removed; None if absent."""
    matches = _FINAL_ANSWER_RE.findall(answer)
    if not matches:
        return None
    return matches[-1].strip().replace(",", "")


def read_gsm8k(path: str) -> list[dict]:
    """GSM8K rows from a JSON-lines file; raises ValueError naming the first bad line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc})") from exc
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not \
                    isinstance(row.get("answer"), str):
                raise ValueError(f"{path}:{line_no}: expected string 'question' and 'answer'")
            rows.append(row)
    return rows


def to_verl_row(row: dict, index: int, split: str) -> dict:
    """One GSM8K row in verl's prompt format."""
    truth = ground_truth_of(row["answer"])
    if truth is None:
        raise ValueError(f"row {index}: answer has no final '#### <number>' line")
    return {
        "prompt": [{"role": "user", "content": row["question"] + INSTRUCTION}],
        "data_source": DATA_SOURCE,
        "reward_model": {"style": "rule", "ground_truth": truth},
        "extra_info": {
            "split": split, "index": index, "answer": row["answer"], "question": row["question"],
        },
    }


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, test) index lists, each in ascending order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = round(n * test_fraction)
    return sorted(order[n_test:]), sorted(order[:n_test])


def write_rows(rows: list[dict], path: str, fmt: str) -> None:
    """Write rows as JSON lines or parquet."""
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="GSM8K JSON-lines file")
    parser.add_argument("--out-dir", required=True, help="directory for train/test files")
    parser.add_argument("--test-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    args = parser.parse_args(argv)
    if not 0.0 <= args.test_fraction < 1.0:
        parser.error(f"--test-fraction={args.test_fraction} must be in [0, 1)")
    if not os.path.isfile(args.input):
        parser.error(f"--input {args.input!r} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    """Convert, split and write; prints the counts. Returns the exit status."""
    args = parse_args(argv)
    source = read_gsm8k(args.input)
    train_idx, test_idx = split_indices(len(source), args.test_fraction, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    for split, indices in (("train", train_idx), ("test", test_idx)):
        rows = [to_verl_row(source[i], i, split) for i in indices]
        path = os.path.join(args.out_dir, f"{split}.{args.format}")
        write_rows(rows, path, args.format)
        print(f"{split}: {len(rows)} rows -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
