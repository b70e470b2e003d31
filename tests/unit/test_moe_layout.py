"""The MoE parts of the tensor-parallel plan (expert-parallel dim 0, routers whole) and where an
expert slice lands in vLLM's fused-MoE parameters (``rollout/vllm_layout.py``, no vLLM needed)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen3MoeConfig

from spmd_rlhf.distributed.reshard import tp_chunk
from spmd_rlhf.distributed.tp_plan import param_shard_dims
from spmd_rlhf.rollout.vllm_layout import FusedLayout, copy_tp_slice, expected_writes

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)


def qwen2_moe():
    return AutoModelForCausalLM.from_config(Qwen2MoeConfig(shared_expert_intermediate_size=24, **COMMON))


def test_plan_splits_experts_and_keeps_routers_whole():
    qwen3 = AutoModelForCausalLM.from_config(Qwen3MoeConfig(head_dim=16, mlp_only_layers=[1], **COMMON))
    dims = param_shard_dims(qwen3)
    assert dims["model.layers.0.mlp.experts.gate_up_proj"] == 0
    assert dims["model.layers.0.mlp.experts.down_proj"] == 0
    assert dims["model.layers.0.mlp.gate.weight"] is None
    assert dims["model.layers.1.mlp.gate_proj.weight"] == 0  # a dense layer among sparse ones
    assert dims["model.layers.1.mlp.down_proj.weight"] == 1
    dims = param_shard_dims(qwen2_moe())
    assert dims["model.layers.0.mlp.shared_expert.gate_proj.weight"] == 0
    assert dims["model.layers.0.mlp.shared_expert.down_proj.weight"] == 1
    assert dims["model.layers.0.mlp.shared_expert_gate.weight"] is None


def layout(tp_rank: int = 1) -> FusedLayout:
    return FusedLayout.from_config(qwen2_moe().config, tp_size=2, tp_rank=tp_rank)


@pytest.mark.parametrize("prefix", ["model.layers.0.mlp.experts.routed_experts.", "model.layers.0.mlp.experts."])
def test_expert_slices_land_whole_in_w13_and_w2(prefix):
    """vLLM 0.32 keeps them under ``routed_experts.``, older builds on the experts module."""
    full_up, full_down = torch.randn(4, 32, 32), torch.randn(4, 32, 16)
    params = {prefix + "w13_weight": torch.zeros(2, 32, 32), prefix + "w2_weight": torch.zeros(2, 32, 16)}
    for hf_name, piece in (("gate_up_proj", tp_chunk(full_up, 0, 2, 1)), ("down_proj", tp_chunk(full_down, 0, 2, 1))):
        target = copy_tp_slice(params, f"model.layers.0.mlp.experts.{hf_name}", piece, layout())
        assert target == prefix + {"gate_up_proj": "w13_weight", "down_proj": "w2_weight"}[hf_name]
    assert torch.equal(params[prefix + "w13_weight"], full_up[2:]) and torch.equal(params[prefix + "w2_weight"], full_down[2:])
    assert set(expected_writes(params).values()) == {1}


def test_tensor_parallel_vllm_experts_are_refused_with_the_fix():
    params = {"model.layers.0.mlp.experts.w13_weight": torch.zeros(4, 16, 32)}  # vLLM's tp split, not whole experts
    with pytest.raises(ValueError, match="enable_expert_parallel.*rollout.weight_sync=full"):
        copy_tp_slice(params, "model.layers.0.mlp.experts.gate_up_proj", torch.randn(2, 32, 32), layout())


def test_shared_expert_fuses_with_its_own_rows():
    params = {"model.layers.0.mlp.shared_expert.gate_up_proj.weight": torch.zeros(24, 32)}
    gate, up = torch.randn(12, 32), torch.randn(12, 32)  # shared_expert_intermediate_size 24 / tp 2
    copy_tp_slice(params, "model.layers.0.mlp.shared_expert.gate_proj.weight", gate, layout())
    copy_tp_slice(params, "model.layers.0.mlp.shared_expert.up_proj.weight", up, layout())
    assert torch.equal(params["model.layers.0.mlp.shared_expert.gate_up_proj.weight"], torch.cat([gate, up]))


def test_vllm_runs_moe_expert_parallel_at_tp_above_one():
    from transformers import Qwen2Config

    from spmd_rlhf.rollout.vllm_moe import expert_parallel, num_experts

    moe = qwen2_moe().config
    assert num_experts(moe) == 4 and expert_parallel(moe, 2) and not expert_parallel(moe, 1)
    dense = Qwen2Config(vocab_size=64, hidden_size=32, num_attention_heads=2)
    assert num_experts(dense) == 0 and not expert_parallel(dense, 2)
