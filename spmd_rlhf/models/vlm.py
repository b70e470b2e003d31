"""Vision-language policies (Qwen2-VL / Qwen2.5-VL): multimodal rotary positions.

Qwen2-VL's M-RoPE gives every token three position ids (temporal, height, width). Text tokens
carry the same value in all three, counting on from the previous token; the ``image_pad`` tokens of
one image carry ``start + (t, row, column)`` over the image's merged grid, and the text after it
resumes at ``start + max(rows, columns)``. Computed here from the token ids and the grids alone
(the same numbers as HF's ``get_rope_index``, whose signature moves between transformers
releases), so the actor, the reference and the torch engine pass explicit positions.

Also the one owner of "is this policy vision-language" (``is_vision_language``, ``model_class``,
``text_config``), of its parts (``multimodal_body``, ``vision_tower``; also under PEFT's LoRA
wrapper) and of what its forward takes beyond token ids (``vision_forward_kwargs``).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig

from ..config import Config, ConfigError
from ..data.vision import VisionInputs
from .lora import base_model

VISION_LANGUAGE_TYPES = ("qwen2_vl", "qwen2_5_vl")


def is_vision_language(hf_config: PretrainedConfig) -> bool:
    """Whether the policy reads images (Qwen2-VL / Qwen2.5-VL)."""
    return hf_config.model_type in VISION_LANGUAGE_TYPES


def model_class(hf_config: PretrainedConfig) -> type:
    """The HF auto class that builds or loads the policy (its head included) for ``hf_config``."""
    return AutoModelForImageTextToText if is_vision_language(hf_config) else AutoModelForCausalLM


def text_config(hf_config: PretrainedConfig) -> PretrainedConfig:
    """The language model's config (heads, sizes, positions, vocabulary): a VL config's
    ``text_config``, a text model's own."""
    return hf_config.get_text_config()


def check_vision_language(cfg: Config, hf_config: PretrainedConfig) -> None:
    """Raise ``ConfigError`` (before any process group) for what a VL policy does not run with yet:
    sequence parallelism, LoRA adapters sent to vLLM as adapters or beside a trained vision tower, a
    critic made from the actor."""
    if not is_vision_language(hf_config):
        return
    what = f"model.path is a vision-language model ({hf_config.model_type})"
    if cfg.distributed.sp > 1:
        raise ConfigError(f"distributed.sp={cfg.distributed.sp}: {what}, which has no sequence parallelism yet; "
                          "set distributed.sp=1")
    if cfg.model.lora.rank > 0 and cfg.model.lora.sync == "adapter":
        raise ConfigError(f"model.lora.sync=adapter: {what}, whose adapters vLLM does not take from this trainer "
                          "yet; set model.lora.sync=merged (the merged weights go to any engine)")
    if cfg.model.lora.rank > 0 and not cfg.model.vision.freeze_vision_tower:
        raise ConfigError(f"model.vision.freeze_vision_tower=false with model.lora.rank={cfg.model.lora.rank}: {what} "
                          "and LoRA trains adapters on its language model only, the vision tower stays frozen; set "
                          "model.vision.freeze_vision_tower=true (or model.lora.rank=0 to train the tower)")
    if cfg.algorithm.adv_estimator == "gae" and cfg.critic.init_from == "actor":
        raise ConfigError(f"algorithm.adv_estimator=gae with critic.init_from=actor: {what} and the critic would "
                          "copy it (a value model reading images is not supported yet); use a critic-free "
                          "estimator such as algorithm.adv_estimator=grpo")


def image_token_id(hf_config: PretrainedConfig) -> int:
    return int(hf_config.image_token_id)


def placeholder_token_ids(hf_config: PretrainedConfig) -> list[int]:
    """The token ids a vision-language policy never generates: its image and video placeholders (the
    actor's forward would take one in a response for an image). The TorchEngine's logprobs stay the
    actor's; vLLM's come after its logit bias (``rollout/vllm_vision.banned_bias``)."""
    return [image_token_id(hf_config), int(hf_config.video_token_id)]


def spatial_merge_size(hf_config: PretrainedConfig) -> int:
    return int(hf_config.vision_config.spatial_merge_size)


def multimodal_body(model: torch.nn.Module) -> torch.nn.Module:
    """The module of a VL policy that takes token ids with ``pixel_values`` / ``image_grid_thw`` and
    returns the last hidden states (vision tower + language model, no head); ``model`` may be a
    LoRA actor (PEFT's wrapper)."""
    return base_model(model).model


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision encoder of a VL policy (patch embedding, blocks, merger), also under PEFT's wrapper."""
    return multimodal_body(model).visual


def decoder_hidden(model: torch.nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                   image_grid_thw: torch.Tensor | None = None, **decoder_kwargs) -> torch.Tensor:
    """Last hidden states ``[B, T, H]`` of the policy's body (no head): a text model's decoder, or a
    VL model's vision tower, its features scattered over the ``image_pad`` embeddings, then the
    language model (``decoder_kwargs``, e.g. packed-sequence boundaries, reach the language model
    only). The tower runs first in every VL forward, on a 2x2-patch blank when there is no image
    (its output times 0 joins the embeddings), so every rank's FSDP units gather, and reduce, in
    the same order whether or not its micro-batch holds images."""
    if not is_vision_language(model.config):
        assert pixel_values is None, "images for a text-only policy"
        return model.get_decoder()(input_ids=input_ids, use_cache=False, **decoder_kwargs).last_hidden_state
    body = multimodal_body(model)
    blank = pixel_values is None
    if blank:
        pixel_values, image_grid_thw = _blank_image(model.config, input_ids.device)
    features_NH = torch.cat(body.get_image_features(pixel_values, image_grid_thw).pooler_output)
    embeds_BTH = body.get_input_embeddings()(input_ids)
    features_NH = features_NH.to(embeds_BTH.dtype)
    if blank:
        embeds_BTH = embeds_BTH + 0.0 * features_NH.sum()
    else:  # the plan matched the placeholder runs to the grids (mrope_positions asserts it)
        image_BT1 = (input_ids == image_token_id(model.config)).unsqueeze(-1)
        embeds_BTH = embeds_BTH.masked_scatter(image_BT1, features_NH)
    return body.language_model(inputs_embeds=embeds_BTH, use_cache=False, **decoder_kwargs).last_hidden_state


def _blank_image(hf_config: PretrainedConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels and grid of the smallest image the tower takes: one merged token of zeros."""
    vision = hf_config.vision_config
    merge = vision.spatial_merge_size
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return torch.zeros(merge * merge, width, device=device), torch.tensor([[1, merge, merge]], device=device)


def vision_forward_kwargs(hf_config: PretrainedConfig, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
                          visions: list[VisionInputs | None]) -> dict[str, torch.Tensor]:
    """What a VL policy's forward takes beside the token ids for these rows: ``pixel_values`` of all
    their images concatenated in row order, ``image_grid_thw`` and M-RoPE ``position_ids`` ``[3, B, T]``
    at each row's unpadded tokens, right- or left-padded (padding at 0). Empty when no row has an image (text positions are then the same on all three
    axes, and the ``[B, T]`` ones do). Host tensors in, host tensors out."""
    assert len(visions) == input_ids_BT.shape[0]
    rows = [(i, v) for i, v in enumerate(visions) if v is not None and v.num_images > 0]
    if not rows:
        return {}
    assert all(isinstance(v, VisionInputs) for _, v in rows), "images at rest: the step's prompts need with_pixels"
    merge, token = spatial_merge_size(hf_config), image_token_id(hf_config)
    positions_3BT = torch.zeros((3, *input_ids_BT.shape), dtype=torch.long)
    for i, vision in enumerate(visions):
        grids_I3 = vision.image_grid_thw_I3 if vision is not None else torch.zeros(0, 3, dtype=torch.long)
        real_T = attention_mask_BT[i].bool()
        positions_3BT[:, i, real_T] = mrope_positions(input_ids_BT[i, real_T], grids_I3, token, merge)
    return {"pixel_values": torch.cat([v.pixel_values_PD for _, v in rows]),
            "image_grid_thw": torch.cat([v.image_grid_thw_I3 for _, v in rows]),
            "position_ids": positions_3BT}


def packed_vision_forward_kwargs(hf_config: PretrainedConfig, input_ids_SL: torch.Tensor,
                                 attention_mask_SL: torch.Tensor, visions: list[VisionInputs | None],
                                 text_positions_1N: torch.Tensor) -> dict[str, torch.Tensor]:
    """``vision_forward_kwargs`` of S right-padded rows packed into one row of their real tokens, in
    row order (``data/packing.pack``): ``position_ids`` in transformers' packed form ``[4, 1, N]``,
    row 0 the per-sequence text positions (``text_positions_1N``, where sequences start), rows 1-3
    M-RoPE. Empty when no row has an image."""
    inputs = vision_forward_kwargs(hf_config, input_ids_SL, attention_mask_SL, visions)
    if not inputs:
        return {}
    positions_3N = inputs["position_ids"][:, attention_mask_SL.bool()]
    assert positions_3N.shape[1] == text_positions_1N.shape[1], "the rows' real tokens are the packed row"
    inputs["position_ids"] = torch.cat([text_positions_1N, positions_3N]).unsqueeze(1)
    return inputs


def mrope_positions(input_ids_L: torch.Tensor, image_grid_thw_I3: torch.Tensor, image_token_id: int,
                    spatial_merge_size: int) -> torch.Tensor:
    """Positions ``[3, L]`` of one unpadded sequence whose images' placeholders are expanded.

    The ``image_pad`` runs are matched to ``image_grid_thw_I3`` in order; each run must be exactly
    ``t * h * w / spatial_merge_size**2`` tokens long."""
    ids = input_ids_L.tolist()
    grids = image_grid_thw_I3.tolist()
    pieces: list[torch.Tensor] = []
    pos, i, image = 0, 0, 0
    while i < len(ids):
        if ids[i] != image_token_id:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            i = j
            continue
        assert image < len(grids), "more image placeholders than images"
        t, h, w = grids[image]
        h, w = h // spatial_merge_size, w // spatial_merge_size
        count = t * h * w
        assert ids[i:i + count] == [image_token_id] * count and (i + count == len(ids) or ids[i + count] != image_token_id), \
            f"image {image}: its placeholder run is not {count} tokens"
        grid_t, grid_h, grid_w = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        pieces.append(torch.stack([grid_t, grid_h, grid_w]).reshape(3, -1) + pos)
        pos += max(h, w)
        i += count
        image += 1
    assert image == len(grids), "fewer image placeholders than images"
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(pieces, dim=1).long()
