"""A prompt's images as the policy reads them: pixel patches, their grids, and the images themselves.

Qwen2-VL-family processors cut each image into ``grid_t x grid_h x grid_w`` patches of
``C * temporal_patch_size * patch_size**2`` values; the language model sees one ``image_pad`` token
per ``spatial_merge_size**2`` patches, so a prompt's token ids hold each image's placeholder
already expanded to that count (what the HF processor emits, and what vLLM accepts as a
pre-expanded token prompt). Everything downstream (engines, actor, reference) reads a prompt's
images from ``VisionInputs`` and its token ids; nothing re-runs the image processor.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class VisionInputs:
    """One prompt's images, in the order their placeholders appear in its token ids."""

    pixel_values_PD: torch.Tensor  # [patches of all images, C * temporal_patch * patch**2], fp32
    image_grid_thw_I3: torch.Tensor  # [images, 3] long: (t, h, w) in patches, before the spatial merge
    images: list[Any]  # the decoded images (PIL), as an engine that runs its own processor wants them

    def __post_init__(self) -> None:
        assert self.image_grid_thw_I3.ndim == 2 and self.image_grid_thw_I3.shape[1] == 3
        assert self.pixel_values_PD.shape[0] == int(self.image_grid_thw_I3.prod(dim=1).sum()), \
            "one row of pixel values per patch"
        assert len(self.images) == self.image_grid_thw_I3.shape[0]

    @property
    def num_images(self) -> int:
        return self.image_grid_thw_I3.shape[0]

    def placeholder_tokens(self, spatial_merge_size: int) -> list[int]:
        """How many ``image_pad`` tokens each image takes in the token ids."""
        return [int(t * h * w) // spatial_merge_size**2 for t, h, w in self.image_grid_thw_I3.tolist()]


IMAGE_MARK = "<image>"  # verl's convention: where each image of a row goes in its prompt text


def load_image(item: Any, base_dir: str | None = None) -> Any:
    """One image of a row as an RGB ``PIL.Image``: a path (relative to ``base_dir``, the data file's
    directory), raw bytes, a ``{"bytes": ..., "path": ...}`` dict (HF datasets' parquet form) or an
    image already decoded. Raises ``ValueError`` when it cannot be read."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, dict):
        item = item.get("bytes") or item.get("path")
    try:
        if isinstance(item, (bytes, bytearray)):
            with Image.open(io.BytesIO(item)) as image:
                return image.convert("RGB")
        if isinstance(item, str) and item:
            path = item if os.path.isabs(item) or base_dir is None else os.path.join(base_dir, item)
            with Image.open(path) as image:
                return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"image unreadable: {err}") from err
    raise ValueError(f"an image must be a path, bytes or {{'bytes', 'path'}}, got {type(item).__name__}")


def expand_image_placeholders(ids: list[int], image_token_id: int, counts: list[int]) -> list[int]:
    """``ids`` with its ``i``-th image token repeated ``counts[i]`` times (what the HF processor does
    to a chat template's one placeholder per image). Raises ``ValueError`` when the prompt holds
    a different number of image tokens than there are images."""
    found = sum(1 for t in ids if t == image_token_id)
    if found != len(counts):
        raise ValueError(f"the prompt has {found} image placeholders but the row has {len(counts)} images")
    out: list[int] = []
    image = 0
    for token in ids:
        if token == image_token_id:
            out.extend([image_token_id] * counts[image])
            image += 1
        else:
            out.append(token)
    return out


@dataclass
class ImageProcessing:
    """The model directory's image processor and what expanding a prompt needs."""

    processor: Any  # a Qwen2-VL image processor (PIL backend where torchvision is missing)
    image_token_id: int
    merge_size: int

    def inputs(self, images: list[Any]) -> VisionInputs:
        """Pixel patches and grids of ``images`` (decoded, RGB)."""
        out = self.processor(images=images, return_tensors="pt")
        return VisionInputs(out["pixel_values"].float(), out["image_grid_thw"].long(), list(images))

    def prompt(self, ids: list[int], images: list[Any]) -> tuple[list[int], VisionInputs]:
        """Process ``images`` and expand the placeholders of ``ids`` (one image token per image)."""
        vision = self.inputs(images)
        return expand_image_placeholders(ids, self.image_token_id, vision.placeholder_tokens(self.merge_size)), vision


def load_image_processing(model_dir: str, image_token_id: int, merge_size: int) -> ImageProcessing:
    """The image processor of a vision-language model directory (``AutoImageProcessor``: the PIL
    backend where torchvision is missing), with the model's image token and spatial merge size."""
    from transformers import AutoImageProcessor

    return ImageProcessing(AutoImageProcessor.from_pretrained(model_dir), image_token_id, merge_size)
