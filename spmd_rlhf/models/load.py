"""Models and tokenizers: a Hugging Face directory (safetensors) or the embedded tiny model.

Training keeps fp32 master weights on every device; the compute dtype is chosen by
``parallelize`` (bf16 on CUDA, fp32 on CPU).
"""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from ..config import Config, ConfigError
from ..tasks import arithmetic


def load_tokenizer(cfg: Config):
    """The tokenizer of ``model.tokenizer_path`` (default ``model.path``), or the embedded one."""
    if cfg.model.path is None:
        return arithmetic.build_tokenizer()
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
    """The HF config of the policy: read from ``model.path`` or made for the embedded model."""
    if cfg.model.path is None:
        return arithmetic.tiny_model_config(
            vocab_size=len(tokenizer),
            hidden_size=cfg.model.hidden_size,
            num_layers=cfg.model.num_layers,
            num_heads=cfg.model.num_heads,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)


def build_causal_lm(cfg: Config, hf_config: PretrainedConfig, seed: int) -> torch.nn.Module:
    """Full-precision weights on the CPU: pretrained from ``model.path`` or a seeded random init."""
    if cfg.model.path is None:
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation="sdpa")
    if not any(name.endswith(".safetensors") for name in os.listdir(cfg.model.path)):
        raise ConfigError(f"model.path={cfg.model.path!r} has no *.safetensors weights")
    return AutoModelForCausalLM.from_pretrained(
        cfg.model.path,
        dtype=torch.float32,
        attn_implementation="sdpa",
        trust_remote_code=cfg.model.trust_remote_code,
    )


def eos_token_ids(tokenizer, hf_config: PretrainedConfig) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS plus the model's (which may be a list)."""
    ids = {tokenizer.eos_token_id}
    model_eos = getattr(hf_config, "eos_token_id", None)
    ids.update(model_eos if isinstance(model_eos, list) else [model_eos])
    return sorted(i for i in ids if i is not None)
