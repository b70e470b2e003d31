"""Split placement, generation side: a generation-only rank's whole run.

The rank follows training rank 0's ``Control`` messages: load the weights that follow, evaluate
the held-out prompts when asked (tallies to training rank 0), and generate every batch up to
``generate_until``: its share of the batch's prompts (every rank walks the same global
``PromptLoader``), sampled with per-prompt seeds so that a sample does not depend on which replica
draws it (through the tools with ``rollout.multi_turn.enable``: loss masks and the tool metrics
go along), sent to the training ranks as dealt by ``deal_mini_batches`` (balanced by tokens within
every mini-batch). Sends do not block generation: with ``trainer.max_staleness`` > 0 the next
batch is generated while the training ranks update on this one. Every receive is bounded by the
process group's timeout (``distributed.timeout_s``).
"""

from __future__ import annotations

import time

from ..config import Config
from ..data.balance import deal_mini_batches
from ..data.datasets import PromptExample, with_pixels
from ..data.loader import PromptLoader
from ..distributed.comm import ObjectSend, isend_object, recv_object, send_object
from ..distributed.topology import Topology
from ..rewards.registry import RewardScorer
from .base import RolloutEngine
from .evaluate import eval_tallies
from .generation import eval_sampling, sampling_config, step_seed
from .messages import Control, GroupsMessage, Start, share, split_groups
from .multi_turn import rollout_samples
from .sync import CrossWeightSync


class GenerationWorker:
    """A generation-only rank (see the module docstring)."""

    def __init__(self, cfg: Config, topo: Topology, engine: RolloutEngine, sync: CrossWeightSync,
                 loader: PromptLoader, tokenizer, scorer: RewardScorer, val_examples: list[PromptExample]):
        assert topo.placement == "split" and topo.is_generating and not topo.is_training
        self.cfg, self.topo, self.engine, self.sync, self.loader = cfg, topo, engine, sync, loader
        self.tokenizer, self.scorer, self.val_examples = tokenizer, scorer, val_examples
        self.index = topo.gen_ranks.index(topo.rank)  # this rank's place among the generation ranks
        self.train0 = topo.train_ranks[0]
        self.version = 0  # policy version of the engine's weights
        self.reshard = {"perf/reshard_bytes_per_rank": 0.0, "timing/reshard/generation_ranks": 0.0}
        self.sends: list[tuple[int, list[ObjectSend]]] = []  # (batch, its sends), oldest first

    def run(self) -> None:
        start: Start = recv_object(self.train0)
        self.loader.load_state_dict(start.loader)
        self.engine.weight_version = start.weight_version
        batch = start.step + start.in_flight
        while True:
            control: Control = recv_object(self.train0)
            self._reap(control.version)
            if control.weights:
                self._load_weights(control.version)
            if control.evaluate:
                send_object(self._evaluate(), self.train0)
            while batch < control.generate_until:
                self.sends.append((batch, self._generate(batch)))
                batch += 1
            if control.stop:
                break
        self._reap(None)

    def _reap(self, before: int | None) -> None:
        """Wait for the sends of batches below ``before`` (all: None); the training ranks have
        taken those, or are about to."""
        while self.sends and (before is None or self.sends[0][0] < before):
            for handle in self.sends.pop(0)[1]:
                handle.wait()

    def _load_weights(self, version: int) -> None:
        self.engine.wake()
        start = time.perf_counter()
        received = self.sync.push()
        self.reshard = {"perf/reshard_bytes_per_rank": received,
                        "timing/reshard/generation_ranks": time.perf_counter() - start}
        self.version = version

    def _evaluate(self) -> tuple[dict, float]:
        """This rank's share of the held-out prompts: tallies and seconds."""
        start = time.perf_counter()
        mine = [self.val_examples[i] for i in share(len(self.val_examples), len(self.topo.gen_ranks), self.index)]
        tallies = eval_tallies(self.cfg, self.engine, self.tokenizer, self.scorer, mine, eval_sampling(self.cfg))
        return tallies, time.perf_counter() - start

    def _generate(self, batch: int) -> list[ObjectSend]:
        """Generate this rank's share of batch ``batch`` and start sending it to the training ranks."""
        prompts = self.loader.next()
        mine = share(len(prompts), len(self.topo.gen_ranks), self.index)
        examples = with_pixels([prompts[i] for i in mine])  # this batch's images, decoded on this rank
        sampling = sampling_config(self.cfg, step_seed(self.cfg, batch, 0))
        start = time.perf_counter()
        samples, turn_metrics = rollout_samples(self.cfg, self.engine, self.tokenizer, examples, sampling)
        greedy = None
        if self.cfg.algorithm.adv_estimator == "remax":  # the baseline: each prompt's greedy response
            greedy, _ = rollout_samples(self.cfg, self.engine, self.tokenizer, examples,
                                        sampling_config(self.cfg, 0, greedy=True))
        seconds = time.perf_counter() - start
        groups = split_groups(samples, sampling.n, mine.start, greedy)
        tokens = {g: sum(len(examples[g - mine.start].prompt_ids) + len(t) for t in value[0])
                  for g, value in groups.items()}
        deal = self._deal(tokens, len(prompts))
        generated = float(sum(len(t) for t in samples.token_ids))
        metrics = {**self.reshard, **turn_metrics, "rollout/weight_version": float(self.engine.weight_version),
                   "timing/generate/generation_ranks": seconds,
                   "perf/generate_tokens_per_s": generated / max(seconds, 1e-9)}
        sends = []
        for rank, order in zip(self.topo.train_ranks, deal):
            message = GroupsMessage(batch, self.version, order, {g: groups[g] for g in order if g in groups}, metrics)
            sends.append(isend_object(message, rank))
        return sends

    def _deal(self, tokens: dict[int, int], total: int) -> list[list[int]]:
        """Per training rank, its global group indices: the first generation rank deals every
        rank's groups by tokens and tells the others."""
        gen = self.topo.gen_ranks
        if self.index == 0:
            counts = dict(tokens)
            for rank in gen[1:]:
                counts.update(recv_object(rank))
            assert sorted(counts) == list(range(total))
            deal = deal_mini_batches([counts[g] for g in range(total)], self.cfg.trainer.mini_batch_size,
                                     len(self.topo.train_ranks))
            for rank in gen[1:]:
                send_object(deal, rank)
            return deal
        send_object(tokens, gen[0])
        return recv_object(gen[0])
