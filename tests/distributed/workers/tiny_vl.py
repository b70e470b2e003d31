"""The tiny Qwen2.5-VL of ``tools/make_tiny_model.py`` and batches of prompts with images, built
with the image processor and the tokenizer directly, plus a plain-HF logprob reference."""

from __future__ import annotations

import importlib.util
import inspect

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, Qwen2VLConfig

from spmd_rlhf.data.batch import TokenBatch, collate
from spmd_rlhf.data.vision import VisionInputs
from tests.launch import REPO_ROOT

_spec = importlib.util.spec_from_file_location("make_tiny_model", REPO_ROOT / "tools" / "make_tiny_model.py")
make_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tiny)

SIZES = [(56, 56), (84, 56), (112, 112), None, (56, 112), (112, 84)]  # (width, height); None: a text-only row
MERGE = 2


def qwen2_vl_config(tokenizer) -> Qwen2VLConfig:
    """Qwen2-VL (the generation before 2.5: LayerNorm vision blocks, no window attention) at the
    tiny Qwen2.5-VL's sizes and tokens."""
    ref = make_tiny.tiny_config("qwen2_5_vl", tokenizer)
    vision = dict(depth=2, embed_dim=64, hidden_size=64, mlp_ratio=2, num_heads=2, in_channels=3, patch_size=14,
                  spatial_merge_size=MERGE, temporal_patch_size=2)
    tokens = {k: getattr(ref, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                           "vision_end_token_id")}
    return Qwen2VLConfig(text_config=ref.text_config.to_dict(), vision_config=vision, tie_word_embeddings=True, **tokens)


def tiny_vl(seed: int = 0, family: str = "qwen2_5_vl") -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) of ``family`` (qwen2_5_vl or qwen2_vl); weights N(0, 0.1) so that images
    and positions move the logits clearly."""
    tokenizer = make_tiny.tiny_tokenizer("qwen2_5_vl")
    config = qwen2_vl_config(tokenizer) if family == "qwen2_vl" else make_tiny.tiny_config(family, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.1)
    return model.eval(), tokenizer


def noise_image(width: int, height: int, gen: np.random.Generator) -> Image.Image:
    return Image.fromarray(gen.integers(0, 256, (height, width, 3), dtype=np.uint8))


def vision_prompt(tokenizer, size: tuple[int, int] | None, text: str,
                  gen: np.random.Generator) -> tuple[list[int], VisionInputs | None]:
    """Token ids with the image's placeholder expanded to its patch count, and its vision inputs."""
    if size is None:
        return tokenizer(text).input_ids, None
    image = noise_image(*size, gen)
    out = make_tiny.tiny_image_processor()(images=[image], return_tensors="pt")
    vision = VisionInputs(out["pixel_values"].float(), out["image_grid_thw"].long(), [image])
    pads = "<|image_pad|>" * vision.placeholder_tokens(MERGE)[0]
    return tokenizer(f"<|vision_start|>{pads}<|vision_end|>{text}").input_ids, vision


def vl_batch(tokenizer, seed: int = 0, sizes=SIZES) -> tuple[TokenBatch, list[list[int]], list[list[int]]]:
    """(batch, prompts, responses): one prompt per size, random digit responses of 1..6 tokens."""
    gen = np.random.default_rng(seed)
    prompts, responses, visions = [], [], []
    for i, size in enumerate(sizes):
        ids, vision = vision_prompt(tokenizer, size, f"{i}+{i + 3}=", gen)
        prompts.append(ids)
        visions.append(vision)
        responses.append(gen.integers(3, 13, int(gen.integers(1, 7))).tolist())
    return collate(prompts, responses, tokenizer.pad_token_id, visions=visions), prompts, responses


@torch.no_grad()
def hf_row_logprobs(model, prompt: list[int], response: list[int], vision: VisionInputs | None) -> torch.Tensor:
    """log softmax of the response tokens by one plain, unpadded HF forward (the model's own
    M-RoPE positions: HF computes them from the image grids)."""
    ids_1T = torch.tensor([prompt + response])
    inputs = {}
    if vision is not None:
        inputs = {"pixel_values": vision.pixel_values_PD, "image_grid_thw": vision.image_grid_thw_I3}
        if "mm_token_type_ids" in inspect.signature(model.model.forward).parameters:  # transformers >= 5.19
            inputs["mm_token_type_ids"] = (ids_1T == model.config.image_token_id).int()
    logits_TV = model(input_ids=ids_1T, **inputs).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits_TV, dim=-1).gather(1, torch.tensor(response)[:, None])[:, 0]


def hf_batch_logprobs(model, batch: TokenBatch, prompts, responses) -> torch.Tensor:
    """``[B, T-1]`` reference log-probs at the batch's loss columns, 0 elsewhere."""
    out = torch.zeros_like(batch.loss_mask_BT)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        out[i, len(prompt) - 1 : len(prompt) - 1 + len(response)] = hf_row_logprobs(model, prompt, response,
                                                                                   batch.vision[i])
    return out
