"""The update step the actor and the critic share: one optimizer step over micro-batches.

A learner is a model (FSDP2 or plain) with its optimizer and LR schedule. A subclass supplies the
loss of one micro-batch, normalised by GLOBAL counts (``global_counts``: tokens or sequences of
the whole mini-batch, summed over ranks); ``_step`` multiplies it by the data-parallel size, which
FSDP's gradient averaging divides back out, back-propagates, and keeps the metrics on the device
until the micro-batches are done. Then the gradient is clipped and the optimizer and schedule step,
unless its norm is non-finite: that step is skipped and counted (``skipped_steps``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from ..data.batch import TokenBatch
from ..distributed.comm import all_reduce_floats
from .metrics import global_means

MicroLoss = Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Learner:
    """A model with its optimizer, updated one optimizer step at a time on micro-batches.

    Metrics of a micro-batch are 0-dim device tensors: those named in ``whole`` are summed over
    micro-batches as they are (already global), keys ending in ``/max`` take the maximum, and the
    others are token-weighted sums divided by the step's ``_tokens``, both summed over the training
    ranks (``global_means``: exact, not a mean of per-rank means).
    """

    namespace = ""  # metric prefix: "actor", "critic"
    whole: tuple[str, ...] = ()

    def __init__(self, model, optimizer, scheduler, dp_size: int, grad_clip: float, device: torch.device):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.dp_size = dp_size
        self.grad_clip = grad_clip
        self.device = device
        self.skipped_steps = 0

    @staticmethod
    def global_counts(batch: TokenBatch) -> tuple[float, float]:
        """(loss tokens, sequences) of the mini-batch whose part on this rank is ``batch``."""
        num_tokens, num_seqs = all_reduce_floats([float(batch.loss_mask_BT.sum()), float(batch.size)])
        # at least 1: a mini-batch with no loss token contributes zero loss, not NaN
        return max(num_tokens, 1.0), num_seqs

    def _step(self, micros: Iterable[Any], micro_loss: MicroLoss) -> dict[str, float]:
        """Back-propagate ``micro_loss`` of every micro-batch, then one optimizer step; the metrics."""
        self.model.train()
        totals: dict[str, torch.Tensor] = {}
        for micro in micros:
            loss, stats = micro_loss(micro)
            (loss * self.dp_size).backward()
            for key, value in stats.items():
                if key.endswith("/max"):
                    totals[key] = torch.maximum(totals[key], value) if key in totals else value
                else:
                    totals[key] = totals[key] + value if key in totals else value
        return self._finish_step(totals)

    def _finish_step(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(totals)
        values = dict(zip(keys, torch.stack([totals[k].double() for k in keys]).tolist())) if keys else {}
        tokens = values.pop("_tokens", 0.0)
        metrics = {k: v for k, v in values.items() if k in self.whole or k.endswith("/max")}
        # token-weighted: this rank's sums and tokens, summed over the training ranks, divided once
        metrics.update(global_means({k: (v, tokens) for k, v in values.items() if k not in metrics}))
        prefix = self.namespace
        metrics[f"{prefix}/grad_norm"], metrics[f"{prefix}/lr"], stepped = optimizer_step(
            self.model, self.optimizer, self.scheduler, self.grad_clip)
        self.skipped_steps += not stepped
        metrics[f"{prefix}/skipped_steps"] = float(self.skipped_steps)
        return metrics


def optimizer_step(model: torch.nn.Module, optimizer, scheduler, grad_clip: float) -> tuple[float, float, bool]:
    """Clip, then step optimizer and schedule unless the gradient norm is non-finite (the step is
    skipped); gradients are cleared either way. Returns (grad norm, lr of this step, stepped)."""
    grad_norm = clip_grad_norm(model, grad_clip)
    lr = scheduler.get_last_lr()[0]
    stepped = math.isfinite(grad_norm)
    if stepped:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr, stepped


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Global gradient norm over all shards (clipped to ``max_norm`` when > 0). The shards' partial
    norm is reduced on the mesh's device even where FSDP keeps gradients in host memory
    (``trainer.cpu_offload``): NCCL moves no CPU tensors."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        local = norm.to_local().to(norm.device_mesh.device_type)
        norm = DTensor.from_local(local, norm.device_mesh, norm.placements).full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm if max_norm > 0 else float("inf"), norm)
    return float(norm)
