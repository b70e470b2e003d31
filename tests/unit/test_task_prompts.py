"""The run's prompts (``tasks/prompts.py``): ``data.task=shapes`` on a vision-language model directory,
and the configuration errors around it, all before any process group."""

from __future__ import annotations

import importlib.util

import pytest
from transformers import AutoConfig, AutoTokenizer

from spmd_rlhf.config import Config, ConfigError, validate
from spmd_rlhf.tasks.prompts import load_data, max_images
from tests.launch import REPO_ROOT

_spec = importlib.util.spec_from_file_location("make_tiny_model", REPO_ROOT / "tools" / "make_tiny_model.py")
make_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tiny)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: make_tiny.make_tiny_model(family, str(root / family)) for family in ("qwen2_5_vl", "qwen2")}


def shapes_config(path: str | None) -> Config:
    cfg = Config()
    cfg.model.path, cfg.data.task = path, "shapes"
    cfg.data.shapes.num_train, cfg.data.shapes.num_val = 24, 8
    return cfg


def loaded(cfg: Config):
    return load_data(cfg, AutoTokenizer.from_pretrained(cfg.model.path), AutoConfig.from_pretrained(cfg.model.path))


def test_shapes_prompts_carry_their_images(dirs):
    train, val = loaded(shapes_config(dirs["qwen2_5_vl"]))
    assert len(train) == 24 and len(val) == 8
    assert all(e.vision is not None and e.vision.num_images == 1 and e.data_source == "shapes" for e in train + val)
    assert all(e.prompt_ids.count(17) == 4 for e in train)  # 56 pixels: four merged image tokens
    assert {e.ground_truth for e in train} <= {"1", "2", "3", "4"}
    assert max_images(train) == 1 and max_images([]) == 0


def test_configuration_errors(dirs):
    with pytest.raises(ConfigError, match="data.task=shapes needs a vision-language model.path"):
        validate(shapes_config(None), 1)
    cfg = shapes_config(dirs["qwen2_5_vl"])
    cfg.data.shapes.size = 50
    with pytest.raises(ConfigError, match="data.shapes.size=50 must be a positive multiple of 28"):
        validate(cfg, 1)
    cfg = shapes_config(dirs["qwen2_5_vl"])
    cfg.data.task = "counting"
    with pytest.raises(ConfigError, match="data.task='counting' is not one of"):
        validate(cfg, 1)
    with pytest.raises(ConfigError, match="needs a vision-language model.path, but .*qwen2' reads no images"):
        loaded(shapes_config(dirs["qwen2"]))
    cfg = shapes_config(dirs["qwen2_5_vl"])
    cfg.rollout.multi_turn.enable = True
    with pytest.raises(ConfigError, match="rollout.multi_turn.enable=true does not take prompts with images"):
        loaded(cfg)
