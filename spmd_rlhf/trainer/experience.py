"""From scored groups to what the update needs: the group filter and replay, old and reference
log-probs, values, token rewards (KL in the reward), advantages and the rollout correction
(truncated importance sampling against the engine's, i.e. the behaviour policy's, log-probs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algorithms.advantages import outcome_token_rewards
from ..algorithms.correction import mismatch_sums, truncated_is_weights
from ..algorithms.kl import kl_reward_penalty
from ..algorithms.losses import masked_sum
from ..algorithms.shaping import keep_groups
from ..config import Config
from ..data.batch import response_tensor
from ..rollout.groups import Rollout
from .actor import Actor, PolicyTargets
from .estimate import compute_advantages
from .kl_control import KLControl
from .metrics import global_means
from .replay import GroupReplayBuffer


@dataclass
class CriticTargets:
    """What the critic's update needs, aligned with ``TokenBatch.loss_mask_BT``."""

    old_values_BT: torch.Tensor
    returns_BT: torch.Tensor


def rollout_correction(old_BT: torch.Tensor, engine_BT: torch.Tensor, mask_BT: torch.Tensor,
                       tis_cap: float) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Truncated importance sampling weights (``algorithms/correction.py``; None when
    ``tis_cap == 0``) and the engine/actor mismatch as floats: ``rollout/logprob_diff`` (mean
    |old - engine| over sampled tokens), its max, and the mean weight when TIS is on."""
    sums = mismatch_sums(old_BT, engine_BT, mask_BT)
    tokens = float(mask_BT.sum())
    weighted = {"rollout/logprob_diff": (float(sums["rollout/logprob_diff"]), tokens)}
    weights = truncated_is_weights(old_BT, engine_BT, mask_BT, tis_cap) if tis_cap > 0 else None
    if weights is not None:
        weighted["rollout/tis_weight"] = (float(weights.sum()), tokens)
    metrics = {"rollout/logprob_diff/max": float(sums["rollout/logprob_diff/max"]), **global_means(weighted)}
    return weights, metrics


def filter_and_replay(rollout: Rollout, cfg: Config,
                      replay: GroupReplayBuffer | None) -> tuple[Rollout, list[int], dict[str, float]]:
    """Reward-variance filter and replay: returns the rollout (some groups possibly swapped for
    replayed ones), the groups left without loss, and metrics."""
    f = cfg.algorithm.filter
    metrics: dict[str, float] = {}
    filtered: list[int] = []
    if f.min_reward_std >= 0:
        keep = keep_groups(rollout.rewards_GN(), f.min_reward_std)
        filtered = [g for g in range(rollout.num_groups) if not keep[g]]
    if replay is not None:
        fresh = rollout
        rollout, replaced = replay.mix(rollout, f.replay_fraction, filtered)
        metrics["filter/num_replayed_groups"] = float(replaced)
        metrics["filter/num_buffered_groups_added"] = float(replay.add(fresh))
        metrics["filter/buffer_size"] = float(len(replay))
        if f.min_reward_std >= 0:  # re-check: replayed groups replaced filtered ones first
            keep = keep_groups(rollout.rewards_GN(), f.min_reward_std)
            filtered = [g for g in range(rollout.num_groups) if not keep[g]]
    if f.min_reward_std >= 0:
        metrics["filter/num_filtered_groups"] = float(len(filtered))
    return rollout, filtered, metrics


def uses_reference(cfg: Config) -> bool:
    """Reference log-probs are needed when KL is a loss, in the reward, or guarded."""
    a = cfg.algorithm
    return (a.use_kl_loss and a.kl_coef > 0) or a.kl_in_reward.enable or a.kl_guard.max_kl > 0


class Experience:
    """Old/reference log-probs, values, token rewards and advantages of a rollout."""

    def __init__(self, cfg: Config, actor: Actor, reference, critic, kl_control: KLControl, pad_id: int):
        self.cfg = cfg
        self.actor = actor
        self.reference = reference
        self.critic = critic
        self.kl_control = kl_control
        self.pad_id = pad_id

    def on_policy(self) -> bool:
        """One epoch over one mini-batch of fresh samples, and nothing before the update reads
        the old log-probs (KL in the reward and the KL guard do): the old log-probs are then the
        update's own. Stale batches (``trainer.max_staleness`` > 0) recompute them."""
        a, t = self.cfg.algorithm, self.cfg.trainer
        return (a.ppo_epochs == 1 and t.mini_batch_size == t.batch_size and not a.kl_in_reward.enable
                and a.kl_guard.max_kl == 0 and t.max_staleness == 0)

    def targets(self, rollout: Rollout, filtered: list[int]) -> tuple[PolicyTargets, CriticTargets | None, dict]:
        """Old/reference logprobs, values, token rewards (KL in the reward if configured) and
        advantages; truncated importance weights (``algorithm.tis_cap``); the engine/actor
        logprob mismatch. Filtered groups get a zero loss mask."""
        r, algo, micro = self.cfg.rollout, self.cfg.algorithm, self.cfg.trainer.micro_batch_size
        batch = rollout.batch(self.pad_id)
        for g in filtered:
            batch.loss_mask_BT[g * r.n : (g + 1) * r.n] = 0.0
        mask = batch.loss_mask_BT
        # on-policy, the update's own (detached) log-probs are the old ones: no separate pass
        old = None if self.on_policy() else self.actor.logprobs(batch, micro, r.temperature)
        ref = None
        if uses_reference(self.cfg):  # the frozen model, or the actor without its LoRA adapters
            ref = self.actor.reference_logprobs(batch, micro, r.temperature, self.reference)
        metrics: dict[str, float] = {}
        token_rewards = outcome_token_rewards(rollout.rewards, mask)
        if self.kl_control.reward_controller is not None:
            kl_BT = self.kl_control.reward_penalty_BT(old, ref, mask)
            token_rewards = kl_reward_penalty(token_rewards, kl_BT, mask, self.kl_control.coef)
            metrics.update(self.kl_control.after_step(kl_BT, mask))
        if self.kl_control.max_kl > 0:
            metrics["actor/kl_to_ref"] = self.kl_control.measured_kl(old, ref, mask)
        values = self.critic.values(batch, micro) if self.critic is not None else None
        adv = compute_advantages(algo, token_rewards, mask, r.n, values, rollout.greedy_rewards)
        engine_lp = response_tensor(rollout.samples.logprobs, batch, rollout.prompt_lengths)
        if old is None:  # the update computes the mismatch and TIS weights from its own log-probs
            policy = PolicyTargets(adv.advantages_BT, None, ref, engine_logprobs_BT=engine_lp, tis_cap=algo.tis_cap)
        else:
            is_weights, mismatch = rollout_correction(old, engine_lp, mask, algo.tis_cap)
            metrics.update(mismatch)
            policy = PolicyTargets(adv.advantages_BT, old, ref, is_weights)
        tokens = float(mask.sum())  # token means over every training rank's tokens
        means = {"actor/advantage_mean": (masked_sum(adv.advantages_BT, mask), tokens)}
        critic_targets = None
        if self.critic is not None:
            critic_targets = CriticTargets(values, adv.returns_BT)
            means["critic/values_mean"] = (masked_sum(values, mask), tokens)
            means["critic/returns_mean"] = (masked_sum(adv.returns_BT, mask), tokens)
        metrics.update(global_means(means))
        return policy, critic_targets, metrics
