"""The critic: an FSDP2 value model with its optimizer, evaluated and updated on padded token batches.

Values are aligned with ``TokenBatch.loss_mask_BT``: column ``t`` is the head's output at position
``t``, V(s_t) of the prefix that predicts token ``t + 1`` (the first response column is the value
of the whole prompt), and 0 where the mask is 0. The update minimises PPO's clipped value loss
(``algorithms.losses.value_loss``: the clip of OpenAI's PPO2 implementation, not of Schulman et
al., 2017, whose value loss is unclipped) on a backbone of its own, not shared with the policy
(as in InstructGPT), with the actor's normalisation: the loss is divided by GLOBAL
counts (tokens or sequences of the whole mini-batch, summed over ranks) and multiplied by the
data-parallel size, which FSDP's gradient averaging divides back out, so one update gives the same
weights on any number of ranks up to float summation order.
"""

from __future__ import annotations


import torch
from torch.distributed.fsdp import FSDPModule

from ..algorithms.losses import value_loss
from ..data.batch import TokenBatch, micro_batches
from ..distributed.comm import all_reduce_floats
from .actor import optimizer_step


def token_values(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """The value head at every position that predicts a next token ``[B, T-1]``, in fp32."""
    out = model(
        input_ids=batch.input_ids_BT,
        attention_mask=batch.attention_mask_BT,
        position_ids=batch.position_ids_BT,
        use_cache=False,
    )
    assert out.logits.shape[-1] == 1, "the critic has one output per position (num_labels=1)"
    return out.logits[:, :-1, 0].float()


class Critic:
    def __init__(self, model, optimizer, scheduler, dp_size: int, grad_clip: float, device: torch.device):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.dp_size = dp_size
        self.grad_clip = grad_clip
        self.device = device
        self.skipped_steps = 0

    @torch.no_grad()
    def values(self, batch: TokenBatch, micro_batch_size: int) -> torch.Tensor:
        """V(s_t) ``[B, T-1]`` (CPU, float32) aligned with ``batch.loss_mask_BT``, 0 off the mask."""
        self.model.eval()
        out = torch.zeros_like(batch.loss_mask_BT)
        for rows in micro_batches(batch.size, micro_batch_size):
            micro = batch.select(rows).to(self.device)
            values_BT = token_values(self.model, micro) * micro.loss_mask_BT
            out[rows, : values_BT.shape[1]] = values_BT.cpu()
        if isinstance(self.model, FSDPModule):
            self.model.reshard()  # FSDP2 keeps the root gathered after a forward that no backward follows
        return out

    def update(self, batch: TokenBatch, old_values_BT: torch.Tensor, returns_BT: torch.Tensor, clip_range: float,
               agg_mode: str, micro_batch_size: int, norm_constant: float | None = None) -> dict[str, float]:
        """One optimizer step on ``batch`` (this rank's part of a mini-batch) toward ``returns_BT``.

        ``old_values_BT`` are the values the rollout saw (the clip's centre); ``norm_constant`` is the
        divisor of the ``seq-mean-token-sum-norm`` aggregation.
        """
        assert old_values_BT.shape == returns_BT.shape == batch.loss_mask_BT.shape
        self.model.train()
        # at least 1: a mini-batch with no response token contributes zero loss, not NaN
        num_tokens, num_seqs = all_reduce_floats([float(batch.loss_mask_BT.sum()), float(batch.size)])
        num_tokens = max(num_tokens, 1.0)
        totals: dict[str, float] = {"critic/vf_loss": 0.0}
        tokens = 0.0
        for rows in micro_batches(batch.size, micro_batch_size):
            micro = batch.select(rows).to(self.device)
            width = micro.loss_mask_BT.shape[1]
            old_BT, returns_mb_BT = (t[rows, :width].to(self.device) for t in (old_values_BT, returns_BT))
            loss, stats = value_loss(token_values(self.model, micro), old_BT, returns_mb_BT, micro.loss_mask_BT,
                                     clip_range, agg_mode, num_tokens, num_seqs, norm_constant=norm_constant)
            (loss * self.dp_size).backward()
            micro_tokens = float(micro.loss_mask_BT.sum())
            totals["critic/vf_loss"] += float(loss.detach()) * self.dp_size  # rank mean = the global loss
            for key, value in stats.items():
                totals[f"critic/{key}"] = totals.get(f"critic/{key}", 0.0) + float(value) * micro_tokens
            tokens += micro_tokens
        metrics = {k: (v if k == "critic/vf_loss" else v / max(tokens, 1.0)) for k, v in totals.items()}
        return self._finish_step(metrics)

    def _finish_step(self, metrics: dict[str, float]) -> dict[str, float]:
        metrics["critic/grad_norm"], metrics["critic/lr"], stepped = optimizer_step(
            self.model, self.optimizer, self.scheduler, self.grad_clip)
        self.skipped_steps += not stepped
        metrics["critic/skipped_steps"] = float(self.skipped_steps)
        return metrics
