"""Run under torchrun: load reward models with ``load_reward_model`` and score the fixed batch.

argv: OUT_PATH, then NAME=DIR pairs. For every directory the fixed batch is padded with the
model's own ``pad_token_id`` (which may equal EOS), each rank scores its contiguous share of the
rows in micro-batches of 3 (fp32, and bf16 for the first directory), and rank 0 saves the scores
of all rows in global order plus whether every parameter was sharded again after scoring.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from spmd_rlhf.distributed.topology import init_distributed, shutdown
from spmd_rlhf.models.heads import load_reward_model
from spmd_rlhf.rewards.model import RewardModel
from tests.distributed.workers.scalar_heads import fixed_batch, rank_rows

MICRO_BATCH = 3


def score_all_rows(path: str, topo, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    model = load_reward_model(path, topo, dtype=dtype)
    batch = fixed_batch(model.config.pad_token_id)
    scores_B = RewardModel(model, topo.device, MICRO_BATCH).score(batch.select(rank_rows(topo.rank, topo.world_size)))
    assert scores_B.dtype == torch.float32 and scores_B.device.type == "cpu"
    resharded = all(isinstance(p, DTensor) for p in model.parameters())
    parts: list[torch.Tensor] = [None] * topo.world_size  # type: ignore[list-item]
    dist.all_gather_object(parts, scores_B)
    return torch.cat(parts), resharded


def main() -> None:
    out_path, pairs = sys.argv[1], [arg.split("=", 1) for arg in sys.argv[2:]]
    topo = init_distributed(1, 1, 120)
    results = {}
    for name, path in pairs:
        results[name], results[f"{name}/resharded"] = score_all_rows(path, topo, torch.float32)
    first_name, first_path = pairs[0]
    results[f"{first_name}/bf16"], _ = score_all_rows(first_path, topo, torch.bfloat16)
    if topo.is_main:
        torch.save({"world": topo.world_size, **results}, out_path)
    shutdown()


if __name__ == "__main__":
    main()
