"""Models and tokenizers: a Hugging Face directory (safetensors) or the embedded tiny model.

Training keeps fp32 master weights on every device; the compute dtype is chosen by
``parallelize`` (bf16 on CUDA, fp32 on CPU).
"""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from ..config import Config, ConfigError
from ..tasks import arithmetic
from .vlm import model_class, text_config


def load_tokenizer(cfg: Config):
    """The tokenizer of ``model.tokenizer_path`` (default ``model.path``), or the embedded one."""
    if cfg.model.path is None:  # the tools style adds the tool-call tokens and a chat template for tool messages
        return arithmetic.build_tokenizer(tools=cfg.data.arithmetic.style == "tools")
    path = cfg.model.tokenizer_path or cfg.model.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"could not load a tokenizer from {path!r} ({err}); set model.tokenizer_path to a directory with "
            "tokenizer files"
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(cfg: Config, tokenizer) -> PretrainedConfig:
    """The HF config of the policy: read from ``model.path`` (whose weight files' headers are
    checked first, cheaply: a truncated download fails here, before any process group) or made
    for the embedded model."""
    if cfg.model.path is None:
        return arithmetic.tiny_model_config(
            vocab_size=len(tokenizer),
            hidden_size=cfg.model.hidden_size,
            num_layers=cfg.model.num_layers,
            num_heads=cfg.model.num_heads,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    check_weight_files(cfg.model.path)
    return AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)


def max_positions(hf_config: PretrainedConfig) -> int | None:
    """The longest sequence (prompt + response) the model has positions for; None if its config does not say."""
    return getattr(text_config(hf_config), "max_position_embeddings", None)


def check_weight_files(path: str, key: str = "model.path") -> None:
    """Raise ``ConfigError`` naming ``key`` and the file unless every ``*.safetensors`` file of
    ``path`` is whole: its header readable and the file as long as the tensors it describes, and
    every shard an index names present. Reads a few bytes per file, never the weights."""
    if not os.path.isdir(path):
        raise ConfigError(f"{key}={path!r} is not a directory; set {key} to a Hugging Face model directory")
    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not names:
        raise ConfigError(f"{key}={path!r} has no *.safetensors weights; set {key} to a directory with "
                          "config.json and safetensors files (tools/convert_smollm2.py makes one)")
    for name in names:
        _check_safetensors(os.path.join(path, name), key)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = set(json.load(f).get("weight_map", {}).values())
        missing = sorted(shards - set(names))
        if missing:
            raise ConfigError(f"{key}: {index} names shards that are missing: {', '.join(missing)}; download them "
                              f"or set {key} to a complete model directory")


def _check_safetensors(file: str, key: str) -> None:
    """A safetensors file: 8 bytes of header length, the JSON header, then the tensor bytes."""
    size = os.path.getsize(file)
    fix = f"download or convert the model again, or set {key} to a complete model directory"
    with open(file, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_len < 2 or 8 + header_len > size:
            raise ConfigError(f"{key}: {file} is truncated or not a safetensors file ({size} bytes; no complete "
                              f"header); {fix}")
        try:
            header = json.loads(f.read(header_len))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ConfigError(f"{key}: {file} has a corrupt safetensors header ({err}); {fix}") from None
    if 8 + header_len + end > size:
        raise ConfigError(f"{key}: {file} is truncated ({size} bytes, its header describes "
                          f"{8 + header_len + end}); {fix}")


def build_causal_lm(cfg: Config, hf_config: PretrainedConfig, seed: int) -> torch.nn.Module:
    """Full-precision weights on the CPU: pretrained from ``model.path`` or a seeded random init
    (a vision-language policy with its vision tower: ``vlm.model_class``)."""
    if cfg.model.path is None:
        torch.manual_seed(seed)
        return model_class(hf_config).from_config(hf_config, dtype=torch.float32, attn_implementation="sdpa")
    if not any(name.endswith(".safetensors") for name in os.listdir(cfg.model.path)):
        raise ConfigError(f"model.path={cfg.model.path!r} has no *.safetensors weights")
    model = model_class(hf_config).from_pretrained(
        cfg.model.path,
        dtype=torch.float32,
        attn_implementation="sdpa",
        trust_remote_code=cfg.model.trust_remote_code,
    )
    model.config.dtype = saved_dtype(cfg.model.path) or torch.float32  # checkpoints export in the model's own
    return model


def saved_dtype(path: str) -> torch.dtype | None:
    """The dtype a model directory's config.json names (``dtype``, or ``torch_dtype`` of older files)."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def eos_token_ids(tokenizer, hf_config: PretrainedConfig) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS plus the model's (which may be a list)."""
    ids = {tokenizer.eos_token_id}
    model_eos = getattr(text_config(hf_config), "eos_token_id", None)
    ids.update(model_eos if isinstance(model_eos, list) else [model_eos])
    return sorted(i for i in ids if i is not None)
