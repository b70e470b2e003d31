"""``models/moe.py``: the router balance loss equals Hugging Face's, and its hooks add exactly
``coef * mean over layers`` of it to the gradient of a training forward, nothing elsewhere."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from spmd_rlhf.config import Config, ConfigError, validate
from spmd_rlhf.models.moe import balance_loss, default_router_aux_loss_coef, install_router_aux_loss, moe_blocks
from spmd_rlhf.models.parallelize import parallelize

COEF = 0.5  # large, so the balance term's share of the router gradient is far above float noise


def tiny_moe(seed: int = 0, family: str = "qwen3_moe") -> torch.nn.Module:
    common = dict(vocab_size=15, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=32)
    if family == "qwen3_moe":
        config = Qwen3MoeConfig(head_dim=16, **common)
    else:  # Qwen2-MoE: a shared expert beside the routed ones
        config = Qwen2MoeConfig(shared_expert_intermediate_size=48, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for block in moe_blocks(model):
            block.gate.weight.normal_(0.0, 0.5)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids_BT = torch.randint(3, 15, (3, 7), generator=torch.Generator().manual_seed(1))
    mask_BT = torch.ones_like(ids_BT)
    mask_BT[1, 5:] = 0  # padding: not counted by the balance loss
    mask_BT[2, 3:] = 0
    return ids_BT, mask_BT


@pytest.mark.parametrize("masked", [False, True])
def test_balance_loss_is_hf_load_balancing_loss_of_one_layer(masked):
    logits_NE = torch.randn(21, 4, generator=torch.Generator().manual_seed(0))
    mask_BT = batch()[1] if masked else None
    keep_N = mask_BT.reshape(-1).bool() if masked else None
    expected = load_balancing_loss_func((logits_NE,), 4, 2, mask_BT)
    torch.testing.assert_close(balance_loss(logits_NE, 2, keep_N), expected, rtol=1e-6, atol=0)
    uniform = balance_loss(torch.zeros(8, 4), 2)  # ties: top-2 picks experts 0, 1; mean probs 1/4
    torch.testing.assert_close(uniform, torch.tensor(2.0))


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_hooked_gradient_is_loss_plus_coef_times_layer_mean(family):
    ids_BT, mask_BT = batch()
    hooked, plain = tiny_moe(family=family), tiny_moe(family=family)
    aux = install_router_aux_loss(hooked, hooked.get_decoder(), COEF)
    hooked.train(), plain.train()

    out = hooked(input_ids=ids_BT, attention_mask=mask_BT)
    (out.logits * mask_BT[..., None]).sum().backward()
    assert len(aux.last) == 2

    out = plain(input_ids=ids_BT, attention_mask=mask_BT, output_router_logits=True)
    keep_N = mask_BT.reshape(-1).bool()
    layer_losses = [balance_loss(logits_NE, 2, keep_N) for logits_NE in out.router_logits]
    torch.testing.assert_close(torch.stack(aux.last), torch.stack(layer_losses).detach())
    ((out.logits * mask_BT[..., None]).sum() + COEF * torch.stack(layer_losses).mean()).backward()

    got, want = grads(hooked), grads(plain)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)

    plain.zero_grad()
    out = plain(input_ids=ids_BT, attention_mask=mask_BT)
    (out.logits * mask_BT[..., None]).sum().backward()
    router = "model.layers.0.mlp.gate.weight"
    moved = (plain.get_parameter(router).grad - got[router]).abs().max()
    assert moved > 1e-3, f"the balance loss did not reach the router's gradient ({moved})"


def test_no_effect_without_gradients_in_eval_or_at_zero():
    ids_BT, mask_BT = batch()
    reference = tiny_moe()
    with torch.no_grad():
        expected = reference(input_ids=ids_BT, attention_mask=mask_BT).logits
    for coef, training, grad in ((COEF, True, False), (COEF, False, True), (0.0, True, True)):
        model = tiny_moe()
        aux = install_router_aux_loss(model, model.get_decoder(), coef)
        model.train(training)
        with torch.set_grad_enabled(grad):
            logits = model(input_ids=ids_BT, attention_mask=mask_BT).logits
        torch.testing.assert_close(logits.detach(), expected, rtol=0, atol=0)
        assert aux.last == []


def test_dense_model_gets_no_hooks_and_config_default():
    model = tiny_moe()
    assert default_router_aux_loss_coef(model.config) == 0.001  # Qwen3-MoE's config default
    dense = copy.deepcopy(model.get_decoder().embed_tokens)
    assert install_router_aux_loss(dense, dense, COEF) is None


def test_fsdp_shards_whole_experts_and_installs_the_loss(world_of_one):
    model = parallelize(tiny_moe(), world_of_one, torch.device("cpu"), trainable=True, router_aux_loss_coef=COEF)
    experts = model.get_parameter("model.layers.0.mlp.experts.gate_up_proj")
    assert isinstance(experts, DTensor) and experts.placements == (Shard(0),) and experts.shape == (4, 64, 32)
    ids_BT, mask_BT = batch()
    model(input_ids=ids_BT, attention_mask=mask_BT).logits.sum().backward()
    hooked = model.get_parameter("model.layers.1.mlp.gate.weight").grad.full_tensor()

    plain = parallelize(tiny_moe(), world_of_one, torch.device("cpu"), trainable=True, router_aux_loss_coef=0.0)
    plain(input_ids=ids_BT, attention_mask=mask_BT).logits.sum().backward()
    assert (plain.get_parameter("model.layers.1.mlp.gate.weight").grad.full_tensor() - hooked).abs().max() > 1e-3


@pytest.mark.parametrize("coef", [-0.1, float("inf"), float("nan")])
def test_config_rejects_a_bad_coefficient(coef):
    cfg = Config()
    cfg.model.moe.router_aux_loss_coef = coef
    with pytest.raises(ConfigError, match=r"model\.moe\.router_aux_loss_coef=.* must be a number >= 0"):
        validate(cfg, world_size=1)
    for fine in (None, 0.0, 0.01):
        cfg.model.moe.router_aux_loss_coef = fine
        validate(cfg, world_size=1)
