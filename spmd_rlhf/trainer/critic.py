"""The critic: an FSDP2 value model with its optimizer, evaluated and updated on padded token batches.

Values are aligned with ``TokenBatch.loss_mask_BT``: column ``t`` is the head's output at position
``t``, V(s_t) of the prefix that predicts token ``t + 1`` (the first response column is the value
of the whole prompt), and 0 where the mask is 0. The update minimises PPO's clipped value loss
(``algorithms.losses.value_loss``: the clip of OpenAI's PPO2 implementation, not of Schulman et
al., 2017, whose value loss is unclipped) on a backbone of its own, not shared with the policy
(as in InstructGPT), with the actor's normalisation: the loss is divided by GLOBAL
counts (tokens or sequences of the whole mini-batch, summed over ranks) and multiplied by the
data-parallel size, which FSDP's gradient averaging divides back out, so one update gives the same
weights on any number of ranks up to float summation order. The step itself is
``learner.Learner``'s; the critic supplies the value loss of a micro-batch.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule

from ..algorithms.losses import value_loss
from ..data.batch import TokenBatch, micro_batches
from .learner import Learner


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


class Critic(Learner):
    """The value model: values of token batches, and the clipped value-loss update."""

    namespace = "critic"
    whole = ("critic/vf_loss",)

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
        num_tokens, num_seqs = self.global_counts(batch)

        def micro_loss(rows: slice) -> tuple[torch.Tensor, dict]:
            micro = batch.select(rows).to(self.device)
            width = micro.loss_mask_BT.shape[1]
            old_BT, returns_mb_BT = (t[rows, :width].to(self.device) for t in (old_values_BT, returns_BT))
            loss, stats = value_loss(token_values(self.model, micro), old_BT, returns_mb_BT, micro.loss_mask_BT,
                                     clip_range, agg_mode, num_tokens, num_seqs, norm_constant=norm_constant)
            # token-weighted sums, in float64
            tokens = micro.loss_mask_BT.sum().double()
            metrics = {f"critic/{key}": value.double() * tokens for key, value in stats.items()}
            metrics["critic/vf_loss"] = loss.detach().double() * self.dp_size  # rank mean = the global loss
            metrics["_tokens"] = tokens
            return loss, metrics

        return self._step(micro_batches(batch.size, micro_batch_size), micro_loss)
