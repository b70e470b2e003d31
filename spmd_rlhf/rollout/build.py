"""``build_engine``: the rollout engine named by ``rollout.engine`` on the generation mesh."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from ..config import Config, ConfigError
from ..distributed.topology import Topology
from .base import RolloutEngine

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def engine_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """``auto``: bf16 on CUDA, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def vllm_max_model_len(cfg: Config, hf_config: PretrainedConfig) -> int:
    """``rollout.vllm.max_model_len``, or prompt + response budget capped by the model's positions."""
    if cfg.rollout.vllm.max_model_len is not None:
        return cfg.rollout.vllm.max_model_len
    budget = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    limit = getattr(hf_config, "max_position_embeddings", None)
    return min(budget, limit) if limit else budget


def build_engine(cfg: Config, topo: Topology, hf_config: PretrainedConfig, eos_ids: list[int],
                 pad_id: int, max_images: int = 0) -> RolloutEngine:
    """The engine of ``rollout.engine``; ``max_images``: the most images one prompt holds (vLLM's limit
    for a vision-language policy)."""
    if cfg.rollout.engine == "torch":
        from .torch_engine import TorchEngine

        return TorchEngine(hf_config, topo.gen_mesh, topo.device, engine_dtype(topo.device), eos_ids, pad_id,
                           max_batch_size=cfg.rollout.max_batch_size)
    if cfg.rollout.engine == "vllm":
        from .vllm_engine import VLLMEngine

        v = cfg.rollout.vllm
        return VLLMEngine(
            hf_config, topo.gen_mesh, topo.device, engine_dtype(topo.device, v.dtype), eos_ids,
            model_path=cfg.model.path, weight_sync=cfg.rollout.weight_sync, seed=cfg.rollout.seed,
            max_model_len=vllm_max_model_len(cfg, hf_config), max_num_seqs=v.max_num_seqs,
            max_num_batched_tokens=v.max_num_batched_tokens, enforce_eager=v.enforce_eager,
            gpu_memory_utilization=v.gpu_memory_utilization, kv_cache_gib=v.kv_cache_gib, sleep_level=v.sleep_level,
            enable_prefix_caching=v.enable_prefix_caching, trust_remote_code=cfg.model.trust_remote_code,
            log_level=v.log_level, seed_per_request=v.seed_per_request,
            lora_rank=cfg.model.lora.rank if cfg.model.lora.sync == "adapter" else 0, max_images=max_images,
        )
    raise ConfigError(f"rollout.engine={cfg.rollout.engine!r} is not available; set rollout.engine=torch")
