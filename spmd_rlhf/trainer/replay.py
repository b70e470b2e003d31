"""Group replay (``algorithm.filter.replay_*``), in the spirit of PF-PPO.

PF-PPO (Zhang et al., 2024, "Policy Filtration in RLHF") trains on the samples whose rewards are
most reliable, the high and low ends. This buffer is the replay half of that idea, applied to
groups: a group whose best reward reaches ``replay_min_reward`` and whose rewards differ (so it
carries a learning signal) is kept, up to ``capacity`` groups per rank, oldest dropped first. Each
step, up to ``replay_fraction`` of the batch's groups are replaced by buffered ones, the groups
that the reward-variance filter removed first (they carry no signal anyway), then random ones.

Departures from PF-PPO: it filters samples by reward-model score and does not replay; here the
replayed groups are off-policy (sampled by an older policy). Their "old" log-probs are recomputed
by the current actor like every other group's, so the clipped ratio starts at 1: the update
treats them as on-policy, which is the usual approximation of replay in PPO-style trainers.
"""

from __future__ import annotations

import random
from collections import deque

import torch

from ..data.datasets import at_rest, example_from_state, example_state, with_pixels
from ..rollout.base import Samples
from .groups import Rollout, concat


class GroupReplayBuffer:
    def __init__(self, capacity: int, min_reward: float, seed: int):
        self.capacity = capacity
        self.min_reward = min_reward
        self.groups: deque[Rollout] = deque(maxlen=capacity)
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, rollout: Rollout) -> int:
        """Keep ``rollout``'s qualifying groups (their images at rest); returns how many were added."""
        rewards_GN = rollout.rewards_GN()
        good = (rewards_GN.max(dim=1).values >= self.min_reward) & (rewards_GN.std(dim=1, correction=0) > 0)
        picked = [int(g) for g in torch.nonzero(good).flatten()]
        for g in picked:
            group = rollout.groups([g])
            self.groups.append(group.with_examples(at_rest(group.examples)))
        return len(picked)

    def mix(self, rollout: Rollout, fraction: float, filtered: list[int]) -> tuple[Rollout, int]:
        """Replace up to ``fraction`` of ``rollout``'s groups by buffered ones (``filtered`` groups
        first, their images processed again); returns the new rollout and the number of groups replaced."""
        count = min(int(round(fraction * rollout.num_groups)), len(self.groups))
        if count == 0:
            return rollout, 0
        others = [g for g in range(rollout.num_groups) if g not in set(filtered)]
        self.rng.shuffle(others)
        targets = set((list(filtered) + others)[:count])
        replayed = [g.with_examples(with_pixels(g.examples)) for g in self.rng.sample(list(self.groups), count)]
        parts, it = [], iter(replayed)
        for g in range(rollout.num_groups):
            parts.append(next(it) if g in targets else rollout.groups([g]))
        return concat(parts), count

    def state_dict(self) -> dict:
        """Plain Python values only (lists, dicts, numbers, strings): loadable with weights_only."""
        groups = [{"examples": [example_state(e) for e in g.examples], "token_ids": g.samples.token_ids,
                   "logprobs": g.samples.logprobs, "finish_reasons": g.samples.finish_reasons,
                   "loss_masks": g.samples.loss_masks,
                   "rewards": g.rewards.tolist(),
                   "greedy_rewards": None if g.greedy_rewards is None else g.greedy_rewards.tolist()}
                  for g in self.groups]
        return {"groups": groups, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        groups = []
        for g in state["groups"]:
            examples = [example_from_state(e) for e in g["examples"]]
            samples = Samples(g["token_ids"], g["logprobs"], g["finish_reasons"], g.get("loss_masks"))
            greedy = None if g["greedy_rewards"] is None else torch.tensor(g["greedy_rewards"])
            groups.append(Rollout(examples, samples, len(examples), torch.tensor(g["rewards"]), greedy))
        self.groups = deque(groups, maxlen=self.capacity)
        self.rng.setstate(state["rng"])
