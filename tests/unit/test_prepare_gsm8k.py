"""The GSM8K preparation tool on a small synthetic file."""

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spmd_rlhf.rewards.math import compute_score

TOOL = Path(__file__).resolve().parents[2] / "tools" / "prepare_gsm8k.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("prepare_gsm8k", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_input(tmp_path: Path) -> Path:
    lines = []
    for i in range(20):
        total = 1000 + 37 * i
        answer = f"Add {i} and {total - i}: {i}+{total - i}=<<{i}+{total - i}={total}>>{total}.\n"
        answer += f"#### {total:,}"
        lines.append(json.dumps({"question": f"Question {i}?", "answer": answer}))
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_prepare_gsm8k(tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture) -> None:
    tool = load_tool()
    out = tmp_path / "out"
    argv = ["--input", str(synthetic_input(tmp_path)), "--out-dir", str(out),
            "--test-fraction", "0.25", "--seed", "3", "--format", fmt]
    assert tool.main(argv) == 0
    assert "train: 15 rows" in capsys.readouterr().out
    if fmt == "jsonl":
        read = lambda name: [json.loads(l) for l in (out / name).read_text().splitlines()]
    else:
        read = lambda name: pq.read_table(out / name).to_pylist()
    train, test = read(f"train.{fmt}"), read(f"test.{fmt}")
    assert (len(train), len(test)) == (15, 5)
    indices = [r["extra_info"]["index"] for r in train + test]
    assert sorted(indices) == list(range(20))
    for r in train + test:
        assert r["data_source"] == "openai/gsm8k"
        assert r["reward_model"]["style"] == "rule"
        assert "," not in r["reward_model"]["ground_truth"]
        assert r["prompt"][0]["role"] == "user" and r["prompt"][0]["content"].endswith('"####".')
        assert compute_score(r["extra_info"]["answer"], r["reward_model"]["ground_truth"]) == 1.0
    assert {r["extra_info"]["split"] for r in test} == {"test"}
    assert int(train[0]["reward_model"]["ground_truth"]) == 1000 + 37 * train[0]["extra_info"]["index"]
    # deterministic split
    assert tool.main(argv) == 0
    assert read(f"test.{fmt}") == test
