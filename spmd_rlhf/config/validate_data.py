"""The checks of the built-in task's knobs (``data.task``, ``data.shapes.*``). Part of ``validate``;
pure, before any process group. Whether ``model.path`` reads images is ``tasks/prompts.py``'s (it
needs the model's config)."""

from __future__ import annotations

from .checks import choice, positive
from .schema import Config, ConfigError

TASKS = ("arithmetic", "shapes")


def validate_task(cfg: Config) -> None:
    """Raise ``ConfigError`` for a built-in task the run cannot build."""
    choice(cfg.data.task, "data.task", TASKS)
    s = cfg.data.shapes
    choice(s.style, "data.shapes.style", ("padded", "chat"))
    positive(s.num_train, "data.shapes.num_train")
    positive(s.num_val, "data.shapes.num_val")
    if s.size < 28 or s.size % 28:
        raise ConfigError(f"data.shapes.size={s.size} must be a positive multiple of 28 (two 14-pixel patches "
                          "a side per cell of the 2x2 grid); set data.shapes.size=56")
    if cfg.data.task == "shapes" and not cfg.data.train_files and cfg.model.path is None:
        raise ConfigError("data.task=shapes needs a vision-language model.path (make one with `python "
                          "tools/make_tiny_model.py qwen2_5_vl outputs/tiny_qwen2_5_vl`); or recipe=tiny_qwen2_5_vl")
