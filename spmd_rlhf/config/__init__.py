"""Typed configuration (``schema``), its validation before any process group (``validate``), the
rank layout it implies (``layout``) and the defaults that depend on the device (``device_defaults``).

Nothing here imports torch, an engine or any other part of spmd_rlhf: every package may import it.
"""

from __future__ import annotations

from .device_defaults import DEFAULT_CUDA_MICRO_BATCH_TOKENS, compile_layers, micro_batch_tokens
from .layout import (check_tp_shapes, dedicated_generation_ranks, generation_replicas, generation_world, is_split,
                     training_world)
from .schema import (ADV_ESTIMATORS, ALGORITHMS, ENGINES, KL_CONTROLLERS, KL_ESTIMATORS, LOSS_AGG_MODES, MISSING,
                     PLACEMENTS, POLICY_LOSSES, VLLM_DTYPES, WEIGHT_SYNC, AlgorithmConfig, ArithmeticTaskConfig, Config,
                     ConfigError, CriticConfig, DataConfig, DistributedConfig, DynamicSamplingConfig, FilterConfig,
                     KLGuardConfig, KLRewardConfig, LoggingConfig, ModelConfig, OverlongConfig, RewardConfig,
                     RewardModelConfig, RolloutConfig, SFTWarmupConfig, TrainerConfig, VLLMConfig, register_configs)
from .validate import validate

__all__ = [
    "ADV_ESTIMATORS", "ALGORITHMS", "DEFAULT_CUDA_MICRO_BATCH_TOKENS", "ENGINES", "KL_CONTROLLERS", "KL_ESTIMATORS",
    "LOSS_AGG_MODES", "MISSING", "PLACEMENTS", "POLICY_LOSSES", "VLLM_DTYPES", "WEIGHT_SYNC",
    "AlgorithmConfig", "ArithmeticTaskConfig", "Config", "ConfigError", "CriticConfig", "DataConfig",
    "DistributedConfig", "DynamicSamplingConfig", "FilterConfig", "KLGuardConfig", "KLRewardConfig", "LoggingConfig",
    "ModelConfig", "OverlongConfig", "RewardConfig", "RewardModelConfig", "RolloutConfig", "SFTWarmupConfig",
    "TrainerConfig", "VLLMConfig",
    "check_tp_shapes", "compile_layers", "dedicated_generation_ranks", "generation_replicas", "generation_world",
    "is_split", "micro_batch_tokens", "register_configs", "training_world", "validate",
]
