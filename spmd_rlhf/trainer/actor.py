"""The actor: an FSDP2 policy with its optimizer, scored and updated on padded token batches.

Gradients are exact across world sizes: every loss is normalised by GLOBAL counts (tokens or
sequences of the whole mini-batch, summed over ranks) and multiplied by the data-parallel size,
which FSDP's gradient averaging divides back out. One step from the same batch therefore gives
the same weights on 1, 2 or 4 ranks, up to float summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from ..algorithms.kl import kl_penalty
from ..algorithms.losses import (
    aggregate_loss,
    entropy_from_logits,
    gspo_policy_loss,
    logprobs_from_logits,
    masked_sum,
    policy_loss,
)
from ..config import AlgorithmConfig
from ..data.batch import TokenBatch, micro_batches
from ..distributed.comm import all_reduce_floats


@dataclass
class PolicyTargets:
    """What the update needs beyond the tokens, aligned with ``TokenBatch.loss_mask_BT``."""

    advantages_BT: torch.Tensor
    old_logprobs_BT: torch.Tensor
    ref_logprobs_BT: torch.Tensor | None = None
    is_weights_BT: torch.Tensor | None = None

    def select(self, rows: slice, length: int) -> PolicyTargets:
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows, :length]

        return PolicyTargets(cut(self.advantages_BT), cut(self.old_logprobs_BT), cut(self.ref_logprobs_BT), cut(self.is_weights_BT))


def token_logits(model: torch.nn.Module, batch: TokenBatch, temperature: float) -> torch.Tensor:
    """Logits at every position that predicts a next token, divided by the sampling temperature."""
    out = model(
        input_ids=batch.input_ids_BT,
        attention_mask=batch.attention_mask_BT,
        position_ids=batch.position_ids_BT,
        use_cache=False,
    )
    logits = out.logits[:, :-1].float()
    return logits / temperature if temperature not in (0.0, 1.0) else logits


class Actor:
    def __init__(self, model, optimizer, scheduler, dp_size: int, grad_clip: float, device: torch.device):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.dp_size = dp_size
        self.grad_clip = grad_clip
        self.device = device
        self.skipped_steps = 0

    @torch.no_grad()
    def logprobs(self, batch: TokenBatch, micro_batch_size: int, temperature: float, model=None) -> torch.Tensor:
        """Per-token logprobs ``[B, T-1]`` of ``batch`` under ``model`` (default: the actor)."""
        model = model or self.model
        out = torch.zeros_like(batch.loss_mask_BT)
        for rows in micro_batches(batch.size, micro_batch_size):
            micro = batch.select(rows).to(self.device)
            logits = token_logits(model, micro, temperature)
            lp = logprobs_from_logits(logits, micro.input_ids_BT[:, 1:])
            out[rows, : lp.shape[1]] = lp.cpu() * micro.loss_mask_BT.cpu()
        if isinstance(model, FSDPModule):
            # FSDP2 keeps the root's parameters gathered after a forward that no backward follows:
            # free them (memory) and give the weight sync its sharded DTensors back.
            model.reshard()
        return out

    def _micro_loss(self, micro: TokenBatch, targets: PolicyTargets, algo: AlgorithmConfig, temperature: float,
                    num_tokens: float, num_seqs: float,
                    norm_constant: float | None) -> tuple[torch.Tensor, dict[str, float]]:
        logits = token_logits(self.model, micro, temperature)
        mask = micro.loss_mask_BT
        logprobs = logprobs_from_logits(logits, micro.input_ids_BT[:, 1:])
        agg = dict(mode=algo.loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, norm_constant=norm_constant)
        args = (logprobs, targets.old_logprobs_BT, targets.advantages_BT, mask, algo.clip_low, algo.clip_high,
                algo.loss_agg_mode, num_tokens, num_seqs, targets.is_weights_BT)
        if algo.policy_loss == "gspo":
            loss, stats = gspo_policy_loss(*args, norm_constant=norm_constant)
        else:
            loss, stats = policy_loss(*args, clip_ratio_c=algo.clip_ratio_c, norm_constant=norm_constant)
        tokens = float(mask.sum().item())
        metrics = {f"actor/{k}": float(v) * tokens for k, v in stats.items()}
        metrics["actor/pg_loss"] = float(loss.detach()) * self.dp_size
        if algo.use_kl_loss and targets.ref_logprobs_BT is not None:
            kl = aggregate_loss(kl_penalty(logprobs, targets.ref_logprobs_BT, algo.kl_estimator), mask, **agg)
            loss = loss + algo.kl_coef * kl
            metrics["actor/kl_loss"] = float(kl.detach()) * self.dp_size
        entropy_BT = entropy_from_logits(logits if algo.entropy_coef > 0 else logits.detach())
        if algo.entropy_coef > 0:
            loss = loss - algo.entropy_coef * aggregate_loss(entropy_BT, mask, **agg)
        metrics["actor/entropy"] = float(masked_sum(entropy_BT.detach(), mask))
        metrics["_tokens"] = tokens
        return loss, metrics

    def update(self, batch: TokenBatch, targets: PolicyTargets, algo: AlgorithmConfig, micro_batch_size: int,
               temperature: float, norm_constant: float | None = None) -> dict[str, float]:
        """One optimizer step on ``batch`` (this rank's part of a mini-batch). ``norm_constant``
        is the divisor of the ``seq-mean-token-sum-norm`` aggregation (Dr. GRPO)."""
        self.model.train()
        # at least 1: a mini-batch whose every group was filtered out contributes zero loss, not NaN
        num_tokens, num_seqs = all_reduce_floats([float(batch.loss_mask_BT.sum()), float(batch.size)])
        num_tokens = max(num_tokens, 1.0)
        totals: dict[str, float] = {}
        for rows in micro_batches(batch.size, micro_batch_size):
            micro = batch.select(rows)
            micro_targets = targets.select(rows, micro.loss_mask_BT.shape[1])
            loss, metrics = self._micro_loss(
                micro.to(self.device), _to(micro_targets, self.device), algo, temperature, num_tokens, num_seqs,
                norm_constant,
            )
            (loss * self.dp_size).backward()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
        return self._finish_step(totals)

    def _finish_step(self, totals: dict[str, float]) -> dict[str, float]:
        tokens = max(totals.pop("_tokens"), 1.0)
        metrics = {k: (v / tokens if k not in ("actor/pg_loss", "actor/kl_loss") else v) for k, v in totals.items()}
        metrics["actor/grad_norm"], metrics["actor/lr"], stepped = optimizer_step(
            self.model, self.optimizer, self.scheduler, self.grad_clip)
        self.skipped_steps += not stepped
        metrics["actor/skipped_steps"] = float(self.skipped_steps)
        return metrics


def _to(targets: PolicyTargets, device: torch.device) -> PolicyTargets:
    def move(t):
        return None if t is None else t.to(device)

    return PolicyTargets(move(targets.advantages_BT), move(targets.old_logprobs_BT), move(targets.ref_logprobs_BT),
                         move(targets.is_weights_BT))


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
    """Global gradient norm over all shards (clipped to ``max_norm`` when > 0)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)
