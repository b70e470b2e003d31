"""The generation phase of a step: prompts -> scored groups, with DAPO's dynamic sampling rounds.

Each rank keeps the ``n`` samples of its own prompts, so groups never straddle ranks. Every rank
takes part in every round (tp groups gather prompts; the loader advances alike on every rank).
"""

from __future__ import annotations

import torch.distributed as dist

from ..algorithms.shaping import keep_groups
from ..config import Config
from ..data.datasets import PromptExample, with_pixels
from ..data.loader import PromptLoader
from ..distributed.comm import all_reduce_floats
from ..distributed.topology import Topology
from .base import RolloutEngine, SamplingConfig, Samples
from .groups import Rollout, concat
from .multi_turn import rollout_samples
from .scoring import Scoring


def sampling_config(cfg: Config, seed: int, greedy: bool = False) -> SamplingConfig:
    """The training sampling options of ``rollout.*`` (or greedy, one sample) with ``seed``."""
    r = cfg.rollout
    if greedy:
        return SamplingConfig(max_new_tokens=r.max_new_tokens, n=1, temperature=0.0, seed=seed)
    return SamplingConfig(max_new_tokens=r.max_new_tokens, n=r.n, temperature=r.temperature, top_p=r.top_p,
                          top_k=r.top_k, seed=seed, ignore_eos=r.ignore_eos)


def eval_sampling(cfg: Config) -> SamplingConfig:
    """Held-out sampling: ``rollout.val_temperature`` (0 = greedy), one sample per prompt."""
    r = cfg.rollout
    return SamplingConfig(max_new_tokens=r.max_new_tokens, n=1, temperature=r.val_temperature,
                          top_p=r.top_p if r.val_temperature > 0 else 1.0,
                          top_k=r.top_k if r.val_temperature > 0 else 0, seed=r.seed + 17)


def step_seed(cfg: Config, step: int, round_: int) -> int:
    """The sampling seed of a step's round; each prompt's samples then draw from streams keyed by
    this seed and the prompt's index (``base.sample_seeds``), on whichever rank generates it."""
    return cfg.rollout.seed + 1_000_003 * step + 104_729 * round_


def greedy_baseline(rollout: Rollout, prompts: list[PromptExample], greedy: Samples, score: Scoring) -> None:
    """ReMax: each prompt's greedy response, scored without shaping, as ``rollout.greedy_rewards``."""
    baseline = Rollout(list(prompts), greedy, 1)
    score(baseline, shaping=False)
    rollout.greedy_rewards = baseline.rewards
    rollout.metrics["reward/greedy_baseline"] = float(baseline.rewards.mean())


class Generation:
    """Sample ``rollout.n`` responses per prompt with the engine and score them (ReMax also
    scores a greedy one per prompt); ``collect`` adds dynamic sampling rounds."""

    def __init__(self, cfg: Config, topo: Topology, engine: RolloutEngine, loader: PromptLoader, score: Scoring):
        self.cfg = cfg
        self.topo = topo
        self.engine = engine
        self.loader = loader
        self.score = score

    def sampling(self, step: int, round_: int = 0, greedy: bool = False) -> SamplingConfig:
        return sampling_config(self.cfg, step_seed(self.cfg, step, round_), greedy)

    def generate(self, prompts: list[PromptExample], step: int, round_: int = 0) -> Rollout:
        """One round: samples of ``prompts``, scored. Their images are processed here, once: the
        engine and the rollout's training batch read the same pixels, which go with the rollout."""
        prompts = with_pixels(prompts)
        sampling = self.sampling(step, round_)
        samples, turn_metrics = rollout_samples(self.cfg, self.engine, self.score.tokenizer, prompts, sampling)
        rollout = Rollout([p for p in prompts for _ in range(sampling.n)], samples, sampling.n)
        rollout.metrics = {**self.score(rollout), **turn_metrics}
        if self.cfg.algorithm.adv_estimator == "remax":  # the greedy response goes through the tools too
            greedy, _ = rollout_samples(self.cfg, self.engine, self.score.tokenizer, prompts,
                                        self.sampling(step, round_, greedy=True))
            greedy_baseline(rollout, prompts, greedy, self.score)
        return rollout

    def collect(self, prompts: list[PromptExample], step: int) -> Rollout:
        """Generate and score; with dynamic sampling, keep only groups whose rewards differ and
        generate for further batches of prompts (every rank together, for tp groups and the
        loader) until every rank has as many groups as it has prompts, or ``max_rounds`` is
        reached; then fill up with dropped groups (they give no policy gradient)."""
        ds = self.cfg.algorithm.dynamic_sampling
        first = self.generate(prompts, step)
        if not ds.enable:
            return first
        quota, kept, dropped, rounds = first.num_groups, [], [], 0
        part = first
        while True:
            rounds += 1
            keep = keep_groups(part.rewards_GN(), 0.0)
            kept.append(part.groups([g for g in range(part.num_groups) if keep[g]]))
            dropped.append(part.groups([g for g in range(part.num_groups) if not keep[g]]))
            have = sum(p.num_groups for p in kept)
            (shortest,) = all_reduce_floats([float(have)], op=dist.ReduceOp.MIN)
            if shortest >= quota or rounds >= ds.max_rounds:
                break
            part = self.generate(self.loader.next(), step, rounds)
        pool = concat(kept + dropped)
        rollout = pool.groups(list(range(quota)))  # kept groups first, then dropped ones
        filled = max(0, quota - have)
        rollout.metrics = {**first.metrics, "rollout/dynamic_sampling/rounds": float(rounds),
                           "rollout/dynamic_sampling/kept_first_round": float(keep_groups(first.rewards_GN(), 0.0)
                                                                               .float().mean()),
                           "rollout/dynamic_sampling/num_filled_groups": float(filled)}
        return rollout
