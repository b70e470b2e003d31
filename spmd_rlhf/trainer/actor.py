"""The actor: an FSDP2 policy with its optimizer, scored and updated on token batches.

Gradients are exact across world sizes: every loss is normalised by GLOBAL counts (tokens or
sequences of the whole mini-batch, summed over ranks) and multiplied by the data-parallel size,
which FSDP's gradient averaging divides back out. One step from the same batch therefore gives
the same weights on 1, 2 or 4 ranks, up to float summation order. The step itself (micro-batch
loop, backward, clip, non-finite skip, optimizer and schedule) is ``learner.Learner``'s; the actor
supplies the policy loss of a micro-batch.

Speed: log-probs and entropies come from the chunked lm_head of ``models/logprobs.py`` at
response positions only (no full-vocabulary fp32 logits); micro-batches are padded rows or, with
``trainer.max_tokens_per_micro_batch``, packed sequences (``micro.py``); a batch moves to the
device once and per-micro-batch metrics stay there, read once per optimizer step. On-policy (one
epoch, one mini-batch) the old log-probs are the update's own, detached: ``PolicyTargets`` then
carries ``old_logprobs_BT=None`` and the engine's log-probs, and the update computes truncated
importance weights and the engine/actor mismatch itself.

Sequence parallel: the sp ranks of a group pool their rows (``MicroBatcher.share``) and all
compute the group's whole loss; each back-propagates it into its own tokens only, so the
``dp_size`` scaling (training ranks) stays exact, and the logged losses count each group once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch.distributed.fsdp import FSDPModule

from ..algorithms.correction import mismatch_sums, truncated_is_weights
from ..algorithms.kl import kl_penalty
from ..algorithms.losses import aggregate_loss, gspo_policy_loss, masked_sum, policy_loss
from ..config import AlgorithmConfig
from ..data.batch import TokenBatch
from ..models.lora import reference_mode
from .learner import Learner
from .micro import Micro, MicroBatcher, micro_logprobs


@dataclass
class PolicyTargets:
    """What the update needs beyond the tokens, aligned with ``TokenBatch.loss_mask_BT``.

    ``old_logprobs_BT=None`` means on-policy: the update's own log-probs (detached) are the old
    ones, and ``engine_logprobs_BT`` with ``tis_cap`` give the rollout correction in the update.
    """

    advantages_BT: torch.Tensor
    old_logprobs_BT: torch.Tensor | None
    ref_logprobs_BT: torch.Tensor | None = None
    is_weights_BT: torch.Tensor | None = None
    engine_logprobs_BT: torch.Tensor | None = None
    tis_cap: float = 0.0

    def _map(self, fn) -> PolicyTargets:
        tensors = {f.name: fn(getattr(self, f.name)) for f in fields(self) if f.name.endswith("_BT")}
        return replace(self, **tensors)

    def select(self, rows, length: int) -> PolicyTargets:
        return self._map(lambda t: None if t is None else t[rows, :length])

    def to(self, device: torch.device) -> PolicyTargets:
        return self._map(lambda t: None if t is None else t.to(device, non_blocking=True))


class Actor(Learner):
    """The policy: log-probs of token batches, and the policy-gradient update."""

    namespace = "actor"
    whole = ("actor/pg_loss", "actor/kl_loss", "rollout/logprob_diff/max")

    def __init__(self, model, optimizer, scheduler, dp_size: int, grad_clip: float, device: torch.device,
                 batcher: MicroBatcher | None = None):
        super().__init__(model, optimizer, scheduler, dp_size, grad_clip, device)
        self.batcher = batcher or MicroBatcher()

    @torch.no_grad()
    def logprobs(self, batch: TokenBatch, micro_batch_size: int, temperature: float, model=None) -> torch.Tensor:
        """Per-token logprobs ``[B, T-1]`` (CPU, fp32, 0 off the loss mask) of ``batch`` under
        ``model`` (default: the actor)."""
        model = model or self.model
        self.batcher.prepare(model)
        shared, own = self.batcher.share(batch)  # sequence parallel: the sp group's rows, same on its ranks
        device_batch = self.batcher.to_device(shared, self.device)
        out_BT = torch.zeros(shared.loss_mask_BT.shape, dtype=torch.float32, device=self.device)
        for micro in self.batcher.plan(shared, micro_batch_size, self.device, _vision_config(model, shared)):
            logprobs_BT, _ = micro_logprobs(model, micro, device_batch, temperature, self.batcher.chunk_tokens)
            out_BT[micro.rows, : micro.width] = logprobs_BT
        if isinstance(model, FSDPModule):
            # FSDP2 keeps the root's parameters gathered after a forward that no backward follows:
            # free them (memory) and give the weight sync its sharded DTensors back.
            model.reshard()
        return out_BT[own, : batch.loss_mask_BT.shape[1]].cpu()

    @torch.no_grad()
    def reference_logprobs(self, batch: TokenBatch, micro_batch_size: int, temperature: float,
                           reference: torch.nn.Module | None = None) -> torch.Tensor:
        """Per-token logprobs under the reference policy: the frozen ``reference`` model, or, with
        LoRA (no reference model), the actor with its adapters disabled."""
        if reference is not None:
            return self.logprobs(batch, micro_batch_size, temperature, model=reference)
        with reference_mode(self.model):
            return self.logprobs(batch, micro_batch_size, temperature)

    def _micro_loss(self, logprobs_BT: torch.Tensor, entropy_BT: torch.Tensor | None, mask_BT: torch.Tensor,
                    targets: PolicyTargets, algo: AlgorithmConfig, agg: dict) -> tuple[torch.Tensor, dict]:
        """The micro-batch's loss and its metrics as 0-dim device tensors (summed over tokens, or
        already global for the losses); nothing here waits for the device."""
        old_BT, is_weights_BT, stats = targets.old_logprobs_BT, targets.is_weights_BT, {}
        if old_BT is None:  # on-policy: ratio 1, gradient of the log-prob itself
            old_BT = logprobs_BT.detach()
            if targets.engine_logprobs_BT is not None:
                stats.update(mismatch_sums(old_BT, targets.engine_logprobs_BT, mask_BT))
                if targets.tis_cap > 0:
                    is_weights_BT = truncated_is_weights(old_BT, targets.engine_logprobs_BT, mask_BT, targets.tis_cap)
                    stats["rollout/tis_weight"] = masked_sum(is_weights_BT, mask_BT)
        args = (logprobs_BT, old_BT, targets.advantages_BT, mask_BT, algo.clip_low, algo.clip_high,
                algo.loss_agg_mode, agg["num_tokens"], agg["num_seqs"], is_weights_BT)
        if algo.policy_loss == "gspo":
            loss, policy_stats = gspo_policy_loss(*args, norm_constant=agg["norm_constant"])
        else:
            loss, policy_stats = policy_loss(*args, clip_ratio_c=algo.clip_ratio_c, norm_constant=agg["norm_constant"])
        tokens = mask_BT.sum()
        stats.update({f"actor/{k}": v.detach() * tokens for k, v in policy_stats.items()})
        groups = self.dp_size // self.batcher.sp  # the sp ranks of a group hold the same loss: count it once
        stats["actor/pg_loss"] = loss.detach() * groups
        if algo.use_kl_loss and targets.ref_logprobs_BT is not None:
            kl = aggregate_loss(kl_penalty(logprobs_BT, targets.ref_logprobs_BT, algo.kl_estimator), mask_BT, **agg)
            loss = loss + algo.kl_coef * kl
            stats["actor/kl_loss"] = kl.detach() * groups
        if entropy_BT is not None:
            if algo.entropy_coef > 0:
                loss = loss - algo.entropy_coef * aggregate_loss(entropy_BT, mask_BT, **agg)
            stats["actor/entropy"] = masked_sum(entropy_BT.detach(), mask_BT)
        stats["_tokens"] = tokens
        return loss, stats

    def update(self, batch: TokenBatch, targets: PolicyTargets, algo: AlgorithmConfig, micro_batch_size: int,
               temperature: float, norm_constant: float | None = None) -> dict[str, float]:
        """One optimizer step on ``batch`` (this rank's part of a mini-batch). ``norm_constant``
        is the divisor of the ``seq-mean-token-sum-norm`` aggregation (Dr. GRPO)."""
        self.batcher.prepare(self.model)
        num_tokens, num_seqs = self.global_counts(batch)  # before sharing: every token counted once
        agg = dict(mode=algo.loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, norm_constant=norm_constant)
        batch, _ = self.batcher.share(batch)
        targets = targets._map(self.batcher.share_values)
        device_batch = self.batcher.to_device(batch, self.device)
        device_targets = targets.to(self.device)

        def micro_loss(micro: Micro) -> tuple[torch.Tensor, dict]:
            logprobs_BT, entropy_BT = micro_logprobs(self.model, micro, device_batch, temperature,
                                                     self.batcher.chunk_tokens, with_entropy=True,
                                                     entropy_grad=algo.entropy_coef > 0)
            mask_BT = device_batch.loss_mask_BT[micro.rows, : micro.width]
            return self._micro_loss(logprobs_BT, entropy_BT, mask_BT, device_targets.select(micro.rows, micro.width),
                                    algo, agg)

        plan = self.batcher.plan(batch, micro_batch_size, self.device, _vision_config(self.model, batch))
        return self._step(plan, micro_loss)


def _vision_config(model: torch.nn.Module, batch: TokenBatch):
    """The policy's HF config where ``batch`` has images (the plan builds their forward inputs from it)."""
    return model.config if batch.vision is not None else None
