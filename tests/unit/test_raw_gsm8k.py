"""A raw GSM8K file given as prompts is refused once, pointing at tools/prepare_gsm8k.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spmd_rlhf.data.datasets import load_prompt_dataset

RAW = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}] * 5


def load(path: Path, key: str):
    return load_prompt_dataset([str(path)], tokenizer=None, max_prompt_length=64, apply_chat_template=False,
                               max_bad_fraction=0.0, key=key)


@pytest.mark.parametrize("key", ["data.train_files", "data.val_files"])
def test_raw_gsm8k_points_at_the_converter(tmp_path: Path, key: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RAW))
    with pytest.raises(ValueError) as err:
        load(path, key)
    message = str(err.value)
    assert message.startswith(f"{key}: {path} holds raw GSM8K rows")
    assert f"tools/prepare_gsm8k.py --input {path}" in message
    assert "\n" not in message and "line 1" not in message, "one error, not one per row"


def test_a_prompt_row_with_extra_question_fields_is_not_raw(tmp_path: Path) -> None:
    row = {"prompt": "2+2=", "data_source": "x", "reward_model": {"ground_truth": "4"}, "question": "q", "answer": "a"}
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps(row) + "\n")

    class Chars:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    examples, stats = load_prompt_dataset([str(path)], tokenizer=Chars(), max_prompt_length=64,
                                          apply_chat_template=False, max_bad_fraction=0.0, key="data.train_files")
    assert stats.kept == 1 and examples[0].ground_truth == "4"
