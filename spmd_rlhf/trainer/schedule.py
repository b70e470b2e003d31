"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

The multiplier of the base lr at optimizer step ``step`` (0-based) is

    (step + 1) / warmup_steps                                  step < warmup_steps
    m + (1 - m) * 0.5 * (1 + cos(pi * p)),                     otherwise,
        p = min(1, (step - warmup_steps) / (total_steps - warmup_steps))

with m = min_lr_ratio. Warmup starts at 1 / warmup_steps (not 0), so the
first step already trains; it reaches 1 on the last warmup step, and the
cosine starts from 1 on the step after. The multiplier is m from
``total_steps`` on. ``warmup_steps = 0`` means no warmup.
"""

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """lr multiplier at 0-based optimizer step ``step``."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps < warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must be >= warmup_steps ({warmup_steps})")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """LambdaLR applying ``cosine_with_warmup``; call ``.step()`` after each optimizer step."""
    cosine_with_warmup(0, warmup_steps, total_steps, min_lr_ratio)  # validate the arguments now
    return LambdaLR(optimizer, lambda step: cosine_with_warmup(step, warmup_steps, total_steps, min_lr_ratio))
