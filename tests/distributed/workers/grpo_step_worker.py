"""Run under torchrun: one GRPO step of the real ``Trainer`` on a fixed rollout, once per loss mode.

Every world size builds the same tiny Qwen2 actor (and a reference from another seed, so the KL
term and its gradient are non-zero from the first optimizer step), shards both with FSDP2, and
feeds the trainer a fixed global rollout: 8 prompts x 4 samples of unequal lengths with fixed
rewards. Prompts reach each rank through ``PromptLoader`` as in training; a stub engine returns
the fixed samples, so ``Generation.generate`` / ``Experience.targets`` / ``Trainer.update`` run
unchanged: old and
reference logprobs, GRPO advantages, then 2 mini-batches (2 optimizer steps) of uneven
micro-batches with the k3 KL loss. Rank 0 saves the initial and final full weights and the
rank-reduced update metrics of every loss mode to ``argv[1]``.
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM

from spmd_rlhf.config import LOSS_AGG_MODES, Config, micro_batch_tokens, validate
from spmd_rlhf.models.heads import build_critic
from spmd_rlhf.trainer.critic import Critic
from spmd_rlhf.data.datasets import PromptExample
from spmd_rlhf.data.loader import PromptLoader
from spmd_rlhf.distributed.topology import Topology, init_distributed, shutdown
from spmd_rlhf.models.parallelize import parallelize
from spmd_rlhf.rollout.base import EngineBase, Samples, SamplingConfig
from spmd_rlhf.rollout.generation import Generation
from spmd_rlhf.rollout.local import LocalRollouts
from spmd_rlhf.rollout.scoring import Scoring
from spmd_rlhf.rollout.sync import WeightSync
from spmd_rlhf.tasks.arithmetic import build_tokenizer, tiny_model_config
from spmd_rlhf.trainer.actor import Actor
from spmd_rlhf.trainer.loop import Trainer, TrainerParts
from spmd_rlhf.trainer.metrics import reduce_metrics
from spmd_rlhf.trainer.micro import MicroBatcher
from spmd_rlhf.trainer.schedule import build_scheduler

PROMPTS, N = 8, 4
MINI_BATCH = 4  # prompts per optimizer step: 2 optimizer steps
MICRO_BATCH = 3  # sequences per forward/backward and rank: uneven micro-batches at every world size
ACTOR_SEED, REF_SEED = 0, 1
# two groups with equal rewards (advantage 0: only the KL term acts on them)
REWARDS = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 0]]
METRICS = ("actor/grad_norm", "actor/pg_loss", "actor/kl_loss")
# algorithm variants run on top of the loss modes: (adv_estimator, policy_loss, KL in the reward)
VARIANTS = {"ppo": ("gae", "ppo", True), "gspo": ("grpo", "gspo", False), "rloo": ("rloo", "ppo", True),
            "reinforce_pp": ("reinforce_pp", "ppo", True)}
# fast paths, each against the loss mode "token-mean" run through the slow path: packed micro-batches
# (token budget 24, uneven groups); on-policy (one mini-batch: the update's own logprobs are the old
# ones, TIS against the engine's logprobs inside the update) and its forced two-pass twin
FAST_PATHS = ("packed", "on_policy", "on_policy_two_pass", "on_policy_packed")
FAST_METRICS = ("actor/grad_norm", "actor/pg_loss", "actor/kl_loss", "rollout/logprob_diff", "rollout/tis_weight")
VARIANT_METRICS = {"ppo": ("actor/grad_norm", "actor/pg_loss", "critic/vf_loss", "critic/grad_norm"),
                   "gspo": ("actor/grad_norm", "actor/pg_loss"), "rloo": ("actor/grad_norm", "actor/pg_loss"),
                   "reinforce_pp": ("actor/grad_norm", "actor/pg_loss")}


def fixed_rollout(vocab: int, eos: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Prompts (distinct first tokens) and their N responses, lengths 2-6 and 1-8 tokens."""
    gen = torch.Generator().manual_seed(1234)
    prompts, responses = [], []
    for i in range(PROMPTS):
        length = int(torch.randint(1, 6, (1,), generator=gen))
        prompts.append([3 + i] + torch.randint(3, vocab, (length,), generator=gen).tolist())
        group = []
        for j in range(N):
            tokens = torch.randint(3, vocab, (int(torch.randint(1, 8, (1,), generator=gen)),), generator=gen).tolist()
            group.append(tokens + [eos] if j % 2 == 0 else tokens)  # some stopped, some cut at the limit
        responses.append(group)
    return prompts, responses


class ZeroScorer:
    """Scores every response 0; the worker then sets the fixed rewards itself."""

    def score(self, data_sources, texts, ground_truths, extra_infos):
        return [0.0] * len(texts), {}


def fixed_setup():
    """``(tokenizer, hf_config, examples, engine)``: the tiny model's config, the fixed prompts and
    an engine that answers each with its fixed responses."""
    tokenizer = build_tokenizer()
    hf_config = tiny_model_config(len(tokenizer), 32, 2, 4, tokenizer.pad_token_id, tokenizer.eos_token_id)
    prompt_ids, responses = fixed_rollout(len(tokenizer), tokenizer.eos_token_id)
    examples = [PromptExample(ids, "fixed", "", index=i) for i, ids in enumerate(prompt_ids)]
    return tokenizer, hf_config, examples, FixedEngine({tuple(p): r for p, r in zip(prompt_ids, responses)})


class FixedEngine(EngineBase):
    """A rollout engine that returns the fixed samples of each prompt."""

    def __init__(self, table: dict[tuple[int, ...], list[list[int]]]):
        self.table = table

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig, seeds=None, vision=None) -> Samples:
        assert sampling.n == N
        token_ids = [list(r) for p in prompt_token_ids for r in self.table[tuple(p)]]
        return Samples(token_ids, [[0.0] * len(t) for t in token_ids], ["stop"] * len(token_ids))


def make_config(mode: str, world: int) -> Config:
    if mode in VARIANTS:
        return variant_config(mode, world)
    if mode in FAST_PATHS:
        return fast_path_config(mode, world)
    cfg = Config()
    t = cfg.trainer
    t.total_steps, t.batch_size, t.mini_batch_size, t.micro_batch_size = 1, PROMPTS, MINI_BATCH, MICRO_BATCH
    t.lr, t.weight_decay, t.grad_clip, t.warmup_steps = 1e-3, 0.0, 1.0, 0  # no decay: only gradients move weights
    cfg.rollout.n, cfg.rollout.temperature = N, 1.0
    a = cfg.algorithm
    a.loss_agg_mode, a.use_kl_loss, a.kl_coef, a.kl_estimator, a.ppo_epochs = mode, True, 0.1, "k3", 1
    validate(cfg, world)
    return cfg


def fast_path_config(name: str, world: int) -> Config:
    cfg = make_config("token-mean", world)
    if "packed" in name:
        cfg.trainer.max_tokens_per_micro_batch = 24
    if name.startswith("on_policy"):
        cfg.trainer.mini_batch_size = PROMPTS  # one optimizer step over the whole batch
        cfg.algorithm.tis_cap = 2.0
    cfg.model.logprob_chunk_tokens = 5  # several lm_head chunks per micro-batch
    validate(cfg, world)
    return cfg


def variant_config(name: str, world: int) -> Config:
    """A PPO-family variant: token-mean loss, KL either in the reward (k1, 0.1) or not at all."""
    cfg = make_config("token-mean", world)
    a = cfg.algorithm
    a.adv_estimator, a.policy_loss, kl_in_reward = VARIANTS[name]
    a.use_kl_loss, a.kl_coef = False, 0.0
    a.kl_in_reward.enable, a.kl_in_reward.coef = kl_in_reward, 0.1
    a.whiten_advantages = name in ("ppo", "reinforce_pp")
    if name == "gspo":
        a.clip_low, a.clip_high = 3e-4, 4e-4
    cfg.critic.lr, cfg.critic.clip_range_value = 1e-3, 0.2
    validate(cfg, world)
    return cfg


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}


def run_mode(mode: str, topo: Topology, tokenizer, hf_config, examples, engine) -> dict:
    cfg = make_config(mode, topo.world_size)
    torch.manual_seed(ACTOR_SEED)
    actor_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation="sdpa")
    initial = {name: p.detach().clone() for name, p in actor_model.named_parameters()}
    actor_model = parallelize(actor_model, topo.fsdp_mesh, topo.device, trainable=True)
    torch.manual_seed(REF_SEED)
    reference = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation="sdpa")
    reference = parallelize(reference, topo.fsdp_mesh, topo.device, trainable=False)

    t = cfg.trainer
    optimizer = torch.optim.AdamW(actor_model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = build_scheduler(optimizer, t.warmup_steps, PROMPTS // t.mini_batch_size, t.min_lr_ratio)
    batcher = MicroBatcher(micro_batch_tokens(cfg, topo.device.type), cfg.model.logprob_chunk_tokens)
    actor = Actor(actor_model, optimizer, scheduler, topo.dp_size, t.grad_clip, topo.device, batcher=batcher)
    loader = PromptLoader(examples, t.batch_size, topo.rank, topo.world_size, cfg.data.seed, cfg.data.shuffle,
                          mini_batch=t.mini_batch_size)  # as train.py builds it
    critic = None
    if cfg.algorithm.adv_estimator == "gae":
        critic_model = build_critic(hf_config, topo, actor_model, head_init_std=0.02, seed=3)
        critic_opt = torch.optim.AdamW(critic_model.parameters(), lr=cfg.critic.lr, weight_decay=0.0)
        critic = Critic(critic_model, critic_opt, build_scheduler(critic_opt, 0, PROMPTS // MINI_BATCH), topo.dp_size,
                        1.0, topo.device)
    generation = Generation(cfg, topo, engine, loader, Scoring(cfg, tokenizer, ZeroScorer()))
    rollouts = LocalRollouts(cfg, topo, engine, WeightSync(engine, actor_model, topo, 2**20), generation, [])
    trainer = Trainer(cfg, topo, TrainerParts(tokenizer, actor, rollouts, loader, None, [], reference=reference,
                                              critic=critic))
    if mode == "on_policy_two_pass":
        trainer.experience.on_policy = lambda: False  # the same step through a separate old-logprob pass

    prompts = loader.next()
    rollout = generation.generate(prompts, step=0)
    rollout.rewards = torch.tensor([REWARDS[p.index] for p in prompts], dtype=torch.float32).view(-1)
    targets, critic_targets, _ = trainer.experience.targets(rollout, filtered=[])
    metrics = reduce_metrics(trainer.update(rollout, targets, critic_targets, train_actor=True))
    return {
        "initial": initial,
        "final": full_weights(actor_model),
        "metrics": {key: metrics[key] for key in VARIANT_METRICS.get(mode, FAST_METRICS if mode in FAST_PATHS
                                                                      else METRICS) if key in metrics},
        "critic_final": full_weights(critic.model) if critic is not None else {},
        "optimizer_steps": scheduler.last_epoch,
        "prompts": [p.index for p in prompts],
    }


def main() -> None:
    out_path = sys.argv[1]
    topo = init_distributed(1, 1, 120)
    tokenizer, hf_config, examples, engine = fixed_setup()
    results = {mode: run_mode(mode, topo, tokenizer, hf_config, examples, engine) for mode in LOSS_AGG_MODES}
    results.update({name: run_mode(name, topo, tokenizer, hf_config, examples, engine) for name in VARIANTS})
    results.update({name: run_mode(name, topo, tokenizer, hf_config, examples, engine) for name in FAST_PATHS})
    if topo.is_main:
        torch.save({"world": topo.world_size, "modes": results}, out_path)
    shutdown()


if __name__ == "__main__":
    main()
