"""A prompt's images as the policy reads them: pixel patches, their grids, and the images themselves.

Qwen2-VL-family processors cut each image into ``grid_t x grid_h x grid_w`` patches of
``C * temporal_patch_size * patch_size**2`` values; the language model sees one ``image_pad`` token
per ``spatial_merge_size**2`` patches, so a prompt's token ids hold each image's placeholder
already expanded to that count (what the HF processor emits, and what vLLM accepts as a
pre-expanded token prompt). Everything downstream (engines, actor, reference) reads a prompt's
images from ``VisionInputs`` and its token ids; nothing re-runs the image processor.
"""

from __future__ import annotations

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
