"""``models.load``: a damaged model directory is named (key and file) before anything is loaded, and
a pretrained model keeps its own dtype in the config that checkpoints export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from spmd_rlhf.config import Config, ConfigError
from spmd_rlhf.models.load import build_causal_lm, check_weight_files, model_config, saved_dtype


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A tiny bf16 Qwen2 directory as a download leaves it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_a_whole_directory_passes_and_keeps_its_dtype(model_dir: Path) -> None:
    check_weight_files(str(model_dir))
    assert saved_dtype(str(model_dir)) == torch.bfloat16
    cfg = Config()
    cfg.model.path = str(model_dir)
    model = build_causal_lm(cfg, model_config(cfg, None), seed=0)
    assert next(model.parameters()).dtype == torch.float32, "training keeps fp32 masters"
    assert model.config.dtype == torch.bfloat16, "the config a checkpoint saves names the model's own dtype"


def test_a_truncated_file_is_named(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ConfigError) as err:
        check_weight_files(str(model_dir))
    message = str(err.value)
    assert message.startswith("model.path:") and str(weights) in message and "truncated" in message
    assert f"{len(data) - 1000} bytes, its header describes {len(data)}" in message
    cfg = Config()
    cfg.model.path = str(model_dir)
    with pytest.raises(ConfigError, match="truncated"):  # model_config runs before any process group
        model_config(cfg, None)


@pytest.mark.parametrize("damage", ["header cut", "not json", "empty"])
def test_a_corrupt_header_is_named(model_dir: Path, damage: str) -> None:
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    broken = {"header cut": data[: 8 + header_len // 2], "empty": b"",
              "not json": data[:8] + b"{" * header_len + data[8 + header_len:]}[damage]
    weights.write_bytes(broken)
    with pytest.raises(ConfigError) as err:
        check_weight_files(str(model_dir), key="reward.model.path")
    assert str(err.value).startswith("reward.model.path:") and str(weights) in str(err.value)


def test_a_missing_shard_and_missing_weights(model_dir: Path, tmp_path: Path) -> None:
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                           "b": "model-00002-of-00002.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"a": torch.zeros(2)}, str(model_dir / "model-00001-of-00002.safetensors"))
    with pytest.raises(ConfigError, match="model-00002-of-00002.safetensors"):
        check_weight_files(str(model_dir))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model\.path=.*has no \*\.safetensors"):
        check_weight_files(str(tmp_path / "empty"))
