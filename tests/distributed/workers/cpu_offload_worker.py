"""Run under torchrun: one GRPO step with and without ``trainer.cpu_offload``, and where the state lives.

The step is ``grpo_step_worker``'s (the real ``Trainer`` on a fixed rollout, 2 mini-batches, the k3
KL loss), built as ``train.py`` builds it: the actor by ``parallelize(cpu_offload=...)``, the
reference by ``build_reference`` (it follows the actor's placement), AdamW by ``build_optimizer``.
Runs: plain, offloaded, and offloaded with ``fused=True`` (the CPU fused kernel). For each, rank 0
saves to ``argv[1]`` the initial and final full weights, the update metrics, the weight-sync streams
(reshard and whole tensors) of the final weights, and what FSDP holds: every FSDP module's offload
policy, and the devices of parameters, gradients (after backward) and optimizer state.
"""

from __future__ import annotations

import sys

import torch
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers import AutoModelForCausalLM

from spmd_rlhf.config import micro_batch_tokens
from spmd_rlhf.data.loader import PromptLoader
from spmd_rlhf.distributed.reshard import full_tensor_stream, reshard_stream
from spmd_rlhf.distributed.topology import Topology, init_distributed, shutdown
from spmd_rlhf.distributed.tp_plan import replicated_dims
from spmd_rlhf.models.build import build_reference
from spmd_rlhf.models.parallelize import cpu_offloaded, parallelize
from spmd_rlhf.rollout.generation import Generation
from spmd_rlhf.rollout.local import LocalRollouts
from spmd_rlhf.rollout.scoring import Scoring
from spmd_rlhf.rollout.sync import WeightSync
from spmd_rlhf.train import build_optimizer
from spmd_rlhf.trainer.actor import Actor
from spmd_rlhf.trainer.loop import Trainer, TrainerParts
from spmd_rlhf.trainer.metrics import reduce_metrics
from spmd_rlhf.trainer.micro import MicroBatcher
from spmd_rlhf.trainer.offload import ActorOffload
from tests.distributed.workers.grpo_step_worker import (ACTOR_SEED, METRICS, PROMPTS, REWARDS, ZeroScorer,
                                                        fixed_setup, full_weights, make_config)

RUNS = {"plain": (False, None), "offload": (True, None), "offload_fused": (True, True)}  # (cpu_offload, fused)


def policies(model: torch.nn.Module) -> list[str]:
    """The offload policy class of every FSDP module's parameter group."""
    return [type(fully_shard.state(m)._fsdp_param_group.offload_policy).__name__
            for m in model.modules() if isinstance(m, FSDPModule)]


def devices(tensors) -> list[str]:
    return sorted({t.device.type for t in tensors})


def record_placement(optimizer: torch.optim.Optimizer, model: torch.nn.Module, seen: dict) -> None:
    """Record, around every optimizer step, where gradients (after backward) and the state are."""

    def before(opt, args, kwargs):
        seen.setdefault("grads", set()).update(devices(p.grad.to_local() for p in model.parameters()))

    def after(opt, args, kwargs):
        state = [v.to_local() for s in opt.state.values() for k, v in s.items() if k != "step"]
        seen.setdefault("state", set()).update(devices(state))

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)


def synced(model: torch.nn.Module, topo: Topology) -> dict[str, dict[str, torch.Tensor]]:
    """The final weights as both weight-sync streams deliver them to an engine (tp = 1: whole tensors)."""
    streams = {"reshard": reshard_stream(model.named_parameters(), replicated_dims(model), topo.reshard_mesh, 2**12),
               "full": full_tensor_stream(model.named_parameters(), 2**12)}
    return {kind: {n: t.clone() for bucket in stream for n, t in bucket} for kind, stream in streams.items()}


def run(name: str, topo: Topology, tokenizer, hf_config, examples, engine) -> dict:
    offload, fused = RUNS[name]
    cfg = make_config("token-mean", topo.world_size)
    cfg.trainer.cpu_offload = offload
    torch.manual_seed(ACTOR_SEED)
    actor_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation="sdpa")
    initial = {n: p.detach().clone() for n, p in actor_model.named_parameters()}
    actor_model = parallelize(actor_model, topo.fsdp_mesh, topo.device, trainable=True, cpu_offload=offload)
    with torch.no_grad():  # a reference away from the actor, so the KL term acts from the first mini-batch
        for p in actor_model.parameters():
            p.to_local().add_(0.01)
    reference = build_reference(actor_model, hf_config, topo)
    with torch.no_grad():
        for p in actor_model.parameters():
            p.to_local().sub_(0.01)

    t = cfg.trainer
    optimizer, scheduler = build_optimizer(actor_model, t.lr, t.weight_decay, t.betas, t.warmup_steps,
                                           PROMPTS // t.mini_batch_size, t.min_lr_ratio, fused, topo.device)
    seen: dict = {}
    record_placement(optimizer, actor_model, seen)
    batcher = MicroBatcher(micro_batch_tokens(cfg, topo.device.type), cfg.model.logprob_chunk_tokens)
    actor = Actor(actor_model, optimizer, scheduler, topo.dp_size, t.grad_clip, topo.device, batcher=batcher)
    loader = PromptLoader(examples, t.batch_size, topo.rank, topo.world_size, cfg.data.seed, cfg.data.shuffle,
                          mini_batch=t.mini_batch_size)
    generation = Generation(cfg, topo, engine, loader, Scoring(cfg, tokenizer, ZeroScorer()))
    rollouts = LocalRollouts(cfg, topo, engine, WeightSync(engine, actor_model, topo, 2**20), generation, [])
    trainer = Trainer(cfg, topo, TrainerParts(tokenizer, actor, rollouts, loader, None, [], reference=reference))

    prompts = loader.next()
    rollout = generation.generate(prompts, step=0)
    rollout.rewards = torch.tensor([REWARDS[p.index] for p in prompts], dtype=torch.float32).view(-1)
    targets, critic_targets, _ = trainer.experience.targets(rollout, filtered=[])
    metrics = reduce_metrics(trainer.update(rollout, targets, critic_targets, train_actor=True))
    cuda_default = build_optimizer(actor_model, 1.0, 0.0, (0.9, 0.999), 0, 1, 0.0, None, torch.device("cuda"))[0]
    return {
        "initial": initial,
        "final": full_weights(actor_model),
        "synced": synced(actor_model, topo),
        "metrics": {key: metrics[key] for key in METRICS},
        "optimizer_steps": scheduler.last_epoch,
        "offloaded": (cpu_offloaded(actor_model), cpu_offloaded(reference)),
        "policies": {"actor": policies(actor_model), "reference": policies(reference)},
        "params": devices(p.to_local() for p in actor_model.parameters()),
        "reference_params": devices(p.to_local() for p in reference.parameters()),
        "grads": sorted(seen["grads"]),
        "state": sorted(seen["state"]),
        "fused": optimizer.defaults["fused"],
        "fused_default_on_cuda": cuda_default.defaults["fused"],
        "rollout_offload_enabled": ActorOffload(actor_model, optimizer, torch.device("cuda"), True).enabled,
    }


def main() -> None:
    out_path = sys.argv[1]
    topo = init_distributed(1, 1, 120)
    tokenizer, hf_config, examples, engine = fixed_setup()
    results = {name: run(name, topo, tokenizer, hf_config, examples, engine) for name in RUNS}
    if topo.is_main:
        torch.save({"world": topo.world_size, "runs": results}, out_path)
    shutdown()


if __name__ == "__main__":
    main()
