"""Colocated placement: every rank generates its own prompts with its own engine.

``LocalRollouts`` is what the trainer asks for a step's scored groups and for held-out metrics
when every rank both trains and generates: the actor's weights go into the engine (``WeightSync``)
right before generation, and the engine sleeps again before the update.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from ..config import Config
from ..data.datasets import PromptExample
from ..data.loader import PromptLoader
from ..distributed.topology import Topology
from .base import RolloutEngine
from .evaluate import evaluate
from .generation import Generation, eval_sampling
from .groups import Rollout
from .sync import WeightSync

PhaseTimer = Callable  # (phase name, fn, *args) -> fn(*args), timed as ``timing/<phase>``


class LocalRollouts:
    """Weights into this rank's engine, then generate and score this rank's prompts."""

    def __init__(self, cfg: Config, topo: Topology, engine: RolloutEngine, sync: WeightSync, generation: Generation,
                 val_examples: list[PromptExample],
                 offload: Callable[[], AbstractContextManager] = contextlib.nullcontext):
        self.cfg = cfg
        self.topo = topo
        self.engine = engine
        self.sync = sync
        self.generation = generation
        self.val_examples = val_examples
        self.offload = offload  # the actor in host memory while the engine runs, if configured

    @property
    def loader(self) -> PromptLoader:
        return self.generation.loader

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    @weight_version.setter
    def weight_version(self, version: int) -> None:
        self.engine.weight_version = version

    def start(self, step: int) -> None:
        """Nothing to agree on before the first step: weights are pushed before every generation."""

    def next(self, step: int, timer: PhaseTimer) -> tuple[Rollout, dict[str, float]]:
        """This step's scored groups: the engine gets the actor's weights, generates for this
        rank's prompts (the actor offloaded meanwhile, if configured) and sleeps again."""
        prompts = self.loader.next()
        self.engine.wake()
        received = timer("reshard", self.sync.push)
        with self.offload():  # the KV cache wakes inside generate, into the room left
            start = time.perf_counter()
            rollout = timer("generate", self.generation.collect, prompts, step)  # scoring included
            seconds = time.perf_counter() - start
            self.engine.sleep()
        generated = float(sum(len(t) for t in rollout.samples.token_ids))
        return rollout, {"rollout/weight_version": float(self.engine.weight_version),
                         "rollout/staleness": 0.0, "perf/reshard_bytes_per_rank": received,
                         "perf/generate_tokens_per_s": generated / max(seconds, 1e-9)}

    def after_step(self, steps_done: int, evaluate: bool, stop: bool) -> dict[str, float]:
        """Colocated, the next step pushes its own weights: nothing to hand over."""
        return {}

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy of the current actor: its weights into the engine, one greedy (or
        ``rollout.val_temperature``) sample per held-out prompt."""
        self.engine.wake()
        self.sync.push()
        with self.offload():
            metrics = evaluate(self.cfg, self.engine, self.generation.score.tokenizer, self.generation.score.scorer,
                               self.val_examples, eval_sampling(self.cfg), self.topo)
            self.engine.sleep()
        return metrics

    def drain(self) -> None:
        """Nothing is in flight colocated."""

    def close(self) -> None:
        self.engine.close()
