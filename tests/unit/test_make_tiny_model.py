"""``tools/make_tiny_model.py``: each family's directory loads offline with plain transformers, holds
the weights it was made with, and generates the embedded task's tokens."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.launch import REPO_ROOT

_spec = importlib.util.spec_from_file_location("make_tiny_model", REPO_ROOT / "tools" / "make_tiny_model.py")
make_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tiny)


@pytest.mark.parametrize("family, model_type", [("qwen2", "qwen2"), ("qwen3_moe", "qwen3_moe")])
def test_directory_loads_offline_and_generates(tmp_path, monkeypatch, family, model_type):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    out = make_tiny.make_tiny_model(family, str(tmp_path / family), seed=3)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.model_type == model_type
    assert model.config.vocab_size == len(tokenizer) == 15
    assert sum(p.numel() for p in model.parameters()) < 500_000

    torch.manual_seed(3)  # the same seed builds the same model: the directory holds exactly its weights
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    make_tiny.spread_router(fresh)
    loaded = dict(model.named_parameters())
    for name, param in fresh.named_parameters():
        assert torch.equal(loaded[name], param), name

    ids = tokenizer("07+48=", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "07+48="
    out_ids = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=None)
    assert out_ids.shape == (1, ids.shape[1] + 4)
    with torch.no_grad():  # greedy decoding is the argmax of a plain forward
        logits = model(input_ids=out_ids[:, :-1]).logits[0, ids.shape[1] - 1 :]
    assert torch.equal(logits.argmax(-1), out_ids[0, ids.shape[1] :])


def test_moe_routes_tokens_to_different_experts(tmp_path):
    """Spread routers: the embedded task's tokens do not all pick the same top-2 experts."""
    out = make_tiny.make_tiny_model("qwen3_moe", str(tmp_path / "moe"))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        router_logits = model(input_ids=torch.arange(3, 15)[None], output_router_logits=True).router_logits
    assert len(router_logits) == 2
    for logits_TE in router_logits:
        chosen = {tuple(sorted(row)) for row in logits_TE.topk(2, dim=-1).indices.tolist()}
        assert len(chosen) >= 3, chosen


def test_unknown_family_names_the_choices(tmp_path):
    with pytest.raises(SystemExit, match="qwen2, qwen3_moe, qwen2_5_vl"):
        make_tiny.make_tiny_model("gpt2", str(tmp_path / "x"))


def test_vision_language_directory_loads_offline_and_reads_an_image(tmp_path, monkeypatch):
    """qwen2_5_vl: config, model, tokenizer (chat template with image parts) and the PIL image
    processor load offline; the model reads an image through its placeholders."""
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText, Qwen2VLImageProcessorPil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    out = make_tiny.make_tiny_model("qwen2_5_vl", str(tmp_path / "vl"), seed=3)
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "qwen2_5_vl" and config.vision_config.spatial_merge_size == 2
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert config.text_config.vocab_size == len(tokenizer) == 19
    assert sum(p.numel() for p in model.parameters()) < 500_000

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "1+2="}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|vision_start|><|image_pad|><|vision_end|>1+2="
    processor = Qwen2VLImageProcessorPil.from_pretrained(out)
    pixels = processor(images=[Image.new("RGB", (84, 56), (200, 30, 30))], return_tensors="pt")
    assert pixels["image_grid_thw"].tolist() == [[1, 4, 6]]  # 56x84 pixels: 4x6 patches of 14
    assert pixels["pixel_values"].shape == (24, 3 * 2 * 14 * 14)
    ids = tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * 6), return_tensors="pt").input_ids
    assert ids.shape == (1, 1 + 6 + 1 + 4) and (ids == config.image_token_id).sum() == 6
    with torch.no_grad():
        logits = model(input_ids=ids, **pixels).logits
        other = model(input_ids=ids, pixel_values=pixels["pixel_values"] * 0.5,
                      image_grid_thw=pixels["image_grid_thw"]).logits
    assert logits.shape == (1, ids.shape[1], 19) and torch.isfinite(logits).all()
    assert (logits[0, -1] - other[0, -1]).abs().max() > 1e-4  # the image reaches the text's logits


def test_qwen2_5_vl_3b_shape_has_the_published_dimensions():
    """``--shape 3b``: Qwen2.5-VL-3B-Instruct's text and vision dimensions (its config.json), the
    task's vocabulary and token ids kept; checked on the config alone (no 7 GB of weights)."""
    tokenizer = make_tiny.tiny_tokenizer("qwen2_5_vl")
    config = make_tiny.tiny_config("qwen2_5_vl", tokenizer, "3b")
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (2048, 11008, 36)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (16, 2, 19)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (32, 1280, 3420, 16)
    assert vision.out_hidden_size == 2048 and vision.fullatt_block_indexes == [7, 15, 23, 31]
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with pytest.raises(SystemExit, match="qwen2_5_vl only"):
        make_tiny.make_tiny_model("qwen2", "/nonexistent", shape="3b")
