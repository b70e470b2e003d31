"""A prompt's images: at rest (``ImageSources``: encoded bytes or paths, and grids) and as the policy
reads them for one step (``VisionInputs``: pixel patches, grids, the decoded images).

Qwen2-VL-family processors cut each image into ``grid_t x grid_h x grid_w`` patches of
``C * temporal_patch_size * patch_size**2`` values; the language model sees one ``image_pad`` token
per ``spatial_merge_size**2`` patches, so a prompt's token ids hold each image's placeholder
already expanded to that count (what the HF processor emits, and what vLLM accepts as a
pre-expanded token prompt). The grid follows from the image's size alone (the processor's
``smart_resize``), which the file's header gives without decoding: a loaded dataset holds each
image's source and grid, and a step's prompts are decoded and processed when the step draws them
(``datasets.with_pixels``). Everything downstream (engines, actor, reference) reads those
``VisionInputs`` and the token ids; nothing else runs the image processor.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize


def placeholder_counts(image_grid_thw_I3: torch.Tensor, spatial_merge_size: int) -> list[int]:
    """How many ``image_pad`` tokens each image of these grids takes: one per merged patch."""
    return [int(t * h * w) // spatial_merge_size**2 for t, h, w in image_grid_thw_I3.tolist()]


@dataclass
class VisionInputs:
    """One prompt's images, in the order their placeholders appear in its token ids."""

    pixel_values_PD: torch.Tensor  # [patches of all images, C * temporal_patch * patch**2], fp32
    image_grid_thw_I3: torch.Tensor  # [images, 3] long: (t, h, w) in patches, before the spatial merge
    images: list[Any]  # the decoded images (PIL), as an engine that runs its own processor wants them
    sources: ImageSources | None = None  # the at-rest form these were made from, if any

    def __post_init__(self) -> None:
        assert self.image_grid_thw_I3.ndim == 2 and self.image_grid_thw_I3.shape[1] == 3
        assert self.pixel_values_PD.shape[0] == int(self.image_grid_thw_I3.prod(dim=1).sum()), \
            "one row of pixel values per patch"
        assert len(self.images) == self.image_grid_thw_I3.shape[0]

    def __reduce__(self) -> tuple:
        """Made from sources, it pickles as them (a receiving process decodes its own copy)."""
        if self.sources is None:
            return super().__reduce__()
        return _load, (self.sources,)

    @property
    def num_images(self) -> int:
        return self.image_grid_thw_I3.shape[0]

    def placeholder_tokens(self, spatial_merge_size: int) -> list[int]:
        """How many ``image_pad`` tokens each image takes in the token ids."""
        return placeholder_counts(self.image_grid_thw_I3, spatial_merge_size)


IMAGE_MARK = "<image>"  # verl's convention: where each image of a row goes in its prompt text
ImageSource = bytes | str  # an image at rest: its encoded bytes, or the absolute path of its file


def load_image(item: Any, base_dir: str | None = None) -> Any:
    """One image of a row as an RGB ``PIL.Image``: a path (relative to ``base_dir``, the data file's
    directory), raw bytes, a ``{"bytes": ..., "path": ...}`` dict (HF datasets' parquet form) or an
    image already decoded. Raises ``ValueError`` when it cannot be read."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    return _read(image_source(item, base_dir), lambda image: image.convert("RGB"))


def _read(source: ImageSource, read: Any) -> Any:
    """``read(image)`` of the opened (not yet decoded) image at ``source``; ``ValueError`` when it
    cannot be read."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return read(image)
    except (OSError, ValueError) as err:
        raise ValueError(f"image unreadable: {err}") from err


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


def image_source(item: Any, base_dir: str | None = None) -> ImageSource:
    """One image of a row at rest, undecoded: bytes as they are, a path made absolute (relative to
    ``base_dir``), a ``{"bytes", "path"}`` dict's bytes else its path; an image already decoded is
    stored as PNG bytes (lossless). Raises ``ValueError`` for anything else."""
    from PIL import Image

    if isinstance(item, Image.Image):
        buffer = io.BytesIO()
        item.convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(item, dict):
        item = item.get("bytes") or item.get("path")
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str) and item:
        return item if os.path.isabs(item) or base_dir is None else os.path.join(base_dir, item)
    raise ValueError(f"an image must be a path, bytes or {{'bytes', 'path'}}, got {type(item).__name__}")


def image_size(source: ImageSource) -> tuple[int, int]:
    """``(width, height)`` of an image at rest, read from its header (the pixels are not decoded).
    Raises ``ValueError`` when it cannot be read."""
    return _read(source, lambda image: image.size)


@dataclass
class ImageSources:
    """One prompt's images at rest, in the order of their placeholders: each image's source and
    grid (all its token ids need). ``load`` makes the step's ``VisionInputs``. Pickles small: the
    sources, the grids and the processing's model directory."""

    sources: list[ImageSource]
    image_grid_thw_I3: torch.Tensor  # [images, 3] long: what ``processing`` makes of each image
    processing: ImageProcessing

    def __post_init__(self) -> None:
        assert self.image_grid_thw_I3.shape == (len(self.sources), 3)

    @property
    def num_images(self) -> int:
        return len(self.sources)

    def placeholder_tokens(self, spatial_merge_size: int) -> list[int]:
        """How many ``image_pad`` tokens each image takes in the token ids."""
        return placeholder_counts(self.image_grid_thw_I3, spatial_merge_size)

    def state(self) -> dict:
        """Plain values (a checkpoint's): the sources, grids and the processing's arguments."""
        p = self.processing
        return {"sources": list(self.sources), "grids": self.image_grid_thw_I3.tolist(), "model_dir": p.model_dir,
                "image_token_id": p.image_token_id, "merge_size": p.merge_size}

    @staticmethod
    def from_state(state: dict) -> ImageSources:
        processing = load_image_processing(state["model_dir"], state["image_token_id"], state["merge_size"])
        return ImageSources(list(state["sources"]), torch.tensor(state["grids"], dtype=torch.long).view(-1, 3),
                            processing)

    def load(self) -> VisionInputs:
        """Decode and process the images: the pixel patches (the same grids as at load time)."""
        vision = self.processing.inputs([load_image(source) for source in self.sources])
        if not torch.equal(vision.image_grid_thw_I3, self.image_grid_thw_I3):
            raise ValueError(f"the images decode to grids {vision.image_grid_thw_I3.tolist()}, their headers gave "
                             f"{self.image_grid_thw_I3.tolist()}: the prompt's placeholders no longer fit them")
        vision.sources = self
        return vision


def _load(sources: ImageSources) -> VisionInputs:
    return sources.load()


@dataclass
class ImageProcessing:
    """The model directory's image processor and what expanding a prompt needs. Pickles as its
    arguments to ``load_image_processing`` (each process loads the directory's processor once)."""

    processor: Any  # a Qwen2-VL image processor (PIL backend where torchvision is missing)
    image_token_id: int
    merge_size: int
    model_dir: str

    def __reduce__(self) -> tuple:
        return load_image_processing, (self.model_dir, self.image_token_id, self.merge_size)

    def grid(self, width: int, height: int) -> list[int]:
        """``(t, h, w)`` patches of a ``width x height`` image: the size the processor resizes it to
        (``smart_resize``: multiples of ``patch * merge`` within its min/max pixels) over the patch."""
        p = self.processor
        assert p.do_resize, "the grid follows the processor's resize"
        resized_h, resized_w = smart_resize(height, width, factor=p.patch_size * p.merge_size,
                                            min_pixels=p.size["shortest_edge"], max_pixels=p.size["longest_edge"])
        return [1, resized_h // p.patch_size, resized_w // p.patch_size]

    def sources(self, items: list[Any], base_dir: str | None = None) -> ImageSources:
        """A row's images at rest, their grids from their headers. Raises ``ValueError`` for an
        image that cannot be read or resized."""
        sources = [image_source(item, base_dir) for item in items]
        grids = [self.grid(*image_size(source)) for source in sources]
        return ImageSources(sources, torch.tensor(grids, dtype=torch.long).view(-1, 3), self)

    def inputs(self, images: list[Any]) -> VisionInputs:
        """Pixel patches and grids of ``images`` (decoded, RGB)."""
        out = self.processor(images=images, return_tensors="pt")
        return VisionInputs(out["pixel_values"].float(), out["image_grid_thw"].long(), list(images))

    def prompt(self, ids: list[int], images: list[Any]) -> tuple[list[int], VisionInputs]:
        """Process ``images`` (decoded) now and expand the placeholders of ``ids`` (one image token
        per image)."""
        vision = self.inputs(images)
        return expand_image_placeholders(ids, self.image_token_id, vision.placeholder_tokens(self.merge_size)), vision

    def prompt_at_rest(self, ids: list[int], items: list[Any], base_dir: str | None = None) -> tuple[list[int],
                                                                                                     ImageSources]:
        """``prompt`` without decoding: the row's images at rest (``items`` as a row gives them)."""
        images = self.sources(items, base_dir)
        return expand_image_placeholders(ids, self.image_token_id, images.placeholder_tokens(self.merge_size)), images


@functools.lru_cache(maxsize=8)
def load_image_processing(model_dir: str, image_token_id: int, merge_size: int) -> ImageProcessing:
    """The image processor of a vision-language model directory (``AutoImageProcessor``: the PIL
    backend where torchvision is missing), with the model's image token and spatial merge size
    (loaded once per process)."""
    from transformers import AutoImageProcessor

    return ImageProcessing(AutoImageProcessor.from_pretrained(model_dir), image_token_id, merge_size, model_dir)
