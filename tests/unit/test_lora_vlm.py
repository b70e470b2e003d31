"""LoRA on a vision-language policy (the tiny Qwen2.5-VL, one gloo rank): adapters on the language
model only, the merged weights under the base model's names, the reference (adapters disabled)
and forwards with images through PEFT's wrapper and FSDP2."""

from __future__ import annotations

import copy

import torch

from spmd_rlhf.config.schema import LoraConfig
from spmd_rlhf.models.lora import MergedWeights, add_lora
from spmd_rlhf.models.vlm import multimodal_body, vision_tower
from tests.distributed.workers.tiny_vl import hf_batch_logprobs, tiny_vl, vl_batch
from tests.unit.test_vlm import actor_of

RANK, ALPHA = 4, 8.0
VISION_NAMES = ("gate_proj", "up_proj", "down_proj", "qkv", "proj")  # the tower's own linear layers


def lora_vl() -> tuple[torch.nn.Module, torch.nn.Module, object]:
    """(base, LoRA copy with every B ~ N(0, 0.5), tokenizer)."""
    base, tokenizer = tiny_vl()
    peft = add_lora(copy.deepcopy(base), LoraConfig(rank=RANK, alpha=ALPHA,
                                                    target_modules=["q_proj", "v_proj", *VISION_NAMES]))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return base, peft, tokenizer


def test_adapters_sit_on_the_language_model_only():
    base, peft, _ = lora_vl()
    tower_names = {n for n, _ in base.model.visual.named_modules() if n.endswith(VISION_NAMES)}
    assert {"blocks.0.mlp.gate_proj", "blocks.0.attn.qkv", "blocks.0.attn.proj"} <= tower_names  # same names
    adapted = {n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
               for n, _ in peft.named_parameters() if ".lora_" in n}
    layers = len(base.model.language_model.layers)
    want = {f"model.language_model.layers.{i}.{part}" for i in range(layers)
            for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert adapted == want
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    body = peft.get_base_model().model
    assert multimodal_body(peft) is body and vision_tower(peft) is body.visual  # through the wrapper


def test_merged_weights_are_w_plus_scaled_ba_under_the_base_names(world_of_one):
    base, peft, _ = lora_vl()
    module = peft.get_base_model().model.language_model.layers[1].mlp.down_proj
    a, b = module.lora_A["default"].weight.detach().clone(), module.lora_B["default"].weight.detach().clone()
    actor = actor_of(world_of_one, peft)
    merged = MergedWeights(actor.model)
    base_params = dict(base.named_parameters())
    assert [n for n, _ in merged.named_parameters()] == list(base_params)
    got = dict(merged.full_tensors())
    name = "model.language_model.layers.1.mlp.down_proj.weight"
    want = base_params[name] + (ALPHA / RANK) * b @ a  # by hand
    torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)
    assert (got[name] - base_params[name]).abs().max() > 1e-2
    adapted = {n.removeprefix("base_model.model.").split(".lora_")[0] + ".weight"
               for n, _ in peft.named_parameters() if ".lora_A." in n}
    for key, param in merged.named_parameters():  # one rank: the local block is the whole tensor
        torch.testing.assert_close(merged.local_block(key, param), got[key], rtol=0, atol=0, msg=key)
        if key not in adapted:  # the vision tower, norms, embeddings: the base's own
            assert torch.equal(got[key], base_params[key]), key


def test_reference_is_the_base_and_the_policy_the_merged_model_on_image_prompts(world_of_one):
    """Through PEFT's wrapper under FSDP2: with adapters disabled the actor's log-probs of rows with
    images are the base model's (plain HF forwards); enabled, those of the merged model."""
    base, peft, tokenizer = lora_vl()
    batch, prompts, responses = vl_batch(tokenizer)
    actor = actor_of(world_of_one, peft)
    merged_model = copy.deepcopy(base)
    _, unexpected = merged_model.load_state_dict(dict(MergedWeights(actor.model).full_tensors()), strict=False)
    assert not unexpected
    base_BT = hf_batch_logprobs(base, batch, prompts, responses)
    merged_BT = hf_batch_logprobs(merged_model, batch, prompts, responses)
    assert (merged_BT - base_BT).abs().max() > 1e-2
    torch.testing.assert_close(actor.reference_logprobs(batch, 3, temperature=1.0), base_BT, rtol=0, atol=1e-5)
    torch.testing.assert_close(actor.logprobs(batch, 3, temperature=1.0), merged_BT, rtol=0, atol=1e-5)


def test_an_update_moves_only_the_adapters(world_of_one):
    from spmd_rlhf.config import AlgorithmConfig
    from spmd_rlhf.trainer.actor import PolicyTargets

    _, peft, tokenizer = lora_vl()
    batch, _, _ = vl_batch(tokenizer)
    actor = actor_of(world_of_one, peft)
    before = {name: p.full_tensor().clone() for name, p in actor.model.named_parameters()}
    targets = PolicyTargets(torch.randn(batch.loss_mask_BT.shape, generator=torch.Generator().manual_seed(0)), None)
    assert actor.update(batch, targets, AlgorithmConfig(), micro_batch_size=3, temperature=1.0)["actor/grad_norm"] > 0
    moved = {name for name, p in actor.model.named_parameters() if not torch.equal(p.full_tensor(), before[name])}
    adapters = {name for name in before if ".lora_" in name}
    assert moved and moved <= adapters and len(moved) > len(adapters) // 2
