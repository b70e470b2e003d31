"""Supervised warm start: next-token cross-entropy on (prompt, answer) demonstrations.

Runs on the sharded actor before RL, with its own AdamW and warmup-cosine schedule. The loss is
the token mean over the GLOBAL batch (see ``actor.py``), so it is the same function on any
number of ranks. Each rank takes its slice of every global batch of demonstrations.
"""

from __future__ import annotations

import time

import torch

from ..algorithms.losses import logprobs_from_logits, masked_sum
from ..config import SFTWarmupConfig
from ..data.batch import collate
from ..distributed.comm import all_reduce_floats
from .learner import clip_grad_norm
from .micro import token_logits
from .schedule import build_scheduler


def sft_warm_start(
    model: torch.nn.Module,
    demos: list[tuple[list[int], list[int]]],
    cfg: SFTWarmupConfig,
    rank: int,
    world_size: int,
    device: torch.device,
    pad_id: int,
    grad_clip: float = 1.0,
) -> dict[str, float]:
    """Train on ``cfg.steps`` global batches of ``demos`` (prompt ids, answer ids incl. EOS)."""
    assert len(demos) >= cfg.steps * cfg.batch_size, "caller draws enough demonstrations"
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, min(cfg.warmup_steps, cfg.steps), cfg.steps, min_lr_ratio=0.1)
    per_rank = cfg.batch_size // world_size
    model.train()
    start = time.perf_counter()
    losses = []
    for step in range(cfg.steps):
        base = step * cfg.batch_size + rank * per_rank
        rows = demos[base : base + per_rank]
        batch = collate([p for p, _ in rows], [a for _, a in rows], pad_id).to(device)
        (global_tokens,) = all_reduce_floats([float(batch.loss_mask_BT.sum())])
        logprobs = logprobs_from_logits(token_logits(model, batch, 1.0), batch.input_ids_BT[:, 1:])
        loss = -masked_sum(logprobs, batch.loss_mask_BT) / global_tokens
        (loss * world_size).backward()
        clip_grad_norm(model, grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    losses = all_reduce_floats(losses)  # each rank holds its part of every step's global-mean loss
    return {
        "sft/steps": float(cfg.steps),
        "sft/loss_first": losses[0] if losses else 0.0,
        "sft/loss_last": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "timing/sft": time.perf_counter() - start,
    }
