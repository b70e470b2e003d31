"""Expert parallelism for a Hugging Face MoE layer in the rollout engine (tp > 1).

Each tp rank keeps the torch.chunk block ``[r * E/tp, (r + 1) * E/tp)`` of the fused experts
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``: the plan's dim 0, so the reshard's slices
land as they are) and runs only the token-expert pairs routed to its experts; the router is
replicated, so every rank routes alike, and one all-reduce over tp sums the experts' outputs.
Pairs routed elsewhere become Hugging Face's expert-parallel sentinel (an id >= the local expert
count, weight 0), which its ``grouped_mm`` / ``batched_mm`` experts skip. vLLM's expert-parallel
layout (``enable_expert_parallel``, linear placement) is the same block per rank.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import Tensor


def shard_experts(experts: torch.nn.Module, tp: int, tp_rank: int, group: dist.ProcessGroup) -> None:
    """Keep this rank's experts of an HF fused-experts module and make its forward expert-parallel."""
    total = experts.num_experts
    assert total % tp == 0, f"distributed.tp={tp} must divide num_experts={total} (expert parallelism)"
    per_rank = total // tp
    first = tp_rank * per_rank
    for name in ("gate_up_proj", "down_proj"):
        whole = getattr(experts, name)
        assert whole.shape[0] == total, (name, whole.shape)
        setattr(experts, name, torch.nn.Parameter(whole.data[first:first + per_rank].clone(), requires_grad=False))
    experts.num_experts = per_rank
    experts._is_expert_parallel = True
    local_forward = experts.forward

    def forward(self, hidden_states_NH: Tensor, top_k_index_NK: Tensor, top_k_weights_NK: Tensor) -> Tensor:
        local_NK = top_k_index_NK - first
        elsewhere_NK = (local_NK < 0) | (local_NK >= per_rank)
        out_NH = local_forward(hidden_states_NH, local_NK.masked_fill(elsewhere_NK, per_rank),
                               top_k_weights_NK.masked_fill(elsewhere_NK, 0.0))
        dist.all_reduce(out_NH, group=group)
        return out_NH

    experts.forward = types.MethodType(forward, experts)
