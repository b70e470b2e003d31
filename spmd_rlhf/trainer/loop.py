"""The RL step of DESIGN §2, run by every training rank.

    prompts -> weights into the engine -> generate + score (dynamic sampling rounds)
            -> filter / replay -> old, reference logprobs, values -> token rewards (KL in reward)
            -> advantages (grpo, rloo, remax, reinforce++, gae) -> KL guard
            -> PPO epochs x mini-batches (actor, critic) -> reduced metrics

Each phase has one owner: ``rollout/`` generates, scores and moves weights, colocated
(``LocalRollouts``: this rank's engine) or split (``RemoteRollouts``: generation-only ranks run
``GenerationWorker``); ``experience.py`` turns groups into targets; ``actor.py``/``critic.py``
update; ``state.py`` holds the counters. The ``Trainer`` holds the order of the step and of the
run (evaluations, checkpoints, preemption), the same for both placements.
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
from ..rollout.groups import Rollout
from ..rollout.local import LocalRollouts
from ..rollout.remote import RemoteRollouts
from .actor import Actor, PolicyTargets
from .checkpoint import CheckpointManager
from .checkpoint_state import ModelOptimizerState, RNGState
from .experience import CriticTargets, Experience, filter_and_replay
from .faults import NonFiniteGuard, oom_hint
from .flops import flops_model, mfu, peak_flops
from .kl_control import KLControl
from .metrics import MetricsLogger, memory_metrics, rollout_metrics
from .preemption import PreemptionHandler
from .replay import GroupReplayBuffer
from .state import Counters, PerRank, TrainState


@dataclass
class TrainerParts:
    """What a training rank's step runs on, built by ``train.py``: the learners, the rollouts
    (colocated or split), the loader they advance, the logger."""

    tokenizer: Any
    actor: Actor
    rollouts: LocalRollouts | RemoteRollouts
    loader: PromptLoader
    logger: MetricsLogger
    val_examples: list[PromptExample]
    reference: torch.nn.Module | None = None
    critic: Any = None  # Critic
    # False where a resume rebuilds the frozen reference as it was (from model.path, before the checkpoint loads)
    reference_in_checkpoint: bool = True


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
        self.rollouts, self.loader, self.logger = parts.rollouts, parts.loader, parts.logger
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
                 "trainer": Counters(self.state, self.loader, self.kl_control, self.non_finite, actor, self.critic,
                                     self.rollouts),
                 "rng": RNGState()}
        if self.reference is not None and self.parts.reference_in_checkpoint:  # the frozen policy of step 0, when
            # nothing else rebuilds it (the embedded model's warm start); from model.path a resume rebuilds it
            state["reference"] = ModelOptimizerState(self.reference)
        if self.critic is not None:
            state["critic"] = ModelOptimizerState(self.critic.model, self.critic.optimizer, self.critic.scheduler)
        if self.replay is not None:
            state["replay"] = PerRank(self.replay)
        if self.topo.placement == "split":  # batches generated ahead of their step
            state["in_flight"] = PerRank(self.rollouts)
        return state

    def save(self, checkpoints: CheckpointManager) -> str:
        self.rollouts.drain()
        path = checkpoints.save(self.step, self.checkpoint_state(), hf_config=self.actor.model.config,
                                tokenizer=self.parts.tokenizer, model_dir=self.cfg.model.path)
        self.state.saved_step = self.step
        self.logger.write(f"step {self.step}: checkpoint {path}")
        return path

    # --- the step ---------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        timer = Timer()
        step_start = time.perf_counter()
        rollout, rollout_side = self.rollouts.next(self.step, timer)
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
        return {**self.rollout_metrics(rollout, timer.timings), **rollout_side, **rollout.metrics, **filter_metrics,
                **target_metrics, **update_metrics, **guard, **timer.timings, **memory_metrics(self.topo.device)}

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

    def rollout_metrics(self, rollout: Rollout, timings: dict[str, float]) -> dict[str, float]:
        batch = rollout.batch(self.pad_id)
        return rollout_metrics(rollout.samples.token_ids, rollout.samples.finish_reasons, rollout.rewards_GN(),
                               float(batch.attention_mask_BT.sum()), timings)

    # --- evaluation and the run -------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy of the current actor (one greedy, or ``rollout.val_temperature``,
        sample per held-out prompt)."""
        with oom_hint("eval"):
            return self.rollouts.evaluate()

    def close(self) -> None:
        """Release the engine (vLLM must stop before the process group is destroyed)."""
        self.rollouts.close()

    def evaluation_due(self, preempted: bool) -> bool:
        """Held-out evaluation after this step: every ``trainer.val_every`` steps before the
        last, and after the last (``trainer.eval_after``) unless a preemption stops the run."""
        t, step = self.cfg.trainer, self.step
        periodic = bool(t.val_every) and step % t.val_every == 0 and step < t.total_steps
        final = step >= t.total_steps and t.eval_after and not preempted
        return bool(self.parts.val_examples) and (periodic or final)

    def run(self, checkpoints: CheckpointManager | None = None,
            preemption: PreemptionHandler | None = None) -> dict[str, dict[str, float]]:
        """Train up to ``trainer.total_steps`` steps (from ``self.step``, which a resume sets);
        returns held-out metrics before (fresh runs only) and after. ``trainer.val_every`` adds
        held-out evaluations; checkpoints are saved every ``trainer.save_every`` steps, at the end
        (``trainer.save_at_end``), and when a preemption signal arrives (then the run stops early,
        without the final eval).
        After every step the rollouts get the new weights when they need them (split placement)."""
        t, total = self.cfg.trainer, self.cfg.trainer.total_steps
        results: dict[str, dict[str, float]] = {}
        self.rollouts.start(self.step)
        before = t.eval_before and bool(self.parts.val_examples) and self.step == 0
        self.rollouts.after_step(self.step, before or (self.step >= total and self.evaluation_due(False)),
                                 stop=self.step >= total)
        if before:
            results["before"] = self.logger.log(self.step, self.evaluate(), advance=False)
        while self.step < total:
            metrics = self.train_step()
            self.state.step += 1
            preempted = preemption is not None and preemption.requested()
            evaluate = self.evaluation_due(preempted)
            metrics.update(self.rollouts.after_step(self.step, evaluate, stop=preempted or self.step >= total))
            self.logger.log(self.step, metrics)
            if evaluate and self.step < total:
                self.logger.log(self.step, self.evaluate(), advance=False)
            periodic = t.save_every and self.step % t.save_every == 0 and self.step < total
            if checkpoints is not None and periodic:
                self.save(checkpoints)
            if preempted:
                self.logger.write(f"step {self.step}: preemption signal received; saving and stopping")
                if checkpoints is not None and not periodic:
                    self.save(checkpoints)
                results["preempted"] = {"step": float(self.step)}
                return results
        if checkpoints is not None and t.save_at_end and self.state.saved_step != self.step:
            self.save(checkpoints)
        if self.evaluation_due(False):
            results["after"] = self.logger.log(self.step, self.evaluate(), advance=False)
        return results
