"""Typed configuration (``schema``), its validation before any process group (``validate``), the
rank layout it implies (``layout``) and the defaults that depend on the device (``device_defaults``).

Nothing here imports torch, an engine or any other part of spmd_rlhf: every package may import it.
"""

from __future__ import annotations

from .context import check_context_length
from .device_defaults import DEFAULT_CUDA_MICRO_BATCH_TOKENS, compile_layers, micro_batch_tokens
from .keys import check_known_keys, schema_keys
from .layout import (check_tp_shapes, dedicated_generation_ranks, generation_replicas, generation_world, is_split,
                     training_world)
from .schema import (ADV_ESTIMATORS, ALGORITHMS, CODE_SCORES, ENGINES, KL_CONTROLLERS, KL_ESTIMATORS, LOSS_AGG_MODES,
                     MISSING, PLACEMENTS, POLICY_LOSSES, VLLM_DTYPES, WEIGHT_SYNC, AlgorithmConfig,
                     ArithmeticTaskConfig, Config, ConfigError, CriticConfig, DataConfig, DistributedConfig,
                     DynamicSamplingConfig, FilterConfig, KLGuardConfig, KLRewardConfig, LoggingConfig, ModelConfig,
                     OverlongConfig, RewardConfig, RewardModelConfig, RewardSandboxConfig, RolloutConfig,
                     SFTWarmupConfig, TrainerConfig, VLLMConfig, register_configs)
from .validate import validate

__all__ = [
    "ADV_ESTIMATORS", "ALGORITHMS", "CODE_SCORES", "DEFAULT_CUDA_MICRO_BATCH_TOKENS", "ENGINES", "KL_CONTROLLERS",
    "KL_ESTIMATORS", "LOSS_AGG_MODES", "MISSING", "PLACEMENTS", "POLICY_LOSSES", "VLLM_DTYPES", "WEIGHT_SYNC",
    "AlgorithmConfig", "ArithmeticTaskConfig", "Config", "ConfigError", "CriticConfig", "DataConfig",
    "DistributedConfig", "DynamicSamplingConfig", "FilterConfig", "KLGuardConfig", "KLRewardConfig", "LoggingConfig",
    "ModelConfig", "OverlongConfig", "RewardConfig", "RewardModelConfig", "RewardSandboxConfig", "RolloutConfig",
    "SFTWarmupConfig", "TrainerConfig", "VLLMConfig",
    "check_context_length", "check_known_keys", "check_tp_shapes", "compile_layers", "dedicated_generation_ranks",
    "generation_replicas", "generation_world", "is_split", "micro_batch_tokens", "register_configs", "schema_keys",
    "training_world", "validate",
]
