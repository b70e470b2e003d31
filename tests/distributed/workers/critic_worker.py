"""Run under torchrun: build critics with ``build_critic`` and train one with ``Critic.update``.

argv: OUT_PATH REWARD_MODEL_DIR. Every world size builds the same seeded tiny Qwen2 actor and
shards it, then:

* a critic from the actor (zero head) and one with a seeded random head: full weights, buffers and
  the values of the fixed batch;
* a critic from the reward-model directory: full weights and values of the fixed batch;
* for the RUNS below, a critic from the actor (random head, so the backbone learns from the first
  step) takes UPDATES optimizer steps on the fixed batch toward fixed returns, each rank holding
  its contiguous share of the rows, in micro-batches of 3 (uneven at every world size).

Rank 0 saves everything (values gathered into global row order) to OUT_PATH.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from spmd_rlhf.distributed.topology import Topology, init_distributed, shutdown
from spmd_rlhf.models.heads import build_critic
from spmd_rlhf.models.parallelize import parallelize
from spmd_rlhf.trainer.critic import Critic
from spmd_rlhf.trainer.metrics import reduce_metrics
from tests.distributed.workers.scalar_heads import ROWS, fixed_batch, rank_rows, tiny_config

MICRO_BATCH = 3
UPDATES = 6
HEAD_SEED, HEAD_STD = 3, 0.1
# run -> (loss aggregation, norm_constant, old values refreshed before every update?)
RUNS = {
    "token-mean": ("token-mean", None, True),
    "seq-mean-token-sum-norm": ("seq-mean-token-sum-norm", 8.0, True),
    "clipped": ("token-mean", None, False),  # PPO epochs on one rollout: values leave the clip range
}
CLIP_RANGE = 0.2
METRICS = ("critic/vf_loss", "critic/grad_norm", "critic/vf_clipfrac", "critic/vpred_mean")


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    state.update({f"buffer:{name}": b.detach().clone() for name, b in model.named_buffers()})
    return state


def gather_rows(local: torch.Tensor, world: int) -> torch.Tensor:
    parts: list[torch.Tensor] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(parts, local)
    return torch.cat(parts)


def fixed_returns() -> torch.Tensor:
    """Targets ``[ROWS, T-1]``: each row's outcome reward at every column (gamma = lam = 1), and
    garbage in the padding columns that the mask must hide."""
    rewards_B = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0])
    returns_BT = rewards_B[:, None].expand_as(fixed_batch(0).loss_mask_BT).clone()
    return torch.where(fixed_batch(0).loss_mask_BT.bool(), returns_BT, 1e6)


def train(critic_model: torch.nn.Module, topo: Topology, mode: str, norm_constant: float | None,
          refresh_old: bool) -> dict:
    optimizer = torch.optim.AdamW(critic_model.parameters(), lr=2e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    critic = Critic(critic_model, optimizer, scheduler, topo.dp_size, grad_clip=1.0, device=topo.device)
    rows = rank_rows(topo.rank, topo.world_size)
    batch = fixed_batch(0).select(rows)
    returns_BT = fixed_returns()[rows, : batch.loss_mask_BT.shape[1]]
    history = []
    old_values_BT = critic.values(batch, MICRO_BATCH)
    for step in range(UPDATES):
        if refresh_old and step > 0:
            old_values_BT = critic.values(batch, MICRO_BATCH)
        metrics = reduce_metrics(critic.update(batch, old_values_BT, returns_BT, CLIP_RANGE, mode, MICRO_BATCH,
                                               norm_constant))
        history.append({key: metrics[key] for key in METRICS})
    return {"history": history, "final": full_state(critic_model), "skipped": metrics["critic/skipped_steps"],
            "resharded": all(isinstance(p, DTensor) for p in critic_model.parameters())}


def values_of(critic_model: torch.nn.Module, topo: Topology) -> torch.Tensor:
    critic = Critic(critic_model, None, None, topo.dp_size, 1.0, topo.device)
    batch = fixed_batch(0)
    local = critic.values(batch.select(rank_rows(topo.rank, topo.world_size)), MICRO_BATCH)
    width = batch.loss_mask_BT.shape[1]  # a rank's rows may be shorter: pad to the global width
    return gather_rows(torch.nn.functional.pad(local, (0, width - local.shape[1])), topo.world_size)


def main() -> None:
    out_path, rm_dir = sys.argv[1], sys.argv[2]
    topo = init_distributed(1, 1, 120)
    hf_config = tiny_config()
    torch.manual_seed(0)
    actor = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation="sdpa")
    actor = parallelize(actor, topo.fsdp_mesh, topo.device, trainable=True)
    results: dict = {"world": topo.world_size, "rows": ROWS, "actor": full_state(actor)}
    built = {
        "zero_head": build_critic(hf_config, topo, actor),
        "random_head": build_critic(hf_config, topo, actor, seed=HEAD_SEED, head_init_std=HEAD_STD),
        "reward_model": build_critic(hf_config, topo, rm_dir),
    }
    for name, model in built.items():
        results[name] = {"state": full_state(model), "values": values_of(model, topo),
                         "resharded": all(isinstance(p, DTensor) for p in model.parameters())}
    for run, (mode, norm_constant, refresh_old) in RUNS.items():
        model = build_critic(hf_config, topo, actor, seed=HEAD_SEED, head_init_std=HEAD_STD)
        results[f"train/{run}"] = {"initial": full_state(model), **train(model, topo, mode, norm_constant, refresh_old)}
    if topo.is_main:
        torch.save(results, out_path)
    shutdown()


if __name__ == "__main__":
    main()
