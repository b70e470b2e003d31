"""Write a random-init Hugging Face model directory small enough for CPU tests, made offline.

    .venv/bin/python tools/make_tiny_model.py qwen3_moe outputs/tiny_qwen3_moe
    .venv/bin/python -m spmd_rlhf.train recipe=tiny_qwen3_moe    # reads outputs/tiny_qwen3_moe

Families: ``qwen2`` (dense, q/k/v biases, tied embeddings), ``qwen3_moe`` (Qwen3-MoE: 4 experts,
top-2 routing, per-head q/k norms, untied head) and ``qwen2_5_vl`` (Qwen2.5-VL: a 2-block vision
tower, patch 14, 2x2 merge, M-RoPE sections [4, 6, 6], 256 positions). The directory holds
``config.json``, ``model.safetensors`` (fp32, in the checkpoint layout Hugging Face and vLLM load)
and the embedded task's character tokenizer (digits, ``+``, ``=``, pad, eos; ``tasks/arithmetic.py``),
so the embedded addition task runs on it with nothing downloaded. For ``qwen2_5_vl`` the tokenizer
also has the four vision tokens and a chat template that renders an ``{"type": "image"}`` content
part as ``<|vision_start|><|image_pad|><|vision_end|>``, and ``preprocessor_config.json`` is a
Qwen2-VL image processor (56x56 to 112x112 pixels: 4 to 16 patches, 1 to 4 image tokens). It holds
no ``processor_config.json``: HF's Qwen2.5-VL processor needs torchvision; the tokenizer and the
image processor load on their own. Head size 32 (what vLLM's CPU attention supports). The same
``--seed`` writes the same weights.

``--shape 3b`` (``qwen2_5_vl`` only) writes Qwen2.5-VL-3B's published text and vision dimensions
instead (36 layers of hidden 2048, a 32-block tower of hidden 1280; bf16 weights, images up to
448x448 pixels), still with the task's tokenizer, so its vocabulary is tiny: for GPU figures of a
real-size VLM on the built-in shapes task (``data.task=shapes``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spmd_rlhf.tasks import arithmetic  # noqa: E402

FAMILIES = ("qwen2", "qwen3_moe", "qwen2_5_vl")
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
VISION_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
)


def tiny_config(family: str, tokenizer, shape: str = "test"):
    """The family's config at test size: 2 layers, hidden 64, 2 heads of 32, 64 positions (or a VL ``shape``)."""
    from transformers import Qwen2Config, Qwen3MoeConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )
    if family == "qwen2":
        return Qwen2Config(intermediate_size=192, tie_word_embeddings=True, use_sliding_window=False, **common)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            head_dim=32,
            intermediate_size=128,  # dense MLP layers only (none here: every layer is sparse)
            moe_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=0.001,
            tie_word_embeddings=False,
            **common,
        )
    if family == "qwen2_5_vl":
        return vision_language_config(tokenizer, common, shape)
    raise SystemExit(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


# Qwen2.5-VL-3B-Instruct's config.json: the text model and the vision tower
VL_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, hidden_act="silu")


def vision_language_config(tokenizer, common: dict, shape: str = "test"):
    """Qwen2.5-VL: the text model of ``common`` (256 positions: images take some) and a tiny tower,
    or (``shape="3b"``) Qwen2.5-VL-3B's dimensions with ``common``'s vocabulary and token ids."""
    from transformers import Qwen2_5_VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    text = dict(common, max_position_embeddings=256, intermediate_size=192, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0})
    text.pop("dtype")
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], in_channels=3)
    if shape == "3b":
        text, vision = dict(text, **VL_3B_TEXT), dict(VL_3B_VISION)
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
        dtype="bfloat16" if shape == "3b" else "float32")


def tiny_tokenizer(family: str):
    """The embedded task's tokenizer; with the vision tokens and an image chat template for ``qwen2_5_vl``."""
    tokenizer = arithmetic.build_tokenizer()
    if family == "qwen2_5_vl":
        tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
        tokenizer.chat_template = VISION_CHAT_TEMPLATE
    return tokenizer


def tiny_image_processor(max_side: int = 112):
    """Qwen2-VL's image processor (PIL backend, no torchvision) at 56x56..max_side x max_side pixels."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_side * max_side, patch_size=14, merge_size=2,
                                    temporal_patch_size=2)


@torch.no_grad()
def spread_router(model: torch.nn.Module, std: float = 0.5) -> None:
    """Router weights N(0, std): HF's init leaves them near zero, so every token would tie between
    experts; spread routers make the top-k choice depend on the token, as in a trained model."""
    for name, param in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            param.normal_(0.0, std)


def make_tiny_model(family: str, out: str, seed: int = 0, shape: str = "test") -> str:
    """Write ``family``'s tiny random model (or ``qwen2_5_vl`` at ``shape="3b"``), its config and
    tokenizer to ``out``; returns ``out``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    tokenizer = tiny_tokenizer(family)
    if shape != "test" and family != "qwen2_5_vl":
        raise SystemExit(f"--shape {shape} is for qwen2_5_vl only")
    config = tiny_config(family, tokenizer, shape)
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if family == "qwen2_5_vl" else AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.bfloat16 if shape == "3b" else torch.float32)
    spread_router(model)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if family == "qwen2_5_vl":
        tiny_image_processor(448 if shape == "3b" else 112).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("out", help="the directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=("test", "3b"), default="test", help="3b: Qwen2.5-VL-3B's dimensions")
    args = parser.parse_args()
    print(make_tiny_model(args.family, args.out, args.seed, args.shape))


if __name__ == "__main__":
    main()
