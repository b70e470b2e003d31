"""Split placement, training side: groups come from the generation ranks, weights go to them.

``RemoteRollouts`` offers the trainer what ``LocalRollouts`` does colocated. Every training rank
walks the global ``PromptLoader`` (so it knows each group's prompt), receives its groups of every
batch from every generation rank (dealt by tokens within each mini-batch, ``data/balance.py``),
scores them here, and after each step pushes the weights (``CrossWeightSync``) behind a
``Control`` from training rank 0. With ``trainer.max_staleness = k`` the generation ranks run up to
``k`` batches ahead; batches they have sent but the training ranks have not used yet are
``pending`` and part of the checkpoint (``state_dict``), so that a resume neither regenerates nor
loses them.
"""

from __future__ import annotations

import time

import torch.distributed as dist

from ..config import Config
from ..data.datasets import PromptExample, with_pixels
from ..data.loader import PromptLoader
from ..distributed.comm import recv_object, send_object
from ..distributed.topology import Topology
from .evaluate import eval_metrics
from .generation import greedy_baseline
from .groups import Rollout
from .local import PhaseTimer
from .messages import Control, GroupsMessage, Start, assemble
from .scoring import Scoring
from .sync import CrossWeightSync

_MAX_KEYS = ("timing/",)


class RemoteRollouts:
    """Training side of split placement (see the module docstring)."""

    def __init__(self, cfg: Config, topo: Topology, sync: CrossWeightSync, loader: PromptLoader, score: Scoring):
        assert topo.placement == "split" and topo.is_training
        self.cfg, self.topo, self.sync, self.loader, self.score = cfg, topo, sync, loader, score
        self.pending: list[dict] = []  # batches received ahead of their step (plain data: checkpointed)
        self.weight_version = 0  # the engines' weight version with the last batch received (a resume continues it)
        self.next_batch = 0  # the next batch to receive
        self.posted_until = 0  # batches below this the generation ranks send before the next Control
        self.posted_before = 0  # ... and these they sent before the last Control (safe to wait for)
        self._by_index: dict[int, PromptExample] | None = None

    # --- direction ----------------------------------------------------------------------------

    def start(self, step: int) -> None:
        """Tell the generation ranks where the run starts (after a resume: what is in flight)."""
        self.next_batch = self.posted_until = self.posted_before = step + len(self.pending)
        if self.topo.is_main:
            message = Start(step, self.loader.state_dict(), len(self.pending), self.weight_version)
            for rank in self.topo.gen_ranks:
                send_object(message, rank)

    def after_step(self, steps_done: int, evaluate: bool, stop: bool) -> dict[str, float]:
        """Send the ``Control`` for ``steps_done`` updates and, when generation or the evaluation
        needs them, the weights; returns the push's ``timing/reshard``. Before an evaluation or
        a stop, batches already sent are received (they would queue ahead of other messages)."""
        total, ahead = self.cfg.trainer.total_steps, self.cfg.trainer.max_staleness
        until = self.posted_until if stop else max(self.posted_until, min(steps_done + 1 + ahead, total))
        weights = evaluate or until > self.posted_until
        control = Control(steps_done, weights, evaluate, until, stop)
        self.posted_before, self.posted_until = self.posted_until, until
        if self.topo.is_main:
            for rank in self.topo.gen_ranks:
                send_object(control, rank)
        metrics = {}
        if weights:
            start = time.perf_counter()
            self.sync.push()
            metrics["timing/reshard"] = time.perf_counter() - start
        if evaluate or stop:
            self.drain()
        return metrics

    def drain(self) -> None:
        """Receive into ``pending`` every batch the generation ranks sent before the last
        ``Control`` (before a checkpoint: these are the in-flight batches it keeps)."""
        while self.next_batch < self.posted_before:
            self.pending.append(self._receive())

    # --- batches ------------------------------------------------------------------------------

    def _receive(self) -> dict:
        """Batch ``next_batch`` from every generation rank, as plain data."""
        messages: list[GroupsMessage] = [recv_object(rank) for rank in self.topo.gen_ranks]
        examples = self.loader.next()
        assert all(m.batch == self.next_batch for m in messages), "generation and training ranks agree on batches"
        groups = {g: value for m in messages for g, value in m.groups.items()}
        self.next_batch += 1
        self.weight_version = int(messages[0].metrics["rollout/weight_version"])
        return {"batch": messages[0].batch, "version": messages[0].version, "order": messages[0].order,
                "groups": groups, "examples": [examples[g].index for g in messages[0].order],
                "metrics": _combine([m.metrics for m in messages])}

    def _example(self, index: int) -> PromptExample:
        if self._by_index is None:
            self._by_index = {e.index: e for e in self.loader.examples}
        return self._by_index[index]

    def next(self, step: int, timer: PhaseTimer) -> tuple[Rollout, dict[str, float]]:
        """This step's groups, scored; ``timing/generate`` is the wait for them (0 when they were
        already here), ``rollout/staleness`` the policy versions between their weights and now."""
        start = time.perf_counter()
        batch = self.pending.pop(0) if self.pending else self._receive()
        waited = time.perf_counter() - start
        assert batch["batch"] == step, f"batch {batch['batch']} arrived for step {step}"
        prompts = with_pixels([self._example(i) for i in batch["examples"]])  # this step's images, decoded here
        examples = dict(zip(batch["order"], prompts))
        rollout, greedy = assemble(batch["order"], batch["groups"], examples, self.cfg.rollout.n)
        rollout.metrics = self.score(rollout)
        if greedy is not None:
            greedy_baseline(rollout, [examples[g] for g in batch["order"]], greedy, self.score)
        return rollout, {**batch["metrics"], "timing/generate": waited,
                         "rollout/staleness": float(step - batch["version"])}

    def evaluate(self) -> dict[str, float]:
        """The generation ranks' held-out tallies, combined on training rank 0 and shared with the
        other training ranks (every training rank logs the same keys)."""
        box = [None]
        if self.topo.is_main:
            parts = [recv_object(rank) for rank in self.topo.gen_ranks]
            box = [eval_metrics([tallies for tallies, _ in parts], max(seconds for _, seconds in parts))]
        dist.broadcast_object_list(box, src=self.topo.train_ranks[0], group=self.topo.train_group)
        return box[0]

    def close(self) -> None:
        """The engines live on the generation ranks."""

    # --- checkpoint (per rank) ----------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"pending": self.pending, "weight_version": self.weight_version}

    def load_state_dict(self, state: dict) -> None:
        self.pending = list(state["pending"])
        self.weight_version = int(state["weight_version"])


def _combine(parts: list[dict[str, float]]) -> dict[str, float]:
    """The generation ranks' metrics: the slowest rank's time, the mean of everything else."""
    keys = sorted(parts[0])
    return {k: (max if k.startswith(_MAX_KEYS) else _mean)([p[k] for p in parts]) for k in keys}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
