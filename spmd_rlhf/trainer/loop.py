"""The RL step of DESIGN §2, run by every rank.

    prompts -> sync weights (DTensor reshard) -> generate -> score -> old/ref logprobs
            -> group advantages -> PPO epochs x mini-batches -> reduced metrics

Each rank keeps the ``n`` samples of its own prompts, so GRPO groups never straddle ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..algorithms.advantages import broadcast_to_tokens, grpo_advantages
from ..config import Config
from ..data.batch import TokenBatch, collate, response_tensor
from ..data.datasets import PromptExample
from ..data.loader import PromptLoader
from ..distributed.reshard import full_tensor_stream, reshard_stream
from ..distributed.topology import Topology
from ..rewards.registry import RewardScorer
from ..rollout.base import RolloutEngine, SamplingConfig, Samples
from .actor import Actor, PolicyTargets
from .evaluate import evaluate
from .metrics import MetricsLogger
from .offload import ActorOffload


@dataclass
class Rollout:
    """This rank's samples of one step, with everything the update needs."""

    examples: list[PromptExample]  # one per sample (prompts repeated n times)
    samples: Samples
    batch: TokenBatch
    rewards: torch.Tensor  # [B]
    metrics: dict[str, float] = field(default_factory=dict)  # engine/actor mismatch, filled by targets()


def rollout_correction(old_BT: torch.Tensor, engine_BT: torch.Tensor, mask_BT: torch.Tensor,
                       tis_cap: float) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Truncated importance sampling weights and the engine/actor logprob mismatch.

    ``old_BT`` is the actor's log-prob of each sampled token (before the update), ``engine_BT``
    the rollout engine's. Weights are ``min(exp(old - engine), tis_cap)`` at response tokens
    (detached; None when ``tis_cap == 0``). Metrics: ``rollout/logprob_diff`` (mean |old - engine|
    over sampled tokens), its max, and the mean weight when TIS is on.
    """
    mask = mask_BT.bool()
    diff = (old_BT - engine_BT).abs()[mask]
    metrics = {
        "rollout/logprob_diff": float(diff.mean()) if diff.numel() else 0.0,
        "rollout/logprob_diff/max": float(diff.max()) if diff.numel() else 0.0,
    }
    if tis_cap <= 0:
        return None, metrics
    log_ratio = torch.where(mask, old_BT - engine_BT, 0.0).clamp(max=20.0)
    weights = torch.exp(log_ratio).clamp(max=tis_cap).masked_fill(~mask, 0.0).detach()
    metrics["rollout/tis_weight"] = float(weights[mask].mean()) if mask.any() else 0.0
    return weights, metrics


class Trainer:
    def __init__(self, cfg: Config, topo: Topology, tokenizer, actor: Actor, reference, engine: RolloutEngine,
                 shard_dims: dict[str, int | None], scorer: RewardScorer, loader: PromptLoader,
                 val_examples: list[PromptExample], logger: MetricsLogger):
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
        self.step = 0

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

    def sampling(self, step: int) -> SamplingConfig:
        r = self.cfg.rollout
        seed = r.seed + 1_000_003 * step + 7919 * self.topo.gen_dp_rank
        return SamplingConfig(max_new_tokens=r.max_new_tokens, n=r.n, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, seed=seed, ignore_eos=r.ignore_eos)

    def generate(self, prompts: list[PromptExample], step: int) -> Rollout:
        sampling = self.sampling(step)
        samples = self.engine.generate([p.prompt_ids for p in prompts], sampling)
        examples = [p for p in prompts for _ in range(sampling.n)]
        assert len(samples) == len(examples), "engine returned this rank's share, n per prompt"
        batch = collate([e.prompt_ids for e in examples], samples.token_ids, self.tokenizer.pad_token_id)
        return Rollout(examples, samples, batch, torch.zeros(len(examples)))

    def score(self, rollout: Rollout) -> dict[str, float]:
        texts = self.tokenizer.batch_decode(rollout.samples.token_ids, skip_special_tokens=True)
        ex = rollout.examples
        scores, metrics = self.scorer.score([e.data_source for e in ex], texts, [e.ground_truth for e in ex],
                                            [e.extra_info for e in ex])
        rollout.rewards = torch.tensor(scores, dtype=torch.float32)
        return metrics

    def targets(self, rollout: Rollout) -> PolicyTargets:
        """Advantages, old/reference logprobs and (``algorithm.tis_cap > 0``) truncated
        importance weights; records the engine/actor logprob mismatch in ``rollout.metrics``."""
        r, algo, micro = self.cfg.rollout, self.cfg.algorithm, self.cfg.trainer.micro_batch_size
        old = self.actor.logprobs(rollout.batch, micro, r.temperature)
        ref = None
        if self.reference is not None:
            ref = self.actor.logprobs(rollout.batch, micro, r.temperature, model=self.reference)
        adv_B = grpo_advantages(rollout.rewards.view(-1, r.n), algo.norm_adv_by_std).view(-1)
        engine_lp = response_tensor(rollout.samples.logprobs, rollout.batch, [len(e.prompt_ids) for e in rollout.examples])
        is_weights, rollout.metrics = rollout_correction(old, engine_lp, rollout.batch.loss_mask_BT, algo.tis_cap)
        return PolicyTargets(broadcast_to_tokens(adv_B, rollout.batch.loss_mask_BT), old, ref, is_weights)

    def update(self, rollout: Rollout, targets: PolicyTargets) -> dict[str, float]:
        cfg = self.cfg
        seqs_per_mini = cfg.trainer.mini_batch_size // self.topo.dp_size * cfg.rollout.n
        totals: dict[str, float] = {}
        updates = 0
        for _ in range(cfg.algorithm.ppo_epochs):
            for start in range(0, rollout.batch.size, seqs_per_mini):
                rows = slice(start, start + seqs_per_mini)
                mini = rollout.batch.select(rows)
                metrics = self.actor.update(mini, targets.select(rows, mini.loss_mask_BT.shape[1]), cfg.algorithm,
                                            cfg.trainer.micro_batch_size, cfg.rollout.temperature)
                updates += 1
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value
        return {k: (v if k == "actor/skipped_steps" else v / updates) for k, v in totals.items()}

    # --- the step ---------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        timings: dict[str, float] = {}

        def timed(name, fn, *args):
            start = time.perf_counter()
            out = fn(*args)
            timings[f"timing/{name}"] = time.perf_counter() - start
            return out

        step_start = time.perf_counter()
        prompts = self.loader.next()
        self.engine.wake()
        received = timed("reshard", self.sync_weights)
        with self.actor_offloaded():  # the KV cache wakes inside generate, into the room left
            rollout = timed("generate", self.generate, prompts, self.step)
            self.engine.sleep()
        reward_metrics = timed("reward", self.score, rollout)
        targets = timed("reference", self.targets, rollout)
        update_metrics = timed("update", self.update, rollout, targets)
        timings["timing/step"] = time.perf_counter() - step_start
        return {**self._rollout_metrics(rollout, received, timings), **rollout.metrics, **reward_metrics,
                **update_metrics, **timings}

    def _rollout_metrics(self, rollout: Rollout, received: float, timings: dict[str, float]) -> dict[str, float]:
        lengths = torch.tensor([len(t) for t in rollout.samples.token_ids], dtype=torch.float32)
        stopped = sum(1 for f in rollout.samples.finish_reasons if f == "stop")
        groups = rollout.rewards.view(-1, self.cfg.rollout.n)
        tokens = float(lengths.sum())
        return {
            "rollout/response_length": float(lengths.mean()),
            "rollout/response_length/max": float(lengths.max()),
            "rollout/stop_fraction": stopped / len(lengths),
            "rollout/solve_all_groups": float((groups.min(dim=1).values >= 1.0).float().mean()),
            "rollout/solve_none_groups": float((groups.max(dim=1).values <= 0.0).float().mean()),
            "rollout/weight_version": float(getattr(self.engine, "weight_version", 0)),
            "perf/reshard_bytes_per_rank": received,
            "perf/generate_tokens_per_s": tokens / max(timings["timing/generate"], 1e-9),
            "perf/tokens_per_s": float(rollout.batch.attention_mask_BT.sum()) / max(timings["timing/step"], 1e-9),
        }

    def evaluate(self) -> dict[str, float]:
        self.engine.wake()
        self.sync_weights()
        r = self.cfg.rollout
        sampling = SamplingConfig(max_new_tokens=r.max_new_tokens, n=1, temperature=r.val_temperature,
                                  top_p=r.top_p if r.val_temperature > 0 else 1.0,
                                  top_k=r.top_k if r.val_temperature > 0 else 0, seed=r.seed + 17)
        with self.actor_offloaded():
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

    def run(self) -> dict[str, dict[str, float]]:
        """Train ``trainer.total_steps`` steps; returns held-out metrics before and after."""
        results: dict[str, dict[str, float]] = {}
        if self.cfg.trainer.eval_before and self.val_examples:
            results["before"] = self.logger.log(self.step, self.evaluate(), advance=False)
        while self.step < self.cfg.trainer.total_steps:
            metrics = self.train_step()
            self.step += 1
            self.logger.log(self.step, metrics)
        if self.cfg.trainer.eval_after and self.val_examples:
            results["after"] = self.logger.log(self.step, self.evaluate(), advance=False)
        return results
