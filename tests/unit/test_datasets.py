"""Reading verl-format prompt rows and tokenising them."""

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from spmd_rlhf.data.datasets import (
    build_prompt_examples,
    load_prompt_dataset,
    read_rows,
    tokenize_prompt,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!<>#\n'\""


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


def row(content: str = "What is 2 plus 2?", truth: str = "4", **overrides) -> dict:
    base = {
        "prompt": [{"role": "user", "content": content}],
        "data_source": "gsm8k",
        "reward_model": {"ground_truth": truth, "style": "rule"},
        "extra_info": {"index": 7},
    }
    base.update(overrides)
    return base


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load(paths, tokenizer=None, max_len=200, chat=False, bad=0.0, **kw):
    return load_prompt_dataset([str(p) for p in paths], tokenizer or make_tokenizer(), max_len,
                               chat, bad, "data.train_files", **kw)


def test_jsonl_and_parquet_round_trip(tmp_path: Path) -> None:
    rows = [row("a b", "1"), row("c d", "2", prompt="plain text"), row("e", "3")]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([r for r in rows if isinstance(r["prompt"], list)]),
                   parquet)
    read = read_rows(str(parquet))
    assert [n for n, _ in read] == [1, 2]
    assert read[0][1]["prompt"] == rows[0]["prompt"]
    examples, stats = load([jsonl, parquet])
    assert (stats.rows, stats.kept, stats.malformed, stats.too_long) == (5, 5, 0, 0)
    assert [e.ground_truth for e in examples] == ["1", "2", "3", "1", "3"]
    assert [e.index for e in examples] == [0, 1, 2, 3, 4]
    assert examples[0].extra_info == {"index": 7} and examples[0].data_source == "gsm8k"
    assert examples[0].prompt_ids == examples[3].prompt_ids


def test_chat_template_tokenisation_matches_manual(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    examples, _ = load([write_jsonl(tmp_path / "d.jsonl", [row("Hi there")])], tokenizer)
    by_hand = tokenizer("<user>Hi there\n<assistant>", add_special_tokens=False)["input_ids"]
    assert examples[0].prompt_ids == by_hand
    string_wrapped = tokenize_prompt("Hi there", tokenizer, apply_chat_template=True)
    assert string_wrapped == by_hand
    plain = tokenize_prompt("Hi there", tokenizer, apply_chat_template=False)
    assert plain == tokenizer("Hi there", add_special_tokens=False)["input_ids"]


def test_too_long_dropped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [row("short"), row("x" * 100)])
    examples, stats = load([path], max_len=40)
    assert len(examples) == 1 and stats.too_long == 1 and stats.kept == 1
    assert "data.max_prompt_length=40" in caplog.text
    with pytest.raises(ValueError, match=r"data.train_files.*no usable rows.*2 too long"):
        load([path], max_len=5)


def test_malformed_rows_reported_with_line_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [row(), "{not json", row(prompt=[]), row(reward_model={}), row(), "",
            row(prompt=[{"role": "user"}]), row(data_source=None)] + [row()] * 12
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        examples, stats = load([path], bad=0.5)
    assert stats.malformed == 5 and stats.rows == 19 and stats.kept == 14
    warnings = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 1
    for line in ("line 2", "line 3", "line 4", "line 7", "line 8"):
        assert line in warnings[0]
    with pytest.raises(ValueError, match=r"d\.jsonl.*line 2.*data.max_bad_row_fraction"):
        load([path], bad=0.1)
    examples, stats = load([path], bad=0.5, default_data_source="arithmetic")
    assert stats.malformed == 4 and examples[-1].data_source == "gsm8k"


def test_missing_file_names_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.val_files"):
        read_rows(str(tmp_path / "nope.jsonl"), "data.val_files")
    (tmp_path / "d.csv").write_text("a\n")
    with pytest.raises(ValueError, match="extension"):
        read_rows(str(tmp_path / "d.csv"), "data.train_files")


def test_empty_file_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="data.train_files.*no usable rows"):
        load([path])


def test_no_chat_template_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [row()])
    with pytest.raises(ValueError, match="no chat template.*data.apply_chat_template=false"):
        load([path], tokenizer=make_tokenizer(chat_template=None))
    plain = write_jsonl(tmp_path / "p.jsonl", [row(prompt="just text")])
    examples, _ = load([plain], tokenizer=make_tokenizer(chat_template=None))
    assert len(examples) == 1


def test_build_prompt_examples_bad_arguments() -> None:
    with pytest.raises(ValueError, match="data.max_prompt_length"):
        build_prompt_examples([], make_tokenizer(), 0, False, 0.0, "data.train_files")
