"""The checks of the rule reward's knobs (``reward.code_score``, ``reward.math_timeout_s``,
``reward.sandbox.*``). Part of ``validate``; pure, before any process group. Whether
``reward.custom_function`` imports is ``rewards.registry``'s (it needs the user's code).
"""

from __future__ import annotations

from .checks import choice, positive
from .schema import CODE_SCORES, Config


def validate_reward(cfg: Config) -> None:
    """Raise ``ConfigError`` for a reward knob the scorer cannot use."""
    r, s = cfg.reward, cfg.reward.sandbox
    choice(r.code_score, "reward.code_score", CODE_SCORES)
    positive(r.math_timeout_s, "reward.math_timeout_s")
    for key, value in [("reward.sandbox.timeout_s", s.timeout_s), ("reward.sandbox.memory_mb", s.memory_mb),
                       ("reward.sandbox.max_output_bytes", s.max_output_bytes),
                       ("reward.sandbox.max_processes", s.max_processes),
                       ("reward.sandbox.max_file_mb", s.max_file_mb)]:
        positive(value, key)
    for key, value in [("reward.sandbox.workers", s.workers), ("reward.sandbox.cpu_s", s.cpu_s)]:
        if value is not None:
            positive(value, key)
