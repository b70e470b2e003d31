"""Model FLOPs and MFU (trainer/flops.py), against counts made by hand."""

from __future__ import annotations

import pytest
from transformers import Qwen2Config, Qwen2MoeConfig, Qwen3MoeConfig

from spmd_rlhf.trainer.flops import FlopsModel, flops_model, mfu, peak_flops


def test_counts_of_a_small_qwen2_by_hand():
    # hidden 8, 2 heads of 4 (q: 8x8, o: 8x8), 1 kv head (k, v: 8x4 each), mlp 16, 3 layers, vocab 10
    config = Qwen2Config(hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=10)
    model = flops_model(config)
    per_layer = 64 + 64 + 32 + 32 + 3 * 8 * 16  # q, o, k, v, gate/up/down = 576
    assert model == FlopsModel(body_params=3 * per_layer, head_params=80, layers=3, attn_width=8)


def test_moe_counts_the_router_and_the_picked_experts_by_hand():
    # hidden 8, 2 heads of 4, 1 kv head (attention 192 as above); 4 layers, every 2nd sparse, layer 3 dense
    # by mlp_only_layers: sparse layer = router 8*6 + 2 experts * 3*8*5 = 48 + 240 = 288; dense = 3*8*16 = 384
    config = Qwen3MoeConfig(hidden_size=8, intermediate_size=16, moe_intermediate_size=5, num_experts=6,
                            num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3], num_hidden_layers=4,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=10)
    layers = [192 + 384, 192 + 288, 192 + 384, 192 + 384]  # layer 1 is the only sparse one
    assert flops_model(config) == FlopsModel(body_params=sum(layers), head_params=80, layers=4, attn_width=8)
    # Qwen2-MoE adds its shared expert (3*8*7) and the shared expert's gate (8) to every sparse layer
    config = Qwen2MoeConfig(hidden_size=8, intermediate_size=16, moe_intermediate_size=5, num_experts=6,
                            num_experts_per_tok=2, shared_expert_intermediate_size=7, decoder_sparse_step=1,
                            mlp_only_layers=[], num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            vocab_size=10)
    assert flops_model(config).body_params == 192 + 48 + 240 + 168 + 8


def test_forward_and_train_flops_by_hand():
    model = FlopsModel(body_params=100, head_params=10, layers=2, attn_width=4)
    # two sequences of 3 and 5 tokens, 2 and 4 of them scored:
    # 2*100*8 + 2*10*6 + 2*2*4*(9 + 25) = 1600 + 120 + 544
    assert model.forward([3, 5], [2, 4]) == 2264.0
    assert model.train([3, 5], [2, 4]) == 3 * 2264.0


def test_peak_table_override_and_mfu():
    assert peak_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA GH200 480GB") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert peak_flops("cpu") is None
    assert peak_flops("cpu", override_tflops=2.0) == 2e12
    assert mfu(4e12, 2.0, 4e12) == 0.5
    assert mfu(4e12, 2.0, None) is None
