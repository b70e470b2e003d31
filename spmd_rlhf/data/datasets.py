"""Prompt datasets in verl's row format, read from JSON lines or parquet and tokenised.

A row looks like::

    {"prompt": [{"role": "user", "content": "..."}] | "plain string",
     "data_source": "gsm8k",
     "reward_model": {"ground_truth": "72", "style": "rule"},
     "extra_info": {...},
     "images": [path | bytes | {"bytes": ..., "path": ...}, ...]}   (optional: vision-language models)

A row with ``images`` goes through the chat template: each ``<image>`` in its message text becomes an
image content part (messages already given as content parts pass as they are), and each image's one
placeholder token is expanded to its patch count (``data/vision.py``). Paths are relative to the data
file's directory. The images stay at rest (``ImageSources``: encoded bytes or paths, and grids from
their headers) until a step draws the prompt: ``with_pixels`` then decodes and processes them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .vision import IMAGE_MARK, ImageProcessing, ImageSources, VisionInputs

logger = logging.getLogger(__name__)

_MAX_LINES_SHOWN = 5


@dataclass
class PromptExample:
    """One tokenised prompt with what its reward needs. ``index`` is its position in the loaded
    dataset (unique across files)."""

    prompt_ids: list[int]
    data_source: str
    ground_truth: str
    extra_info: dict = field(default_factory=dict)
    index: int = 0
    # the prompt's images (its ids hold their expanded placeholders): at rest in a dataset, processed
    # (``with_pixels``) for the step that draws the prompt
    vision: ImageSources | VisionInputs | None = None


def with_pixels(examples: list[PromptExample]) -> list[PromptExample]:
    """``examples`` with their images decoded and processed, each distinct prompt once (copies; a
    repeated prompt stays one object): the step's prompts, which engines and training batches read.
    Prompts without images, or already processed, pass as they are."""
    return _each_prompt_once(examples, lambda e: replace(e, vision=e.vision.load())
                             if isinstance(e.vision, ImageSources) else e)


def example_state(example: PromptExample) -> dict:
    """A prompt as plain values (a checkpoint's), its images at rest."""
    (rest,) = at_rest([example])
    assert rest.vision is None or isinstance(rest.vision, ImageSources), "images made without their sources"
    return {**{f.name: getattr(rest, f.name) for f in fields(rest) if f.name != "vision"},
            "vision": None if rest.vision is None else rest.vision.state()}


def example_from_state(state: dict) -> PromptExample:
    vision = state.get("vision")
    return PromptExample(**{**state, "vision": None if vision is None else ImageSources.from_state(vision)})


def at_rest(examples: list[PromptExample]) -> list[PromptExample]:
    """``examples`` with processed images back at rest (what a prompt kept beyond its step holds)."""
    return _each_prompt_once(examples, lambda e: replace(e, vision=e.vision.sources)
                             if isinstance(e.vision, VisionInputs) and e.vision.sources is not None else e)


def _each_prompt_once(examples: list[PromptExample], change) -> list[PromptExample]:
    """``change(e)`` of each distinct prompt object once, in ``examples``' order (a repeated prompt
    stays one object)."""
    done: dict[int, PromptExample] = {}
    for e in examples:
        if id(e) not in done:
            done[id(e)] = change(e)
    return [done[id(e)] for e in examples]


@dataclass
class DatasetStats:
    """Row counts of a loaded dataset: every row is kept, malformed or too long."""

    rows: int = 0
    kept: int = 0
    malformed: int = 0
    too_long: int = 0

    def __add__(self, other: DatasetStats) -> DatasetStats:
        return DatasetStats(
            self.rows + other.rows,
            self.kept + other.kept,
            self.malformed + other.malformed,
            self.too_long + other.too_long,
        )


def _json_lines(path: str) -> list[tuple[int, dict | Exception]]:
    """Rows of a JSON-lines file; a line that is not a JSON object yields its exception."""
    rows: list[tuple[int, dict | Exception]] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                rows.append((line_no, exc))
                continue
            if isinstance(row, dict):
                rows.append((line_no, row))
            else:
                rows.append((line_no, ValueError(f"not a JSON object but {type(row).__name__}")))
    return rows


def _parquet_rows(path: str) -> list[tuple[int, dict | Exception]]:
    """Rows of a parquet file, numbered from 1."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return [(i + 1, row) for i, row in enumerate(table.to_pylist())]


def read_rows(path: str, key: str = "data.train_files") -> list[tuple[int, dict | Exception]]:
    """``(line number, row or parse error)`` for each row of a ``.jsonl``/``.json``/``.parquet`` file.

    ``key`` is the config key that named the file, used in error messages.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: file {path!r} does not exist; fix the path in {key}")
    extension = os.path.splitext(path)[1].lower()
    if extension in (".jsonl", ".json"):
        return _json_lines(path)
    if extension == ".parquet":
        return _parquet_rows(path)
    raise ValueError(
        f"{key}: {path!r} has extension {extension!r}; use .jsonl, .json (one object per line) "
        f"or .parquet"
    )


def _check_prompt(prompt: Any) -> str | None:
    """Why ``prompt`` is unusable, or None if it is a non-empty string or a list of messages."""
    if isinstance(prompt, str):
        return None if prompt.strip() else "prompt is an empty string"
    if not isinstance(prompt, Sequence) or isinstance(prompt, bytes):
        return f"prompt must be a string or a list of messages, got {type(prompt).__name__}"
    if not prompt:
        return "prompt is an empty list of messages"
    for i, message in enumerate(prompt):
        if not isinstance(message, Mapping):
            return f"prompt[{i}] is {type(message).__name__}, expected {{'role', 'content'}}"
        if not isinstance(message.get("role"), str) or not _is_content(message.get("content")):
            return f"prompt[{i}] needs a string 'role' and a 'content' string or list of parts"
    return None


def _is_content(content: Any) -> bool:
    """A message's content: a string, or a list of ``{"type": ...}`` parts."""
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(isinstance(p, Mapping) and isinstance(p.get("type"), str)
                                             for p in content)


def _parse_row(row: dict, default_data_source: str | None) -> tuple[Any, str, str, dict, list] | str:
    """``(prompt, data_source, ground_truth, extra_info, images)`` of a row, or why it is malformed."""
    if "prompt" not in row or row["prompt"] is None:
        return "missing 'prompt'"
    reason = _check_prompt(row["prompt"])
    if reason:
        return reason
    data_source = row.get("data_source") or default_data_source
    if not isinstance(data_source, str):
        return "'data_source' is missing or not a string (or set a default data source)"
    reward_model = row.get("reward_model")
    truth = reward_model.get("ground_truth") if isinstance(reward_model, Mapping) else None
    if isinstance(truth, bool) or not isinstance(truth, (str, int, float)) or not str(truth).strip():
        return "missing 'reward_model.ground_truth' (a string or number)"
    extra_info = row.get("extra_info")
    if extra_info is not None and not isinstance(extra_info, Mapping):
        return f"'extra_info' must be an object, got {type(extra_info).__name__}"
    images = row.get("images")
    if images is not None and not isinstance(images, (list, tuple)):
        return f"'images' must be a list, got {type(images).__name__}"
    return row["prompt"], data_source, str(truth), dict(extra_info or {}), list(images or [])


def _ids_of(encoded: Any) -> list[int]:
    """Token ids from whatever ``apply_chat_template``/``__call__`` returned."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], (list, tuple)):  # a batch of one
        encoded = encoded[0]
    return [int(t) for t in encoded]


def tokenize_prompt(prompt: str | list[dict], tokenizer: Any, apply_chat_template: bool) -> list[int]:
    """Token ids of a prompt: messages (or a string when ``apply_chat_template``) go through the
    tokenizer's chat template with a generation prompt; other strings are tokenised plainly."""
    if isinstance(prompt, str) and not apply_chat_template:
        return _ids_of(tokenizer(prompt, add_special_tokens=False))
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the tokenizer has no chat template, but the prompts need one (message-list prompts, "
            "or data.apply_chat_template=true); use a tokenizer with a chat template, or string "
            "prompts with data.apply_chat_template=false"
        )
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    messages = [dict(m) for m in messages]
    return _ids_of(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    )


def image_messages(prompt: str | list) -> list[dict]:
    """A row's prompt as messages whose ``<image>`` marks are image content parts (verl's convention);
    content already given as parts, and text without marks, pass as they are."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    for message in messages:
        content = message["content"]
        if not isinstance(content, str) or IMAGE_MARK not in content:
            continue
        parts: list[dict] = []
        for i, text in enumerate(content.split(IMAGE_MARK)):
            parts += [{"type": "image"}] if i else []
            parts += [{"type": "text", "text": text}] if text else []
        message["content"] = parts
    return messages


def _encode(prompt: Any, items: list, tokenizer: Any, apply_chat_template: bool, images: ImageProcessing | None,
            base_dir: str | None) -> tuple[list[int], ImageSources | None] | str:
    """A row's prompt ids (placeholders expanded) and images at rest, or why the row is malformed."""
    if not items:
        return tokenize_prompt(prompt, tokenizer, apply_chat_template), None
    if images is None:
        return "the row has images, but the model is text-only (model.path has no vision config)"
    ids = tokenize_prompt(image_messages(prompt), tokenizer, True)
    try:
        return images.prompt_at_rest(ids, items, base_dir)
    except ValueError as err:
        return str(err)


def _check_args(max_prompt_length: int, max_bad_fraction: float) -> None:
    if max_prompt_length <= 0:
        raise ValueError(f"data.max_prompt_length={max_prompt_length} must be > 0")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"data.max_bad_row_fraction={max_bad_fraction} must be in [0, 1]")


def _report_malformed(bad: list[tuple[int, str]], stats: DatasetStats, source: str,
                      max_bad_fraction: float) -> None:
    """Warn once about malformed rows; raise if there are more than ``max_bad_fraction``."""
    if not bad:
        return
    shown = "; ".join(f"line {n}: {reason}" for n, reason in bad[:_MAX_LINES_SHOWN])
    more = f" (and {len(bad) - _MAX_LINES_SHOWN} more)" if len(bad) > _MAX_LINES_SHOWN else ""
    fraction = len(bad) / stats.rows
    if fraction > max_bad_fraction:
        raise ValueError(
            f"{source}: {len(bad)} of {stats.rows} rows are malformed ({fraction:.1%} > "
            f"data.max_bad_row_fraction={max_bad_fraction}): {shown}{more}. Fix the rows or "
            f"raise data.max_bad_row_fraction"
        )
    logger.warning("%s: skipped %d malformed rows: %s%s", source, len(bad), shown, more)


def _check_not_raw_gsm8k(rows: list[tuple[int, dict | Exception]], key: str, source: str) -> None:
    """Refuse a file of raw GSM8K rows (``question``/``answer``, no ``prompt``) with the one tool
    that converts it, instead of reporting every row as malformed."""
    first = next((row for _, row in rows if isinstance(row, dict)), None)
    if first is None or "prompt" in first or not {"question", "answer"} <= set(first):
        return
    raise ValueError(
        f"{key}: {source} holds raw GSM8K rows (question/answer), not prompts in verl's format; convert it with "
        f"`python tools/prepare_gsm8k.py --input {source} --out-dir data/gsm8k` and set "
        f"{key}=[data/gsm8k/{'train' if 'train' in key else 'test'}.jsonl]"
    )


def build_prompt_examples(
    rows: list[tuple[int, dict | Exception]],
    tokenizer: Any,
    max_prompt_length: int,
    apply_chat_template: bool,
    max_bad_fraction: float,
    key: str,
    default_data_source: str | None = None,
    source: str = "<rows>",
    images: ImageProcessing | None = None,
) -> tuple[list[PromptExample], DatasetStats]:
    """Tokenise valid rows, dropping (and counting) malformed ones and prompts longer than
    ``max_prompt_length`` tokens. ``key``/``source`` name the config key and file in errors;
    ``images`` reads the rows' images (a vision-language model; kept at rest), relative to ``source``'s
    directory."""
    _check_args(max_prompt_length, max_bad_fraction)
    _check_not_raw_gsm8k(rows, key, source)
    stats = DatasetStats(rows=len(rows))
    examples: list[PromptExample] = []
    bad: list[tuple[int, str]] = []
    base_dir = os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else None
    for line_no, row in rows:
        if isinstance(row, Exception):
            parsed: tuple[Any, str, str, dict, list] | str = f"unreadable ({row})"
        else:
            parsed = _parse_row(row, default_data_source)
        if isinstance(parsed, str):
            bad.append((line_no, parsed))
            continue
        prompt, data_source, truth, extra_info, items = parsed
        encoded = _encode(prompt, items, tokenizer, apply_chat_template, images, base_dir)
        if isinstance(encoded, str):
            bad.append((line_no, encoded))
            continue
        ids, vision = encoded
        if len(ids) > max_prompt_length:
            stats.too_long += 1
            continue
        examples.append(PromptExample(ids, data_source, truth, extra_info, len(examples), vision))
    stats.malformed = len(bad)
    stats.kept = len(examples)
    _report_malformed(bad, stats, source, max_bad_fraction)
    if stats.too_long:
        logger.warning("%s: dropped %d prompts longer than data.max_prompt_length=%d tokens",
                       source, stats.too_long, max_prompt_length)
    if not examples:
        raise ValueError(
            f"{key}: {source} has no usable rows ({stats.rows} rows, {stats.malformed} malformed, "
            f"{stats.too_long} too long for data.max_prompt_length={max_prompt_length})"
        )
    return examples, stats


def load_prompt_dataset(
    paths: list[str] | str,
    tokenizer: Any,
    max_prompt_length: int,
    apply_chat_template: bool,
    max_bad_fraction: float,
    key: str,
    default_data_source: str | None = None,
    images: ImageProcessing | None = None,
) -> tuple[list[PromptExample], DatasetStats]:
    """Read and tokenise every file in ``paths`` (named by config key ``key``) and concatenate
    them; ``index`` is renumbered over the whole result and the stats are summed."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError(f"{key} is empty; give at least one .jsonl/.json/.parquet file")
    examples: list[PromptExample] = []
    stats = DatasetStats()
    for path in paths:
        file_examples, file_stats = build_prompt_examples(
            read_rows(path, key), tokenizer, max_prompt_length, apply_chat_template,
            max_bad_fraction, key, default_data_source, source=path, images=images,
        )
        examples.extend(file_examples)
        stats = stats + file_stats
    for i, example in enumerate(examples):
        example.index = i
    return examples, stats
