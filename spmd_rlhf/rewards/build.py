"""The run's ``RewardScorer`` from the ``reward.*`` config: one call for ``train.run``."""

from __future__ import annotations

from ..config import RewardConfig
from ..sandbox import SandboxLimits
from .registry import RewardScorer


def sandbox_limits(reward_cfg: RewardConfig) -> SandboxLimits:
    """The limits of each sandboxed program, from ``reward.sandbox.*``."""
    s = reward_cfg.sandbox
    return SandboxLimits(timeout_s=s.timeout_s, cpu_s=s.cpu_s, memory_mb=s.memory_mb,
                         max_output_bytes=s.max_output_bytes, max_processes=s.max_processes, max_file_mb=s.max_file_mb)


def build_scorer(reward_cfg: RewardConfig) -> RewardScorer:
    """The scorer of a run: ``reward.custom_function`` / built-ins by data source, ``reward.timeout_s``,
    ``reward.default_source``, and the sandbox pools' knobs (``reward.sandbox.*``, ``reward.code_score``,
    ``reward.math_timeout_s``). The pools start on the first sandboxed row; ``close()`` ends them."""
    return RewardScorer(
        reward_cfg.custom_function, reward_cfg.timeout_s, reward_cfg.default_source,
        sandbox_limits=sandbox_limits(reward_cfg), sandbox_workers=reward_cfg.sandbox.workers,
        code_score=reward_cfg.code_score, math_timeout_s=reward_cfg.math_timeout_s,
        sandbox_custom=reward_cfg.sandbox.custom_function,
    )
