"""Rows with images (verl's convention): reading, processing, placeholder expansion, malformed rows;
and the built-in shapes task's images, answers and reward."""

from __future__ import annotations

import importlib.util
import io
import json
import random

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoTokenizer

from spmd_rlhf.data.datasets import build_prompt_examples, load_prompt_dataset, with_pixels
from spmd_rlhf.data.vision import expand_image_placeholders, load_image, load_image_processing
from spmd_rlhf.rewards.registry import get_reward_fn
from spmd_rlhf.tasks.shapes import ShapesTask, draw_image
from tests.launch import REPO_ROOT

_spec = importlib.util.spec_from_file_location("make_tiny_model", REPO_ROOT / "tools" / "make_tiny_model.py")
make_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tiny)

PAD, START, END = 17, 15, 16  # the tiny tokenizer's <|image_pad|>, <|vision_start|>, <|vision_end|>


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    """(model dir, tokenizer, ImageProcessing) of the tiny random Qwen2.5-VL."""
    out = str(tmp_path_factory.mktemp("vl") / "tiny")
    make_tiny.make_tiny_model("qwen2_5_vl", out)
    config = AutoConfig.from_pretrained(out)
    assert config.image_token_id == PAD
    processing = load_image_processing(out, config.image_token_id, config.vision_config.spatial_merge_size)
    return out, AutoTokenizer.from_pretrained(out), processing


def png(size: int, colour=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def row(prompt, images, truth="3") -> dict:
    return {"prompt": prompt, "images": images, "data_source": "shapes", "reward_model": {"ground_truth": truth}}


def build(rows, tokenizer, images, source="<rows>", max_bad=1.0):
    return build_prompt_examples([(i + 1, r) for i, r in enumerate(rows)], tokenizer, 512, True, max_bad,
                                 "data.train_files", source=source, images=images)


def test_expansion_repeats_each_placeholder_by_its_own_count():
    assert expand_image_placeholders([1, PAD, 2, PAD, 3], PAD, [2, 3]) == [1, PAD, PAD, 2, PAD, PAD, PAD, 3]
    with pytest.raises(ValueError, match="1 image placeholders but the row has 2 images"):
        expand_image_placeholders([1, PAD], PAD, [4, 4])


def test_image_forms_read_alike(tmp_path):
    (tmp_path / "a.png").write_bytes(png(28, (0, 0, 255)))
    blue = png(28, (0, 0, 255))
    forms = [blue, {"bytes": blue, "path": None}, {"bytes": None, "path": "a.png"}, "a.png"]
    for form in forms:
        image = load_image(form, str(tmp_path))
        assert image.size == (28, 28) and image.getpixel((3, 3)) == (0, 0, 255)
    with pytest.raises(ValueError, match="unreadable"):
        load_image(b"not an image")
    with pytest.raises(ValueError, match="must be a path, bytes"):
        load_image(42)


def test_rows_with_images_expand_to_the_patch_count(tiny_vl, tmp_path):
    _, tokenizer, images = tiny_vl
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "b.png").write_bytes(png(84))
    path = tmp_path / "rows.jsonl"
    rows = [row("<image>=", ["img/b.png"]),
            row([{"role": "user", "content": "1<image>2<image>"}], ["img/b.png", "img/b.png"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, stats = load_prompt_dataset([str(path)], tokenizer, 512, True, 0.0, "data.train_files", images=images)
    assert stats.kept == 2
    # 84 pixels = 6x6 patches of 14, merged 2x2: 9 tokens per image
    assert examples[0].prompt_ids == [START] + [PAD] * 9 + [END] + tokenizer("=", add_special_tokens=False).input_ids
    one, two = tokenizer("1", add_special_tokens=False).input_ids, tokenizer("2", add_special_tokens=False).input_ids
    assert examples[1].prompt_ids == one + [START] + [PAD] * 9 + [END] + two + [START] + [PAD] * 9 + [END]
    assert examples[1].vision.image_grid_thw_I3.tolist() == [[1, 6, 6], [1, 6, 6]]
    assert with_pixels(examples)[1].vision.pixel_values_PD.shape == (72, 3 * 2 * 14 * 14)


def test_bytes_dict_and_content_parts_rows(tiny_vl):
    _, tokenizer, images = tiny_vl
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "="}]}]
    rows = [row("<image>=", [png(56)]), row(parts, [{"bytes": png(56), "path": "ignored.png"}])]
    examples, _ = build(rows, tokenizer, images)
    assert examples[0].prompt_ids == examples[1].prompt_ids
    assert examples[0].prompt_ids.count(PAD) == 4  # 56 pixels: 4x4 patches -> 4 tokens
    one, two = with_pixels(examples)
    assert torch.equal(one.vision.pixel_values_PD, two.vision.pixel_values_PD)
    text, _ = build([{"prompt": "1+2=", "data_source": "a", "reward_model": {"ground_truth": "3"}}], tokenizer, images)
    assert text[0].vision is None and PAD not in text[0].prompt_ids


def test_malformed_image_rows_are_reported_with_their_line(tiny_vl, caplog):
    _, tokenizer, images = tiny_vl
    rows = [row("<image>=", [png(56)]),
            row("<image><image>=", [png(56)]),  # two placeholders, one image
            row("=", [png(56)]),  # no placeholder
            row("<image>=", [b"garbage"]),
            row("<image>=", ["missing.png"]),
            row("<image>=", "not-a-list")]
    examples, stats = build(rows, tokenizer, images)
    assert stats.kept == 1 and stats.malformed == 5
    assert "line 2: the prompt has 2 image placeholders but the row has 1 images" in caplog.text
    assert "line 3: the prompt has 0 image placeholders" in caplog.text
    assert "line 4: image unreadable" in caplog.text and "line 5: image unreadable" in caplog.text
    assert "line 6: 'images' must be a list" in caplog.text
    with pytest.raises(ValueError, match="2 of 2 rows are malformed.*line 1: .*text-only"):
        build(rows[:2], tokenizer, None, max_bad=0.0)


def occupied(image, cell: int) -> bool:
    """Whether a 28-pixel cell (row-major 2x2) of a 56-pixel image holds more than the background."""
    left, top = (cell % 2) * 28, (cell // 2) * 28
    return len(image.crop((left, top, left + 28, top + 28)).getcolors(28 * 28)) > 1


def test_shapes_images_hold_the_counted_shapes():
    rng = random.Random(3)
    for cells in ([0], [1, 2], [0, 1, 3], [0, 1, 2, 3]):
        image = draw_image(cells, 56, rng)
        for cell in range(4):  # a cell is non-background exactly where a shape was drawn
            assert occupied(image, cell) == (cell in cells), (cells, cell)


def test_shapes_rows_answers_and_reward(tiny_vl):
    _, tokenizer, images = tiny_vl
    train, val = ShapesTask(num_train=40, num_val=8).rows()
    assert len(train) == 40 and len(val) == 8
    counts = [int(r["reward_model"]["ground_truth"]) for r in train]
    assert set(counts) == {1, 2, 3, 4}
    for r in train[:10]:  # the truth is the number of occupied cells of the drawn image
        image = load_image(r["images"][0])
        assert sum(occupied(image, c) for c in range(4)) == int(r["reward_model"]["ground_truth"])
    examples, stats = build(train, tokenizer, images)
    assert stats.kept == 40 and all(e.prompt_ids.count(PAD) == 4 for e in examples)
    reward = get_reward_fn("shapes")
    assert reward("shapes", "3", "3") == 1.0 and reward("shapes", " 3\n", "3") == 1.0
    assert reward("shapes", "33", "3") == 0.0 and reward("shapes", "4", "3") == 0.0 and reward("shapes", "", "3") == 0.0
    demos = ShapesTask().demonstrations(6, seed=1)
    assert [a for _, a in demos] == [r["reward_model"]["ground_truth"] for r, _ in demos]
