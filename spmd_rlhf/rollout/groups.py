"""A rank's rollout of one step, kept as groups: the ``n`` samples of each prompt stay together.

Dynamic sampling, reward-variance filtering and replay all pick or swap whole groups, so every
operation here is on group indices; the padded ``TokenBatch`` is built once, after the groups
are final.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.batch import TokenBatch, collate
from ..data.datasets import PromptExample
from .base import Samples


@dataclass
class Rollout:
    """This rank's samples, prompt-major: group ``g`` is rows ``[g*n, (g+1)*n)``."""

    examples: list[PromptExample]  # one per sample (each prompt repeated n times)
    samples: Samples
    n: int
    rewards: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [B] training reward
    greedy_rewards: torch.Tensor | None = None  # [G] reward of each prompt's greedy response (ReMax)
    metrics: dict[str, float] = field(default_factory=dict)
    _batch: TokenBatch | None = None

    def __post_init__(self) -> None:
        assert len(self.examples) == len(self.samples) and len(self.samples) % self.n == 0

    @property
    def size(self) -> int:
        return len(self.samples)

    @property
    def num_groups(self) -> int:
        return self.size // self.n

    @property
    def prompt_lengths(self) -> list[int]:
        return [len(e.prompt_ids) for e in self.examples]

    def batch(self, pad_id: int) -> TokenBatch:
        """The padded training tensors, with each row's prompt images (built on first use, then cached)."""
        if self._batch is None:
            self._batch = collate([e.prompt_ids for e in self.examples], self.samples.token_ids, pad_id,
                                  self.samples.loss_masks, [e.vision for e in self.examples])
        return self._batch

    def rewards_GN(self) -> torch.Tensor:
        return self.rewards.view(self.num_groups, self.n)

    def with_examples(self, examples: list[PromptExample]) -> Rollout:
        """The same samples with other prompt objects of the same prompts (e.g. their images at rest)."""
        assert [e.index for e in examples] == [e.index for e in self.examples]
        return Rollout(examples, self.samples, self.n, self.rewards, self.greedy_rewards, dict(self.metrics))

    def groups(self, indices: list[int]) -> Rollout:
        """A rollout of the given groups, in the given order."""
        rows = [g * self.n + j for g in indices for j in range(self.n)]
        masks = self.samples.loss_masks
        samples = Samples([self.samples.token_ids[r] for r in rows], [self.samples.logprobs[r] for r in rows],
                          [self.samples.finish_reasons[r] for r in rows],
                          None if masks is None else [masks[r] for r in rows])
        greedy = None if self.greedy_rewards is None else self.greedy_rewards[indices]
        rewards = self.rewards[rows] if self.rewards.numel() else self.rewards
        return Rollout([self.examples[r] for r in rows], samples, self.n, rewards, greedy)


def loss_masks_of(parts: list[Samples]) -> list[list[int]] | None:
    """The loss masks of ``parts`` end to end: None when no part has any; otherwise a part without
    them (every token generated) gets all-ones masks."""
    if all(p.loss_masks is None for p in parts):
        return None
    return [m for p in parts for m in (p.loss_masks or [[1] * len(t) for t in p.token_ids])]


def concat(parts: list[Rollout]) -> Rollout:
    """The groups of ``parts``, in order (metrics are not carried)."""
    assert parts and len({p.n for p in parts}) == 1
    samples = Samples([t for p in parts for t in p.samples.token_ids], [lp for p in parts for lp in p.samples.logprobs],
                      [f for p in parts for f in p.samples.finish_reasons], loss_masks_of([p.samples for p in parts]))
    greedy = None
    if all(p.greedy_rewards is not None for p in parts):
        greedy = torch.cat([p.greedy_rewards for p in parts])
    return Rollout([e for p in parts for e in p.examples], samples, parts[0].n, torch.cat([p.rewards for p in parts]),
                   greedy)
