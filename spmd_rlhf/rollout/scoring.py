"""The training reward of a rollout: rule score, reward-model score and DAPO's overlong shaping."""

from __future__ import annotations

import torch

from ..algorithms.shaping import overlong_penalty
from ..config import Config
from ..rewards.model import RewardModel
from ..rewards.registry import RewardScorer
from .groups import Rollout


class Scoring:
    """``reward.rule_weight`` * rule score + ``reward.model.weight`` * reward-model score, plus the
    overlong penalty (``algorithm.overlong``) when shaping."""

    def __init__(self, cfg: Config, tokenizer, scorer: RewardScorer, reward_model: RewardModel | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.scorer = scorer
        self.reward_model = reward_model

    def __call__(self, rollout: Rollout, shaping: bool = True) -> dict[str, float]:
        """Set ``rollout.rewards``; returns the reward metrics."""
        rw, ex = self.cfg.reward, rollout.examples
        rewards = torch.zeros(rollout.size)
        metrics: dict[str, float] = {}
        if rw.rule_weight > 0:
            texts = self.tokenizer.batch_decode(rollout.samples.token_ids, skip_special_tokens=True)
            scores, metrics = self.scorer.score([e.data_source for e in ex], texts, [e.ground_truth for e in ex],
                                                [e.extra_info for e in ex])
            rewards += rw.rule_weight * torch.tensor(scores, dtype=torch.float32)
        if self.reward_model is not None:
            model_scores = self.reward_model.score(rollout.batch(self.tokenizer.pad_token_id))
            rewards += rw.model.weight * model_scores
            metrics["reward/model_score"] = float(model_scores.mean())
        overlong = self.cfg.algorithm.overlong
        if shaping and overlong.buffer_len > 0:
            lengths = torch.tensor([len(t) for t in rollout.samples.token_ids], dtype=torch.float32)
            penalty = overlong_penalty(lengths, self.cfg.rollout.max_new_tokens, overlong.buffer_len,
                                       overlong.penalty_factor)
            rewards += penalty
            metrics["reward/overlong_penalty"] = float(penalty.mean())
        rollout.rewards = rewards
        return metrics
