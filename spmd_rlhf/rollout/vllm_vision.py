"""What a vision-language policy (Qwen2-VL family) changes in the vLLM engine.

vLLM runs its own image processor: a request is a token prompt with ``multi_modal_data`` (the
decoded images), and vLLM's Qwen2-VL processor expands each image's ONE placeholder token to its
patch count itself (a ``PromptReplacement`` whose target is the single image token, applied to
every token prompt). Our prompt ids hold the placeholders already expanded (what the actor
reads), so each run of image tokens is collapsed back to one before the request. vLLM needs the
model directory's tokenizer and processor for that (no ``skip_tokenizer_init``), and a per-prompt
image limit (``limit_mm_per_prompt``; no videos). Responses never hold an image or video
placeholder (``banned_bias``), which the actor's forward would take for an image.

Weights: the ``full`` sync streams HF names, which vLLM's own ``load_weights`` maps onto its
vision tower and language model; the ``dtensor`` path writes tp slices by name into the text
layout only (``vllm_layout``), so a VL policy is refused there (``check_vision``).
"""

from __future__ import annotations

from typing import Any

from ..data.vision import VisionInputs


def collapse_image_placeholders(ids: list[int], image_token_id: int) -> list[int]:
    """``ids`` with each run of image tokens shortened to one token (an image's placeholder)."""
    return [t for i, t in enumerate(ids) if t != image_token_id or i == 0 or ids[i - 1] != image_token_id]


def engine_kwargs(max_images: int) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments of a vision-language policy whose prompts hold up to
    ``max_images`` images."""
    return {"limit_mm_per_prompt": {"image": max_images, "video": 0}}


def banned_bias(token_ids: list[int]) -> dict[int, float] | None:
    """``SamplingParams.logit_bias`` that keeps the placeholders out of the responses (vLLM clamps a
    bias to [-100, 100]); None without any. vLLM's processed logprobs then come from the biased
    distribution: they differ from the actor's by the placeholders' (negligible) mass."""
    return {t: -100.0 for t in token_ids} or None


def request(tokens_prompt: type, ids: list[int], vision: VisionInputs | None, image_token_id: int) -> Any:
    """One ``TokensPrompt``: the ids with one placeholder per image and the images as multi-modal data."""
    if vision is None or vision.num_images == 0:
        return tokens_prompt(prompt_token_ids=ids)
    assert isinstance(vision, VisionInputs), "images at rest: the step's prompts go through with_pixels"
    return tokens_prompt(prompt_token_ids=collapse_image_placeholders(ids, image_token_id),
                         multi_modal_data={"image": list(vision.images)})


def check_expansion(outputs: list, prompts: list[list[int]], n: int) -> None:
    """Raise when vLLM's prompt (its processor's expansion of the placeholders) is not ours: the actor
    would then score the responses after other tokens than vLLM generated them from (the two image
    processors disagree on an image's grid)."""
    for row, output in enumerate(outputs):
        theirs, ours = list(output.prompt_token_ids), prompts[row // n]
        if theirs != ours:
            raise RuntimeError(
                f"vLLM expanded prompt {row // n}'s images to {len(theirs)} tokens, the data loader to {len(ours)}: "
                "vLLM's image processor and the model directory's disagree (min_pixels/max_pixels?)")
