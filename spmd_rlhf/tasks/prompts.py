"""The run's prompts: files in verl's format, or the built-in task ``data.task`` (arithmetic, or
shapes for a vision-language policy), and the built-in task's warm-start demonstrations.

A vision-language ``model.path`` reads the rows' images with its own image processor
(``data/vision.py``); its prompts carry them at rest (``ImageSources``: sources and grids), processed
when a step draws them (``datasets.with_pixels``).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from ..config import Config, ConfigError
from ..data.datasets import PromptExample, build_prompt_examples, load_prompt_dataset
from ..data.vision import ImageProcessing, load_image_processing
from ..models.vlm import image_token_id, is_vision_language, spatial_merge_size
from .arithmetic import AdditionTask
from .shapes import ShapesTask


def arithmetic_task(cfg: Config) -> AdditionTask:
    a = cfg.data.arithmetic
    return AdditionTask(digits=a.digits, num_val=a.num_val, carry_drop_prob=a.carry_drop_prob, seed=a.seed,
                        style=a.style)


def shapes_task(cfg: Config) -> ShapesTask:
    s = cfg.data.shapes
    return ShapesTask(size=s.size, num_train=s.num_train, num_val=s.num_val, seed=s.seed, style=s.style)


def image_processing(cfg: Config, hf_config: PretrainedConfig) -> ImageProcessing | None:
    """The policy's image processing (a vision-language ``model.path``), else None."""
    if cfg.model.path is None or not is_vision_language(hf_config):
        return None
    return load_image_processing(cfg.model.path, image_token_id(hf_config), spatial_merge_size(hf_config))


def load_data(cfg: Config, tokenizer, hf_config: PretrainedConfig) -> tuple[list[PromptExample], list[PromptExample]]:
    """Training and held-out prompts: files in verl's format, or the built-in task."""
    d = cfg.data
    images = image_processing(cfg, hf_config)
    if d.task == "shapes" and not d.train_files and images is None:
        raise ConfigError(f"data.task=shapes needs a vision-language model.path, but {cfg.model.path!r} reads no "
                          "images; make one with `python tools/make_tiny_model.py qwen2_5_vl DIR`")
    common = dict(tokenizer=tokenizer, max_prompt_length=d.max_prompt_length, apply_chat_template=d.apply_chat_template,
                  max_bad_fraction=d.max_bad_row_fraction, default_data_source=d.default_data_source, images=images)
    if not d.train_files:
        train_rows, val_rows = (shapes_task(cfg) if d.task == "shapes" else arithmetic_task(cfg)).rows()
        train, _ = build_prompt_examples(list(enumerate(train_rows, start=1)), key="data.train_files", **common)
        val, _ = build_prompt_examples(list(enumerate(val_rows, start=1)), key="data.val_files", **common)
    else:
        train, _ = load_prompt_dataset(d.train_files, key="data.train_files", **common)
        val = load_prompt_dataset(d.val_files, key="data.val_files", **common)[0] if d.val_files else []
    check_images(cfg, train)
    return train, val[: d.max_val_examples]


def check_images(cfg: Config, examples: list[PromptExample]) -> None:
    """Refuse what does not take prompts with images yet."""
    if cfg.rollout.multi_turn.enable and any(e.vision is not None for e in examples):
        raise ConfigError("rollout.multi_turn.enable=true does not take prompts with images yet; set "
                          "rollout.multi_turn.enable=false or use rows without images")


def max_images(examples: list[PromptExample]) -> int:
    """The most images one prompt holds (vLLM's per-prompt limit)."""
    return max((e.vision.num_images for e in examples if e.vision is not None), default=0)


def sft_demonstrations(cfg: Config, tokenizer) -> list[tuple[list[int], list[int]]]:
    """The embedded arithmetic task's warm-start demonstrations: (prompt ids, answer ids + EOS)."""
    count = cfg.trainer.sft.steps * cfg.trainer.sft.batch_size
    demos = arithmetic_task(cfg).demonstrations(count, seed=cfg.trainer.seed + 1)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    return [(encode(p), encode(a) + [tokenizer.eos_token_id]) for p, a in demos]
