"""Vision-language policies on one gloo rank: M-RoPE positions (by hand and against HF), the
actor's log-probs of rows with images against plain HF forwards, the frozen vision tower through
an update, and the configurations a VL policy refuses (LoRA on a VL policy: test_lora_vlm.py)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from spmd_rlhf.config import AlgorithmConfig, Config, ConfigError, micro_batch_tokens
from spmd_rlhf.data.vision import VisionInputs
from spmd_rlhf.models.logprobs import fused_policy_forward
from spmd_rlhf.models.parallelize import decoder_layers, parallelize
from spmd_rlhf.models.vlm import (check_vision_language, is_vision_language, model_class, mrope_positions,
                                  vision_forward_kwargs)
from spmd_rlhf.trainer.actor import Actor, PolicyTargets
from spmd_rlhf.trainer.micro import MicroBatcher, token_logits
from spmd_rlhf.trainer.schedule import build_scheduler
from tests.distributed.workers.tiny_vl import hf_batch_logprobs, tiny_vl, vl_batch

CPU = torch.device("cpu")


def test_mrope_positions_by_hand():
    """Text 0..2, a 1x4x6 image (2x3 merged) at 3 + (t, row, col), then text from 3 + max(2, 3)."""
    I = 9  # noqa: E741 - the image token
    ids = torch.tensor([5, 6, 7, I, I, I, I, I, I, 8, 4])
    positions = mrope_positions(ids, torch.tensor([[1, 4, 6]]), image_token_id=I, spatial_merge_size=2)
    assert positions.tolist() == [
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7],
        [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],
        [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7],
    ]


def test_mrope_positions_equal_hf_get_rope_index():
    model, tokenizer = tiny_vl()
    batch, prompts, responses = vl_batch(tokenizer)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        vision = batch.vision[i]
        if vision is None:
            continue
        ids_1L = torch.tensor([prompt + response])
        kwargs = {"image_grid_thw": vision.image_grid_thw_I3}
        if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
            kwargs["mm_token_type_ids"] = (ids_1L == model.config.image_token_id).int()
        expected_3_1L, _ = model.model.get_rope_index(ids_1L, **kwargs)
        ours = mrope_positions(ids_1L[0], vision.image_grid_thw_I3, model.config.image_token_id, 2)
        assert torch.equal(ours, expected_3_1L[:, 0]), i


def test_forward_inputs_concatenate_rows_and_zero_padding():
    model, tokenizer = tiny_vl()
    batch, prompts, responses = vl_batch(tokenizer)
    inputs = vision_forward_kwargs(model.config, batch.input_ids_BT, batch.attention_mask_BT, batch.vision)
    with_images = [v for v in batch.vision if v is not None]
    assert torch.equal(inputs["pixel_values"], torch.cat([v.pixel_values_PD for v in with_images]))
    assert torch.equal(inputs["image_grid_thw"], torch.cat([v.image_grid_thw_I3 for v in with_images]))
    positions_3BT = inputs["position_ids"]
    assert positions_3BT.shape == (3, *batch.input_ids_BT.shape)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        length = len(prompt) + len(response)
        assert not positions_3BT[:, i, length:].any(), "padding at 0"
    text_row = batch.vision.index(None)
    length = len(prompts[text_row]) + len(responses[text_row])
    assert torch.equal(positions_3BT[:, text_row, :length], torch.arange(length).expand(3, -1))
    assert vision_forward_kwargs(model.config, batch.input_ids_BT, batch.attention_mask_BT, [None] * batch.size) == {}


def test_select_and_to_keep_rows_and_images_aligned():
    _, tokenizer = tiny_vl()
    batch, _, _ = vl_batch(tokenizer)
    picked = batch.select(torch.tensor([4, 0, 3]))
    assert picked.vision == [batch.vision[4], batch.vision[0], None]
    assert picked.select(slice(1, 3)).vision == [batch.vision[0], None]
    assert batch.to(CPU).vision is batch.vision


def actor_of(mesh, model, freeze: bool = True, max_tokens: int = 0, checkpointing: bool = False) -> Actor:
    model = parallelize(model, mesh, CPU, checkpointing, trainable=True, freeze_vision_tower=freeze)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    return Actor(model, optimizer, build_scheduler(optimizer, 0, 10, 1.0), 1, 0.0, CPU,
                 batcher=MicroBatcher(max_tokens))


def test_model_class_and_layers_of_a_vision_language_policy():
    model, _ = tiny_vl()
    assert is_vision_language(model.config) and model_class(model.config).__name__ == "AutoModelForImageTextToText"
    assert decoder_layers(model) == list(model.model.language_model.layers)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_actor_logprobs_with_images_equal_plain_hf_forwards(world_of_one, family):
    model, tokenizer = tiny_vl(family=family)
    batch, prompts, responses = vl_batch(tokenizer)
    expected_BT = hf_batch_logprobs(model, batch, prompts, responses)
    actor = actor_of(world_of_one, model)
    for micro in (2, 6):  # a micro-batch of a text row and an image row; all rows at once
        logprobs_BT = actor.logprobs(batch, micro, temperature=1.0)
        torch.testing.assert_close(logprobs_BT, expected_BT, rtol=0, atol=1e-5)
    with torch.no_grad():  # the same rows with text positions: M-RoPE matters at this tolerance
        wrong_BT, _ = fused_policy_forward(actor.model, batch.input_ids_BT, batch.attention_mask_BT,
                                           batch.position_ids_BT, batch.loss_mask_BT.bool(), 1.0,
                                           **{k: v for k, v in vision_forward_kwargs(
                                               model.config, batch.input_ids_BT, batch.attention_mask_BT,
                                               batch.vision).items() if k != "position_ids"})
    assert (wrong_BT - expected_BT).abs().max() > 1e-3
    with torch.no_grad():  # the full-logits path (SFT, references) reads the images too
        logits_BTV = token_logits(actor.model, batch, 1.0)
    full_BT = torch.log_softmax(logits_BTV, -1).gather(2, batch.input_ids_BT[:, 1:, None])[..., 0]
    torch.testing.assert_close(full_BT * batch.loss_mask_BT, expected_BT, rtol=0, atol=1e-5)


@pytest.mark.parametrize("freeze", [True, False])
def test_update_moves_the_language_model_and_keeps_a_frozen_vision_tower(world_of_one, freeze):
    model, tokenizer = tiny_vl()
    batch, _, _ = vl_batch(tokenizer)
    actor = actor_of(world_of_one, model, freeze)
    before = {name: p.full_tensor().clone() for name, p in actor.model.named_parameters()}
    targets = PolicyTargets(torch.randn(batch.loss_mask_BT.shape, generator=torch.Generator().manual_seed(0)), None)
    metrics = actor.update(batch, targets, AlgorithmConfig(), micro_batch_size=3, temperature=1.0)
    assert metrics["actor/grad_norm"] > 0
    after = {name: p.full_tensor() for name, p in actor.model.named_parameters()}
    visual = [n for n in before if n.startswith("model.visual.")]
    language = [n for n in before if n.startswith("model.language_model.layers.")]
    assert visual and language
    assert all((after[n] - before[n]).abs().max() > 1e-5 for n in language if "norm" not in n)
    moved = [n for n in visual if not torch.equal(after[n], before[n])]
    assert moved == [] if freeze else len(moved) > len(visual) // 2, moved


def test_vision_language_configuration_errors():
    model, _ = tiny_vl()
    hf_config = model.config
    check_vision_language(Config(), hf_config)  # the defaults run
    cfg = Config()
    cfg.trainer.max_tokens_per_micro_batch = None
    assert micro_batch_tokens(cfg, "cuda", vision_language=True) == 0 and micro_batch_tokens(cfg, "cuda") > 0
    cfg.trainer.max_tokens_per_micro_batch = 4096
    check_vision_language(cfg, hf_config)  # packed micro-batches carry images
    cfg.distributed.tp = 2
    check_vision_language(cfg, hf_config)  # the language model is tensor parallel, the tower replicated
    cfg = Config()
    cfg.model.lora.rank = 8
    check_vision_language(cfg, hf_config)  # LoRA on the language model, merged weights to the engine
    cfg.model.lora.sync = "adapter"
    with pytest.raises(ConfigError, match=r"model\.lora\.sync=merged"):
        check_vision_language(cfg, hf_config)
    cfg.model.lora.sync, cfg.model.vision.freeze_vision_tower = "merged", False  # adapters never reach the tower
    with pytest.raises(ConfigError, match=r"model\.vision\.freeze_vision_tower=true"):
        check_vision_language(cfg, hf_config)
    for key, value in [("distributed.sp", 2), ("algorithm.adv_estimator", "gae")]:
        cfg = Config()
        section, name = key.rsplit(".", 1)
        owner = cfg
        for part in section.split("."):
            owner = getattr(owner, part)
        setattr(owner, name, value)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            check_vision_language(cfg, hf_config)


def test_vision_inputs_of_a_text_only_batch_are_none():
    _, tokenizer = tiny_vl()
    batch, _, _ = vl_batch(tokenizer, sizes=[None, None])
    assert batch.vision is None
    assert isinstance(vl_batch(tokenizer, sizes=[(56, 56)])[0].vision[0], VisionInputs)


def test_text_only_rows_of_a_vision_language_policy_equal_plain_hf_forwards(world_of_one):
    """No image in the batch: the tower runs on a blank (FSDP keeps step) and changes nothing."""
    model, tokenizer = tiny_vl()
    batch, prompts, responses = vl_batch(tokenizer, sizes=[None, None, None])
    batch.vision = [None] * batch.size
    expected_BT = hf_batch_logprobs(model, batch, prompts, responses)
    logprobs_BT = actor_of(world_of_one, model).logprobs(batch, 2, temperature=1.0)
    torch.testing.assert_close(logprobs_BT, expected_BT, rtol=0, atol=1e-5)


def test_packed_micro_batches_with_images_equal_plain_hf_forwards_and_the_padded_update(world_of_one):
    """Rows packed up to 48 tokens (positions [4, 1, N]: text, then M-RoPE) give HF's log-probs, and
    the same update as padded micro-batches."""
    model, tokenizer = tiny_vl()
    batch, prompts, responses = vl_batch(tokenizer)
    expected_BT = hf_batch_logprobs(model, batch, prompts, responses)
    packed, padded = actor_of(world_of_one, copy.deepcopy(model), max_tokens=48), actor_of(world_of_one, model)
    assert len(packed.batcher.plan(batch, 6, CPU, model.config)) >= 2
    torch.testing.assert_close(packed.logprobs(batch, 6, temperature=1.0), expected_BT, rtol=0, atol=1e-5)
    targets = PolicyTargets(torch.randn(batch.loss_mask_BT.shape, generator=torch.Generator().manual_seed(0)), None)
    for actor in (packed, padded):
        actor.update(batch, targets, AlgorithmConfig(), micro_batch_size=6, temperature=1.0)
    weights = {name: p.full_tensor() for name, p in padded.model.named_parameters()}
    for name, param in packed.model.named_parameters():
        torch.testing.assert_close(param.full_tensor(), weights[name], rtol=1e-5, atol=1e-6, msg=name)


def test_activation_checkpointing_gives_the_same_update(world_of_one):
    model, tokenizer = tiny_vl()
    batch, _, _ = vl_batch(tokenizer)
    targets = PolicyTargets(torch.randn(batch.loss_mask_BT.shape, generator=torch.Generator().manual_seed(0)), None)
    actors = [actor_of(world_of_one, copy.deepcopy(model), checkpointing=True), actor_of(world_of_one, model)]
    for actor in actors:
        actor.update(batch, targets, AlgorithmConfig(), micro_batch_size=3, temperature=1.0)
    weights = {name: p.full_tensor() for name, p in actors[1].model.named_parameters()}
    for name, param in actors[0].model.named_parameters():
        torch.testing.assert_close(param.full_tensor(), weights[name], rtol=1e-6, atol=1e-7, msg=name)


def test_frozen_and_trainable_parameters_never_share_an_fsdp_group(world_of_one):
    from torch.distributed.fsdp import FSDPModule, fully_shard

    model, _ = tiny_vl()
    actor = actor_of(world_of_one, model)
    kinds = []
    for module in actor.model.modules():
        group = fully_shard.state(module)._fsdp_param_group if isinstance(module, FSDPModule) else None
        if group is not None:
            flags = {p.sharded_param.requires_grad for p in group.fsdp_params}
            assert len(flags) == 1, type(module).__name__
            kinds.append(flags.pop())
    assert kinds.count(False) == 3 and kinds.count(True) == 3  # 2 vision blocks + the tower; 2 layers + the root


def test_a_vision_language_directory_loads_as_the_policy(tmp_path):
    """model.path of tools/make_tiny_model.py qwen2_5_vl: the VL class with its weights; sizes and
    EOS read from the text config."""
    from spmd_rlhf.models.load import build_causal_lm, eos_token_ids, load_tokenizer, max_positions, model_config
    from tests.distributed.workers.tiny_vl import make_tiny

    cfg = Config()
    cfg.model.path = make_tiny.make_tiny_model("qwen2_5_vl", str(tmp_path / "vl"), seed=1)
    tokenizer = load_tokenizer(cfg)
    hf_config = model_config(cfg, tokenizer)
    model = build_causal_lm(cfg, hf_config, seed=0)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert max_positions(hf_config) == 256 and eos_token_ids(tokenizer, hf_config) == [tokenizer.eos_token_id]
    torch.manual_seed(1)
    fresh = model_class(hf_config).from_config(hf_config, dtype=torch.float32)
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), name
