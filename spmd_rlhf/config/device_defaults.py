"""Settings whose null default depends on the device the run lands on (resolved after it is known)."""

from __future__ import annotations

from .schema import Config

# packed micro-batches on CUDA: 32k tokens measured 9 % faster at 1.5B but peaked at 93 GiB of activations
# without checkpointing, which leaves too little for the engine's KV cache (BENCHMARKS.md)
DEFAULT_CUDA_MICRO_BATCH_TOKENS = 16384


def micro_batch_tokens(cfg: Config, device_type: str, vision_language: bool = False) -> int:
    """``trainer.max_tokens_per_micro_batch``; null = packed micro-batches on CUDA, padded on CPU and
    for vision-language policies (``models/vlm.is_vision_language``; they pack when it is set, but
    packed image rows with compiled layers are not measured on GPUs yet)."""
    if cfg.trainer.max_tokens_per_micro_batch is not None:
        return cfg.trainer.max_tokens_per_micro_batch
    return DEFAULT_CUDA_MICRO_BATCH_TOKENS if device_type == "cuda" and not vision_language else 0


def compile_layers(cfg: Config, device_type: str, vision_language: bool = False) -> bool:
    """``model.compile_layers``; null = on CUDA when micro-batches are packed."""
    if cfg.model.compile_layers is not None:
        return cfg.model.compile_layers
    return device_type == "cuda" and micro_batch_tokens(cfg, device_type, vision_language) > 0
