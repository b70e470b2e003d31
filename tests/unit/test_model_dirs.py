"""``check_model_dir``: every wrong directory is a ConfigError (a ValueError) that names the key."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from spmd_rlhf.config import ConfigError
from spmd_rlhf.models.heads import check_model_dir
from spmd_rlhf.tasks.arithmetic import build_tokenizer, tiny_model_config

KEY = "reward.model.path"


def save_model(path, vocab_size: int, with_tokenizer: bool) -> None:
    tokenizer = build_tokenizer()
    config = tiny_model_config(vocab_size, 32, 1, 2, tokenizer.pad_token_id, tokenizer.eos_token_id)
    config.num_labels = 1
    AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).save_pretrained(path)
    if with_tokenizer:
        tokenizer.save_pretrained(path)


@pytest.fixture
def good_dir(tmp_path):
    path = tmp_path / "rm"
    save_model(path, len(build_tokenizer()), with_tokenizer=True)
    return path


def test_a_good_directory_gives_its_config(good_dir):
    config = check_model_dir(str(good_dir), KEY, build_tokenizer())
    assert config.num_labels == 1 and config.vocab_size == len(build_tokenizer())


def test_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match=rf"{KEY}=.*is not a directory"):
        check_model_dir(str(tmp_path / "nowhere"), KEY)


def test_no_config_json(good_dir):
    (good_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match=rf"{KEY}=.*no config.json"):
        check_model_dir(str(good_dir), KEY)


def test_no_safetensors(good_dir):
    (good_dir / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=rf"{KEY}=.*no \*.safetensors"):
        check_model_dir(str(good_dir), KEY)


def test_unreadable_config(good_dir):
    (good_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"critic.init_from=.*config.json cannot be read"):
        check_model_dir(str(good_dir), "critic.init_from")


def test_vocabulary_smaller_than_the_policy_tokenizer(tmp_path):
    save_model(tmp_path / "small", len(build_tokenizer()) - 3, with_tokenizer=False)
    with pytest.raises(ConfigError, match=rf"{KEY}=.*vocab_size=12 .* 15 tokens.*share one tokenizer"):
        check_model_dir(str(tmp_path / "small"), KEY, build_tokenizer())
    check_model_dir(str(tmp_path / "small"), KEY)  # without a tokenizer to compare, the directory is fine


def test_padded_vocabulary_without_tokenizer_files_passes(tmp_path):
    save_model(tmp_path / "padded", len(build_tokenizer()) + 17, with_tokenizer=False)
    assert check_model_dir(str(tmp_path / "padded"), KEY, build_tokenizer()).vocab_size == 32


def test_shipped_tokenizer_with_another_vocabulary(tmp_path):
    save_model(tmp_path / "rm", len(build_tokenizer()) + 5, with_tokenizer=True)  # room for every policy id
    other = build_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ConfigError, match=rf"{KEY}=.*vocabulary differs from the policy's"):
        check_model_dir(str(tmp_path / "rm"), KEY, other)
