"""The RL step of DESIGN §2, run by every rank.

    prompts -> sync weights (DTensor reshard) -> generate + score (dynamic sampling rounds)
            -> filter / replay -> old, reference logprobs, values -> token rewards (KL in reward)
            -> advantages (grpo, rloo, remax, reinforce++, gae) -> KL guard
            -> PPO epochs x mini-batches (actor, critic) -> reduced metrics

Each rank keeps the ``n`` samples of its own prompts, so groups never straddle ranks, and every
rank holds the same number of sequences (collectives stay in step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..algorithms.advantages import outcome_token_rewards
from ..algorithms.correction import mismatch_sums, truncated_is_weights
from ..algorithms.kl import kl_reward_penalty
from ..algorithms.shaping import keep_groups, overlong_penalty
from ..config import Config
from ..data.batch import response_tensor
from ..data.datasets import PromptExample
from ..data.loader import PromptLoader
from ..distributed.comm import all_reduce_floats
from ..distributed.reshard import full_tensor_stream, reshard_stream
from ..distributed.topology import Topology
from ..rewards.registry import RewardScorer
from ..rollout.base import RolloutEngine, SamplingConfig
from .actor import Actor, PolicyTargets
from .estimate import compute_advantages
from .evaluate import evaluate
from .groups import Rollout, concat
from .kl_control import KLControl
from .metrics import MetricsLogger
from .offload import ActorOffload
from .checkpoint import CheckpointManager, ModelOptimizerState, RNGState
from .faults import NonFiniteGuard, oom_hint
from .flops import flops_model, mfu, peak_flops
from .preemption import PreemptionHandler
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
    tokens = max(float(mask_BT.sum()), 1.0)
    metrics = {"rollout/logprob_diff": float(sums["rollout/logprob_diff"]) / tokens,
               "rollout/logprob_diff/max": float(sums["rollout/logprob_diff/max"])}
    if tis_cap <= 0:
        return None, metrics
    weights = truncated_is_weights(old_BT, engine_BT, mask_BT, tis_cap)
    metrics["rollout/tis_weight"] = float(weights.sum()) / tokens
    return weights, metrics


class Trainer:
    def __init__(self, cfg: Config, topo: Topology, tokenizer, actor: Actor, reference, engine: RolloutEngine,
                 shard_dims: dict[str, int | None], scorer: RewardScorer, loader: PromptLoader,
                 val_examples: list[PromptExample], logger: MetricsLogger, critic=None, reward_model=None):
        self.cfg = cfg
        self.topo = topo
        self.tokenizer = tokenizer
        self.actor = actor
        self.reference = reference
        self.engine = engine
        self.shard_dims = shard_dims
        self.scorer = scorer
        self.loader = loader
        self.val_examples = val_examples
        self.logger = logger
        self.critic = critic
        self.reward_model = reward_model
        self.kl_control = KLControl(cfg.algorithm)
        f = cfg.algorithm.filter
        self.replay = None
        if f.replay_capacity > 0:
            self.replay = GroupReplayBuffer(f.replay_capacity, f.replay_min_reward, cfg.trainer.seed + 31 * topo.rank)
        self.non_finite = NonFiniteGuard(cfg.trainer.max_consecutive_skips)
        self.flops = flops_model(actor.model.config)
        device_name = torch.cuda.get_device_name(topo.device) if topo.device.type == "cuda" else topo.device.type
        self.peak_flops = peak_flops(device_name, cfg.trainer.peak_tflops)
        self.step = 0
        self.saved_step: int | None = None  # step of the last checkpoint this process wrote

    # --- state ------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        """Everything a bit-identical resume needs, as checkpoint components (DESIGN §8)."""
        state = {"actor": ModelOptimizerState(self.actor.model, self.actor.optimizer, self.actor.scheduler),
                 "trainer": _Counters(self), "rng": RNGState()}
        if self.reference is not None:  # the frozen policy of step 0: rebuilding it would copy the resumed actor
            state["reference"] = ModelOptimizerState(self.reference)
        if self.critic is not None:
            state["critic"] = ModelOptimizerState(self.critic.model, self.critic.optimizer, self.critic.scheduler)
        if self.replay is not None:
            state["replay"] = _PerRank(self.replay)
        return state

    def save(self, checkpoints: CheckpointManager) -> str:
        path = checkpoints.save(self.step, self.checkpoint_state(), hf_config=self.actor.model.config,
                                tokenizer=self.tokenizer)
        self.saved_step = self.step
        self.logger.write(f"step {self.step}: checkpoint {path}")
        return path

    # --- phases -----------------------------------------------------------------------------

    def sync_weights(self) -> float:
        """Reshard the actor into the engine (tp slices, or whole tensors for an engine that
        ``wants_full_weights``); returns bytes received by this rank."""
        received = 0

        def counted(stream):
            nonlocal received
            for bucket in stream:
                received += sum(t.numel() * t.element_size() for _, t in bucket)
                yield bucket

        bucket_bytes, dtype = self.cfg.rollout.bucket_mb * 2**20, getattr(self.engine, "dtype", None)
        params = self.actor.model.named_parameters()
        if getattr(self.engine, "wants_full_weights", False):
            stream = full_tensor_stream(params, bucket_bytes, dtype)
        else:
            stream = reshard_stream(params, self.shard_dims, self.topo.reshard_mesh, bucket_bytes, dtype)
        self.engine.load_weights(counted(stream))
        return float(received)

    def sampling(self, step: int, round_: int = 0, greedy: bool = False) -> SamplingConfig:
        r = self.cfg.rollout
        seed = r.seed + 1_000_003 * step + 7919 * self.topo.gen_dp_rank + 104_729 * round_
        if greedy:
            return SamplingConfig(max_new_tokens=r.max_new_tokens, n=1, temperature=0.0, seed=seed)
        return SamplingConfig(max_new_tokens=r.max_new_tokens, n=r.n, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, seed=seed, ignore_eos=r.ignore_eos)

    def generate(self, prompts: list[PromptExample], step: int, round_: int = 0) -> Rollout:
        """Sample ``rollout.n`` responses per prompt and score them (ReMax: also score a greedy one)."""
        sampling = self.sampling(step, round_)
        samples = self.engine.generate([p.prompt_ids for p in prompts], sampling)
        rollout = Rollout([p for p in prompts for _ in range(sampling.n)], samples, sampling.n)
        rollout.metrics = self.score(rollout)
        if self.cfg.algorithm.adv_estimator == "remax":
            greedy = self.engine.generate([p.prompt_ids for p in prompts], self.sampling(step, round_, greedy=True))
            baseline = Rollout(list(prompts), greedy, 1)
            self.score(baseline, shaping=False)
            rollout.greedy_rewards = baseline.rewards
            rollout.metrics["reward/greedy_baseline"] = float(baseline.rewards.mean())
        return rollout

    def score(self, rollout: Rollout, shaping: bool = True) -> dict[str, float]:
        """The training reward: rule_weight * rule score + weight * reward-model score, plus
        DAPO's overlong penalty (``shaping``)."""
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

    def collect(self, prompts: list[PromptExample]) -> Rollout:
        """Generate and score; with dynamic sampling, keep only groups whose rewards differ and
        generate for further batches of prompts (every rank together, for tp groups and the
        loader) until every rank has as many groups as it has prompts, or ``max_rounds`` is
        reached; then fill up with dropped groups (they give no policy gradient)."""
        ds = self.cfg.algorithm.dynamic_sampling
        first = self.generate(prompts, self.step)
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
            part = self.generate(self.loader.next(), self.step, rounds)
        pool = concat(kept + dropped)
        rollout = pool.groups(list(range(quota)))  # kept groups first, then dropped ones
        filled = max(0, quota - have)
        rollout.metrics = {**first.metrics, "rollout/dynamic_sampling/rounds": float(rounds),
                           "rollout/dynamic_sampling/kept_first_round": float(keep_groups(first.rewards_GN(), 0.0)
                                                                               .float().mean()),
                           "rollout/dynamic_sampling/num_filled_groups": float(filled)}
        return rollout

    def filter_and_replay(self, rollout: Rollout) -> tuple[Rollout, list[int], dict[str, float]]:
        """Reward-variance filter and replay: returns the rollout (some groups possibly swapped
        for replayed ones), the groups left without loss, and metrics."""
        f = self.cfg.algorithm.filter
        metrics: dict[str, float] = {}
        filtered: list[int] = []
        if f.min_reward_std >= 0:
            keep = keep_groups(rollout.rewards_GN(), f.min_reward_std)
            filtered = [g for g in range(rollout.num_groups) if not keep[g]]
        if self.replay is not None:
            fresh = rollout
            rollout, replaced = self.replay.mix(rollout, f.replay_fraction, filtered)
            metrics["filter/num_replayed_groups"] = float(replaced)
            metrics["filter/num_buffered_groups_added"] = float(self.replay.add(fresh))
            metrics["filter/buffer_size"] = float(len(self.replay))
            if f.min_reward_std >= 0:  # re-check: replayed groups replaced filtered ones first
                keep = keep_groups(rollout.rewards_GN(), f.min_reward_std)
                filtered = [g for g in range(rollout.num_groups) if not keep[g]]
        if f.min_reward_std >= 0:
            metrics["filter/num_filtered_groups"] = float(len(filtered))
        return rollout, filtered, metrics

    def targets(self, rollout: Rollout, filtered: list[int]) -> tuple[PolicyTargets, CriticTargets | None, dict]:
        """Old/reference logprobs, values, token rewards (KL in the reward if configured) and
        advantages; truncated importance weights (``algorithm.tis_cap``); the engine/actor
        logprob mismatch. Filtered groups get a zero loss mask."""
        r, algo, micro = self.cfg.rollout, self.cfg.algorithm, self.cfg.trainer.micro_batch_size
        batch = rollout.batch(self.tokenizer.pad_token_id)
        for g in filtered:
            batch.loss_mask_BT[g * r.n : (g + 1) * r.n] = 0.0
        mask = batch.loss_mask_BT
        # on-policy, the update's own (detached) log-probs are the old ones: no separate pass
        old = None if self.on_policy() else self.actor.logprobs(batch, micro, r.temperature)
        ref = None
        if self.reference is not None:
            ref = self.actor.logprobs(batch, micro, r.temperature, model=self.reference)
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
        valid = mask.bool()
        metrics["actor/advantage_mean"] = float(adv.advantages_BT[valid].mean()) if valid.any() else 0.0
        critic_targets = None
        if self.critic is not None:
            critic_targets = CriticTargets(values, adv.returns_BT)
            metrics["critic/values_mean"] = float(values[valid].mean()) if valid.any() else 0.0
            metrics["critic/returns_mean"] = float(adv.returns_BT[valid].mean()) if valid.any() else 0.0
        return policy, critic_targets, metrics

    def on_policy(self) -> bool:
        """One epoch over one mini-batch, and nothing before the update reads the old log-probs
        (KL in the reward and the KL guard do): the old log-probs are then the update's own."""
        a, t = self.cfg.algorithm, self.cfg.trainer
        return (a.ppo_epochs == 1 and t.mini_batch_size == t.batch_size and not a.kl_in_reward.enable
                and a.kl_guard.max_kl == 0)

    def update(self, rollout: Rollout, targets: PolicyTargets, critic_targets: CriticTargets | None,
               train_actor: bool) -> dict[str, float]:
        cfg = self.cfg
        batch = rollout.batch(self.tokenizer.pad_token_id)
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

    # --- the step ---------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        timings: dict[str, float] = {}

        def timed(name, fn, *args):
            start = time.perf_counter()
            with oom_hint(name):
                out = fn(*args)
            timings[f"timing/{name}"] = time.perf_counter() - start
            return out

        step_start = time.perf_counter()
        prompts = self.loader.next()
        self.engine.wake()
        received = timed("reshard", self.sync_weights)
        with self.actor_offloaded():  # the KV cache wakes inside generate, into the room left
            rollout = timed("generate", self.collect, prompts)  # scoring included
            self.engine.sleep()
        rollout, filtered, filter_metrics = self.filter_and_replay(rollout)
        targets, critic_targets, target_metrics = timed("reference", self.targets, rollout, filtered)
        train_actor = self.step >= self.cfg.critic.warmup_updates or self.critic is None
        if self.kl_control.max_kl > 0 and self.kl_control.guard(target_metrics["actor/kl_to_ref"],
                                                                 [self.actor.scheduler]):
            train_actor = False
            self.logger.write(f"step {self.step + 1}: KL to the reference {target_metrics['actor/kl_to_ref']:.4f} > "
                              f"algorithm.kl_guard.max_kl={self.kl_control.max_kl}; update skipped, learning rate "
                              f"scaled to {self.kl_control.lr_scale:.3g} of its schedule")
        skipped_before = self.actor.skipped_steps + (self.critic.skipped_steps if self.critic is not None else 0)
        update_metrics = timed("update", self.update, rollout, targets, critic_targets, train_actor)
        update_metrics.update(self._mfu(rollout, timings, train_actor))
        skipped = self.actor.skipped_steps + (self.critic.skipped_steps if self.critic is not None else 0)
        self.non_finite.after_step(skipped > skipped_before, self.step + 1)
        timings["timing/step"] = time.perf_counter() - step_start
        guard = {"kl_guard/skipped_steps": float(self.kl_control.guard_skips),
                 "kl_guard/lr_scale": self.kl_control.lr_scale} if self.kl_control.max_kl > 0 else {}
        return {**self._rollout_metrics(rollout, received, timings), **rollout.metrics, **filter_metrics,
                **target_metrics, **update_metrics, **guard, **timings}

    def _mfu(self, rollout: Rollout, timings: dict[str, float], train_actor: bool) -> dict[str, float]:
        """``perf/mfu/update`` and ``perf/mfu/logprobs`` (old and reference passes) of this rank's
        work, as model FLOPs over phase time and the device peak (``trainer/flops.py``)."""
        if self.peak_flops is None:
            return {}
        seq_lens = [p + len(r) for p, r in zip(rollout.prompt_lengths, rollout.samples.token_ids)]
        scored = [len(r) for r in rollout.samples.token_ids]
        passes = int(not self.on_policy()) + int(self.reference is not None)
        out = {}
        if train_actor:
            update = self.flops.train(seq_lens, scored) * self.cfg.algorithm.ppo_epochs
            out["perf/mfu/update"] = mfu(update, timings["timing/update"], self.peak_flops)
        if passes:
            out["perf/mfu/logprobs"] = mfu(passes * self.flops.forward(seq_lens, scored), timings["timing/reference"],
                                           self.peak_flops)
        return out

    def _rollout_metrics(self, rollout: Rollout, received: float, timings: dict[str, float]) -> dict[str, float]:
        lengths = torch.tensor([len(t) for t in rollout.samples.token_ids], dtype=torch.float32)
        stopped = sum(1 for f in rollout.samples.finish_reasons if f == "stop")
        groups = rollout.rewards_GN()
        batch = rollout.batch(self.tokenizer.pad_token_id)
        tokens = float(lengths.sum())
        tokens_per_s = float(batch.attention_mask_BT.sum()) / max(timings["timing/step"], 1e-9)
        return {
            "rollout/reward": float(rollout.rewards.mean()),
            "rollout/response_length": float(lengths.mean()),
            "rollout/response_length/max": float(lengths.max()),
            "rollout/stop_fraction": stopped / len(lengths),
            "rollout/solve_all_groups": float((groups.min(dim=1).values >= 1.0).float().mean()),
            "rollout/solve_none_groups": float((groups.max(dim=1).values <= 0.0).float().mean()),
            "rollout/weight_version": float(getattr(self.engine, "weight_version", 0)),
            "perf/reshard_bytes_per_rank": received,
            "perf/generate_tokens_per_s": tokens / max(timings["timing/generate"], 1e-9),
            "perf/tokens_per_s": tokens_per_s,  # this rank's, i.e. per GPU (the older name)
            "perf/tokens_per_s_per_gpu": tokens_per_s,
        }

    def evaluate(self) -> dict[str, float]:
        self.engine.wake()
        self.sync_weights()
        r = self.cfg.rollout
        sampling = SamplingConfig(max_new_tokens=r.max_new_tokens, n=1, temperature=r.val_temperature,
                                  top_p=r.top_p if r.val_temperature > 0 else 1.0,
                                  top_k=r.top_k if r.val_temperature > 0 else 0, seed=r.seed + 17)
        with self.actor_offloaded(), oom_hint("eval"):
            metrics = evaluate(self.engine, self.tokenizer, self.scorer, self.val_examples, sampling, self.topo)
            self.engine.sleep()
        return metrics

    def actor_offloaded(self) -> ActorOffload:
        """Actor and optimizer state in host memory for the block, if configured (CUDA)."""
        return ActorOffload(self.actor.model, self.actor.optimizer, self.topo.device,
                            self.cfg.trainer.offload_actor_during_rollout)

    def close(self) -> None:
        """Release the engine (vLLM must stop before the process group is destroyed)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def run(self, checkpoints: CheckpointManager | None = None,
            preemption: PreemptionHandler | None = None) -> dict[str, dict[str, float]]:
        """Train up to ``trainer.total_steps`` steps (from ``self.step``, which a resume sets);
        returns held-out metrics before (fresh runs only) and after. ``trainer.val_every`` adds
        held-out evaluations; checkpoints are saved every ``trainer.save_every`` steps, at the end,
        and when a preemption signal arrives (then the run stops early, without the final eval)."""
        t = self.cfg.trainer
        results: dict[str, dict[str, float]] = {}
        if t.eval_before and self.val_examples and self.step == 0:
            results["before"] = self.logger.log(self.step, self.evaluate(), advance=False)
        while self.step < t.total_steps:
            metrics = self.train_step()
            self.step += 1
            self.logger.log(self.step, metrics)
            if t.val_every and self.step % t.val_every == 0 and self.step < t.total_steps and self.val_examples:
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
        if checkpoints is not None and t.save_every and self.saved_step != self.step:
            self.save(checkpoints)
        if t.eval_after and self.val_examples:
            results["after"] = self.logger.log(self.step, self.evaluate(), advance=False)
        return results


class _Counters:
    """The trainer's scalar state: step, loader position, KL control, skip counters, and the
    engine's weight version (logged as ``rollout/weight_version``; a resumed run continues it)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def state_dict(self) -> dict:
        t = self.trainer
        return {"step": t.step, "loader": t.loader.state_dict(), "kl_control": t.kl_control.state_dict(),
                "actor_skipped_steps": t.actor.skipped_steps, "non_finite_in_a_row": t.non_finite.consecutive,
                "critic_skipped_steps": t.critic.skipped_steps if t.critic is not None else 0,
                "engine_weight_version": getattr(t.engine, "weight_version", 0)}

    def load_state_dict(self, state: dict) -> None:
        t = self.trainer
        t.step = int(state["step"])
        t.loader.load_state_dict(state["loader"])
        t.kl_control.load_state_dict(state["kl_control"])
        t.actor.skipped_steps = int(state["actor_skipped_steps"])
        t.non_finite.consecutive = int(state["non_finite_in_a_row"])
        if t.critic is not None:
            t.critic.skipped_steps = int(state["critic_skipped_steps"])
        if hasattr(t.engine, "weight_version"):
            t.engine.weight_version = int(state["engine_weight_version"])


class _PerRank:
    """A component whose state differs per rank (the replay buffer): saved in per-rank files."""

    per_rank = True

    def __init__(self, component):
        self.component = component

    def state_dict(self) -> dict:
        return self.component.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.component.load_state_dict(state)
