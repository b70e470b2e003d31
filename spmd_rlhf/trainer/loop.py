"""The RL step of DESIGN §2, run by every training rank.

    prompts -> weights into the engine -> generate + score (dynamic sampling rounds)
            -> filter / replay -> old, reference logprobs, values -> token rewards (KL in reward)
            -> advantages (grpo, rloo, remax, reinforce++, gae) -> KL guard
            -> PPO epochs x mini-batches (actor, critic) -> reduced metrics

Each phase has one owner: ``rollout/`` generates, scores and syncs weights (``Generation``,
``WeightSync``), ``experience.py`` turns groups into targets, ``actor.py``/``critic.py`` update,
``state.py`` holds the counters. The ``Trainer`` holds the order of the step and of the run
(evaluations, checkpoints, preemption).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Config
from ..data.datasets import PromptExample
from ..data.loader import PromptLoader
from ..distributed.topology import Topology
from ..rollout.base import RolloutEngine
from ..rollout.generation import Generation, eval_sampling
from ..rollout.groups import Rollout
from ..rollout.scoring import Scoring
from ..rollout.sync import WeightSync
from .actor import Actor, PolicyTargets
from .checkpoint import CheckpointManager
from .checkpoint_state import ModelOptimizerState, RNGState
from .evaluate import evaluate
from .experience import CriticTargets, Experience, filter_and_replay
from .faults import NonFiniteGuard, oom_hint
from .flops import flops_model, mfu, peak_flops
from .kl_control import KLControl
from .metrics import MetricsLogger, rollout_metrics
from .offload import ActorOffload
from .preemption import PreemptionHandler
from .replay import GroupReplayBuffer
from .state import Counters, PerRank, TrainState


@dataclass
class TrainerParts:
    """What the step runs on, built by ``train.py``: the learners, the engine with its weight
    sync and generation phase, the data and the logger."""

    tokenizer: Any
    actor: Actor
    engine: RolloutEngine
    sync: WeightSync
    generation: Generation
    loader: PromptLoader
    logger: MetricsLogger
    val_examples: list[PromptExample]
    reference: torch.nn.Module | None = None
    critic: Any = None  # Critic


class Timer:
    """``timing/<phase>`` of one step, each phase run under an out-of-memory hint."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def __call__(self, name: str, fn, *args):
        start = time.perf_counter()
        with oom_hint(name):
            out = fn(*args)
        self.timings[f"timing/{name}"] = time.perf_counter() - start
        return out


class Trainer:
    def __init__(self, cfg: Config, topo: Topology, parts: TrainerParts):
        self.cfg = cfg
        self.topo = topo
        self.parts = parts
        self.actor, self.critic, self.reference = parts.actor, parts.critic, parts.reference
        self.engine, self.sync, self.generation = parts.engine, parts.sync, parts.generation
        self.loader, self.logger = parts.loader, parts.logger
        self.pad_id = parts.tokenizer.pad_token_id
        self.kl_control = KLControl(cfg.algorithm)
        self.experience = Experience(cfg, self.actor, self.reference, self.critic, self.kl_control, self.pad_id)
        f = cfg.algorithm.filter
        self.replay = None
        if f.replay_capacity > 0:
            self.replay = GroupReplayBuffer(f.replay_capacity, f.replay_min_reward, cfg.trainer.seed + 31 * topo.rank)
        self.non_finite = NonFiniteGuard(cfg.trainer.max_consecutive_skips)
        self.state = TrainState()
        self.flops = flops_model(self.actor.model.config)
        device_name = torch.cuda.get_device_name(topo.device) if topo.device.type == "cuda" else topo.device.type
        self.peak_flops = peak_flops(device_name, cfg.trainer.peak_tflops)

    @property
    def step(self) -> int:
        return self.state.step

    # --- state ------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        """Everything a bit-identical resume needs, as checkpoint components (DESIGN §8)."""
        actor = self.actor
        state = {"actor": ModelOptimizerState(actor.model, actor.optimizer, actor.scheduler),
                 "trainer": Counters(self.state, self.loader, self.kl_control, self.non_finite, actor, self.critic),
                 "rng": RNGState()}
        if self.reference is not None:  # the frozen policy of step 0: rebuilding it would copy the resumed actor
            state["reference"] = ModelOptimizerState(self.reference)
        if self.critic is not None:
            state["critic"] = ModelOptimizerState(self.critic.model, self.critic.optimizer, self.critic.scheduler)
        if self.replay is not None:
            state["replay"] = PerRank(self.replay)
        return state

    def save(self, checkpoints: CheckpointManager) -> str:
        path = checkpoints.save(self.step, self.checkpoint_state(), hf_config=self.actor.model.config,
                                tokenizer=self.parts.tokenizer)
        self.state.saved_step = self.step
        self.logger.write(f"step {self.step}: checkpoint {path}")
        return path

    # --- the step ---------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        timer = Timer()
        step_start = time.perf_counter()
        rollout, received = self.rollout(timer)
        rollout, filtered, filter_metrics = filter_and_replay(rollout, self.cfg, self.replay)
        targets, critic_targets, target_metrics = timer("reference", self.experience.targets, rollout, filtered)
        train_actor = self.train_actor(target_metrics)
        skipped_before = self.skipped_steps()
        update_metrics = timer("update", self.update, rollout, targets, critic_targets, train_actor)
        update_metrics.update(self.mfu(rollout, timer.timings, train_actor))
        self.non_finite.after_step(self.skipped_steps() > skipped_before, self.step + 1)
        timer.timings["timing/step"] = time.perf_counter() - step_start
        guard = {"kl_guard/skipped_steps": float(self.kl_control.guard_skips),
                 "kl_guard/lr_scale": self.kl_control.lr_scale} if self.kl_control.max_kl > 0 else {}
        return {**self.rollout_metrics(rollout, received, timer.timings), **rollout.metrics, **filter_metrics,
                **target_metrics, **update_metrics, **guard, **timer.timings}

    def rollout(self, timer: Timer) -> tuple[Rollout, float]:
        """This step's scored groups: the engine gets the actor's weights, generates for this
        rank's prompts (the actor offloaded meanwhile, if configured) and sleeps again."""
        prompts = self.loader.next()
        self.engine.wake()
        received = timer("reshard", self.push_weights)
        with self.actor_offloaded():  # the KV cache wakes inside generate, into the room left
            rollout = timer("generate", self.generation.collect, prompts, self.step)  # scoring included
            self.engine.sleep()
        return rollout, received

    def push_weights(self) -> float:
        received = self.sync.push()
        self.state.weight_version += 1
        return received

    def train_actor(self, target_metrics: dict[str, float]) -> bool:
        """False while the critic warms up, or when the KL guard skips this update."""
        train_actor = self.step >= self.cfg.critic.warmup_updates or self.critic is None
        if self.kl_control.max_kl > 0 and self.kl_control.guard(target_metrics["actor/kl_to_ref"],
                                                                 [self.actor.scheduler]):
            self.logger.write(f"step {self.step + 1}: KL to the reference {target_metrics['actor/kl_to_ref']:.4f} > "
                              f"algorithm.kl_guard.max_kl={self.kl_control.max_kl}; update skipped, learning rate "
                              f"scaled to {self.kl_control.lr_scale:.3g} of its schedule")
            return False
        return train_actor

    def skipped_steps(self) -> int:
        return self.actor.skipped_steps + (self.critic.skipped_steps if self.critic is not None else 0)

    def update(self, rollout: Rollout, targets: PolicyTargets, critic_targets: CriticTargets | None,
               train_actor: bool) -> dict[str, float]:
        """PPO epochs x mini-batches of the actor (and critic); metrics averaged over updates."""
        cfg = self.cfg
        batch = rollout.batch(self.pad_id)
        seqs_per_mini = cfg.trainer.mini_batch_size // self.topo.dp_size * cfg.rollout.n
        norm_constant = float(cfg.rollout.max_new_tokens)
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}

        def add(metrics: dict[str, float]) -> None:
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1

        for _ in range(cfg.algorithm.ppo_epochs):
            for start in range(0, batch.size, seqs_per_mini):
                rows = slice(start, start + seqs_per_mini)
                mini = batch.select(rows)
                length = mini.loss_mask_BT.shape[1]
                if train_actor:
                    add(self.actor.update(mini, targets.select(rows, length), cfg.algorithm,
                                          cfg.trainer.micro_batch_size, cfg.rollout.temperature, norm_constant))
                if self.critic is not None:
                    add(self.critic.update(mini, critic_targets.old_values_BT[rows, :length],
                                           critic_targets.returns_BT[rows, :length], cfg.critic.clip_range_value,
                                           cfg.algorithm.loss_agg_mode, cfg.trainer.micro_batch_size, norm_constant))
        return {k: (v if k.endswith("skipped_steps") else v / counts[k]) for k, v in totals.items()}

    # --- metrics ----------------------------------------------------------------------------

    def mfu(self, rollout: Rollout, timings: dict[str, float], train_actor: bool) -> dict[str, float]:
        """``perf/mfu/update`` and ``perf/mfu/logprobs`` (old and reference passes) of this rank's
        work, as model FLOPs over phase time and the device peak (``trainer/flops.py``)."""
        if self.peak_flops is None:
            return {}
        seq_lens = [p + len(r) for p, r in zip(rollout.prompt_lengths, rollout.samples.token_ids)]
        scored = [len(r) for r in rollout.samples.token_ids]
        passes = int(not self.experience.on_policy()) + int(self.reference is not None)
        out = {}
        if train_actor:
            update = self.flops.train(seq_lens, scored) * self.cfg.algorithm.ppo_epochs
            out["perf/mfu/update"] = mfu(update, timings["timing/update"], self.peak_flops)
        if passes:
            out["perf/mfu/logprobs"] = mfu(passes * self.flops.forward(seq_lens, scored), timings["timing/reference"],
                                           self.peak_flops)
        return out

    def rollout_metrics(self, rollout: Rollout, received: float, timings: dict[str, float]) -> dict[str, float]:
        batch = rollout.batch(self.pad_id)
        generated = float(sum(len(t) for t in rollout.samples.token_ids))
        metrics = rollout_metrics(rollout.samples.token_ids, rollout.samples.finish_reasons, rollout.rewards_GN(),
                                  float(batch.attention_mask_BT.sum()), timings)
        return {**metrics, "rollout/weight_version": float(self.state.weight_version),
                "perf/reshard_bytes_per_rank": received,
                "perf/generate_tokens_per_s": generated / max(timings["timing/generate"], 1e-9)}

    # --- evaluation and the run -------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy of the current actor: its weights into the engine, one greedy (or
        ``rollout.val_temperature``) sample per held-out prompt."""
        self.engine.wake()
        self.push_weights()
        with self.actor_offloaded(), oom_hint("eval"):
            metrics = evaluate(self.engine, self.parts.tokenizer, self.generation.score.scorer,
                               self.parts.val_examples, eval_sampling(self.cfg), self.topo)
            self.engine.sleep()
        return metrics

    def actor_offloaded(self) -> ActorOffload:
        """Actor and optimizer state in host memory for the block, if configured (CUDA)."""
        return ActorOffload(self.actor.model, self.actor.optimizer, self.topo.device,
                            self.cfg.trainer.offload_actor_during_rollout)

    def close(self) -> None:
        """Release the engine (vLLM must stop before the process group is destroyed)."""
        self.engine.close()

    def run(self, checkpoints: CheckpointManager | None = None,
            preemption: PreemptionHandler | None = None) -> dict[str, dict[str, float]]:
        """Train up to ``trainer.total_steps`` steps (from ``self.step``, which a resume sets);
        returns held-out metrics before (fresh runs only) and after. ``trainer.val_every`` adds
        held-out evaluations; checkpoints are saved every ``trainer.save_every`` steps, at the end,
        and when a preemption signal arrives (then the run stops early, without the final eval)."""
        t, val = self.cfg.trainer, bool(self.parts.val_examples)
        results: dict[str, dict[str, float]] = {}
        if t.eval_before and val and self.step == 0:
            results["before"] = self.logger.log(self.step, self.evaluate(), advance=False)
        while self.step < t.total_steps:
            metrics = self.train_step()
            self.state.step += 1
            self.logger.log(self.step, metrics)
            if t.val_every and self.step % t.val_every == 0 and self.step < t.total_steps and val:
                self.logger.log(self.step, self.evaluate(), advance=False)
            periodic = t.save_every and self.step % t.save_every == 0 and self.step < t.total_steps
            if checkpoints is not None and periodic:
                self.save(checkpoints)
            if preemption is not None and preemption.requested():
                self.logger.write(f"step {self.step}: preemption signal received; saving and stopping")
                if checkpoints is not None and not periodic:
                    self.save(checkpoints)
                results["preempted"] = {"step": float(self.step)}
                return results
        if checkpoints is not None and t.save_every and self.state.saved_step != self.step:
            self.save(checkpoints)
        if t.eval_after and val:
            results["after"] = self.logger.log(self.step, self.evaluate(), advance=False)
        return results
