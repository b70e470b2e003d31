"""A built-in visual task: count the filled shapes in a small generated image (nothing downloaded).

Each image is ``size x size`` pixels cut into a 2x2 grid of cells; 1 to 4 of the cells hold one
filled shape (square, disc or triangle, in a random colour, size and offset). With Qwen2-VL's
14-pixel patches merged 2x2, a 56-pixel image is four image tokens, one per cell, so a tiny model
only has to tell an empty cell from a full one and add up four bits: learnable in CPU minutes.

Rows follow verl's format with one image (PNG bytes, as HF datasets store them) and the prompt's
``<image>`` mark where it goes; the answer is the count as one digit, then EOS. The rule reward
(``data_source`` ``"shapes"``, registered here) is 1 for exactly the count, else 0.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from ..rewards.registry import register_reward

DATA_SOURCE = "shapes"
MAX_SHAPES = 4
_BACKGROUND = (245, 245, 240)
_KINDS = ("square", "disc", "triangle")


def draw_image(cells: list[int], size: int, rng: random.Random):
    """An RGB ``PIL.Image`` with one filled shape in each cell of ``cells`` (0..3, row-major 2x2)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size // 2
    for index in cells:
        left, top = (index % 2) * cell, (index // 2) * cell
        side = rng.randint(cell // 2, cell - 4)
        x0, y0 = left + rng.randint(2, cell - side - 2), top + rng.randint(2, cell - side - 2)
        box = (x0, y0, x0 + side, y0 + side)
        colour = tuple(rng.randint(0, 160) for _ in range(3))
        kind = rng.choice(_KINDS)
        if kind == "square":
            draw.rectangle(box, fill=colour)
        elif kind == "disc":
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon([(x0, y0 + side), (x0 + side, y0 + side), (x0 + side // 2, y0)], fill=colour)
    return image


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class ShapesTask:
    """``num_train`` + ``num_val`` generated images of 1..4 shapes, their prompts and counts."""

    size: int = 56  # pixels a side; a multiple of 28 (two merged 14-pixel patches)
    num_train: int = 512
    num_val: int = 64
    seed: int = 0
    style: str = "padded"  # padded: "<image>=" (the tiny tokenizer's characters) | chat: a question

    def prompt(self) -> str:
        if self.style == "chat":
            return "<image>How many shapes are in the image? Answer with a single digit."
        assert self.style == "padded", f"unknown shapes style {self.style!r}"
        return "<image>="

    def problem(self, rng: random.Random) -> tuple[bytes, int]:
        """One image (PNG bytes) and its count."""
        count = rng.randint(1, MAX_SHAPES)
        cells = sorted(rng.sample(range(4), count))
        return png_bytes(draw_image(cells, self.size, rng)), count

    def row(self, image: bytes, count: int, index: int) -> dict:
        return {
            "prompt": self.prompt(),
            "images": [image],
            "data_source": DATA_SOURCE,
            "reward_model": {"style": "rule", "ground_truth": str(count)},
            "extra_info": {"index": index},
        }

    def rows(self) -> tuple[list[dict], list[dict]]:
        """verl-format rows: (train, held out), from disjoint random streams."""
        train_rng, val_rng = random.Random(self.seed), random.Random(self.seed + 1_000_003)
        train = [self.row(*self.problem(train_rng), i) for i in range(self.num_train)]
        val = [self.row(*self.problem(val_rng), i) for i in range(self.num_val)]
        return train, val

    def demonstrations(self, count: int, seed: int) -> list[tuple[dict, str]]:
        """``count`` (row, answer text) pairs for a supervised warm start, freshly drawn."""
        rng = random.Random(seed)
        demos = []
        for i in range(count):
            image, shapes = self.problem(rng)
            demos.append((self.row(image, shapes, i), str(shapes)))
        return demos


@register_reward(DATA_SOURCE)
def count_score(solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    """1.0 when the response is exactly the count (surrounding whitespace aside), else 0.0."""
    del extra_info  # part of the reward signature
    return 1.0 if solution_str.strip() == str(ground_truth).strip() else 0.0
