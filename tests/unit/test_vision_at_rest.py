"""Images at rest: a loaded dataset holds each image's source and grid (from its header), and the
step's prompts are decoded and processed on demand (``with_pixels``) to exactly what processing
every image at load time gave (pixels, grids, token ids)."""

from __future__ import annotations

import importlib.util
import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoTokenizer, Qwen2VLImageProcessorPil

from spmd_rlhf.data.datasets import (at_rest, build_prompt_examples, image_messages, load_prompt_dataset,
                                     tokenize_prompt, with_pixels)
from spmd_rlhf.data.vision import ImageProcessing, ImageSources, VisionInputs, load_image, load_image_processing
from tests.launch import REPO_ROOT

_spec = importlib.util.spec_from_file_location("make_tiny_model", REPO_ROOT / "tools" / "make_tiny_model.py")
make_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tiny)

PAD = 17  # the tiny tokenizer's <|image_pad|>
# (width, height): square, both aspect ratios, odd sizes, below min_pixels, above max_pixels, extreme ratios
SIZES = [(56, 56), (84, 57), (57, 84), (29, 43), (20, 20), (13, 90), (300, 40), (40, 300), (448, 448),
         (1000, 700), (701, 1003), (2000, 11)]


def photo(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A noise image (incompressible, like a photo's detail) encoded as ``fmt``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    """(tokenizer, ImageProcessing) of the tiny random Qwen2.5-VL (images 56x56 to 112x112 pixels)."""
    out = str(tmp_path_factory.mktemp("vl") / "tiny")
    make_tiny.make_tiny_model("qwen2_5_vl", out)
    config = AutoConfig.from_pretrained(out)
    return AutoTokenizer.from_pretrained(out), load_image_processing(out, PAD, config.vision_config.spatial_merge_size)


@pytest.mark.parametrize("min_pixels,max_pixels", [(56 * 56, 112 * 112), (28 * 28, 448 * 448), (200 * 200, 300 * 300)])
def test_header_grid_equals_the_processors(min_pixels, max_pixels):
    """The grid from an image's header is the one the processor makes of its pixels, for sizes that
    hit min_pixels, max_pixels or neither, either aspect ratio, PNG and JPEG."""
    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, merge_size=2,
                                         temporal_patch_size=2)
    processing = ImageProcessing(processor, PAD, 2, "unused")
    clamped = set()
    for i, (width, height) in enumerate(SIZES):
        encoded = photo(width, height, seed=i, fmt="JPEG" if i % 2 else "PNG")
        at_rest = processing.sources([encoded])
        processed = processing.inputs([load_image(encoded)])
        assert at_rest.image_grid_thw_I3.tolist() == processed.image_grid_thw_I3.tolist(), (width, height)
        t, h, w = at_rest.image_grid_thw_I3[0].tolist()
        area = h * w * 14 * 14
        clamped |= {"min" if area >= min_pixels and width * height < min_pixels else None,
                    "max" if area <= max_pixels and width * height > max_pixels else None}
    assert {"min", "max"} <= clamped, "the sizes exercise both bounds"


def _rows(tmp_path) -> list[dict]:
    """Rows with images by path and as bytes, sizes below, within and above the tiny processor's range."""
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "img" / "a.jpg").write_bytes(photo(300, 200, seed=1, fmt="JPEG"))
    big, small, odd = photo(448, 448, seed=2), photo(30, 30, seed=3), photo(84, 57, seed=4)
    return [{"prompt": "<image>=", "images": ["img/a.jpg"]},
            {"prompt": "1<image>2<image>", "images": [{"bytes": big, "path": None}, "img/a.jpg"]},
            {"prompt": [{"role": "user", "content": "<image>?"}], "images": [small]},
            {"prompt": "<image>=", "images": [odd]}]


def test_a_loaded_dataset_holds_sources_and_grids_only(tiny_vl, tmp_path, monkeypatch):
    tokenizer, processing = tiny_vl
    rows = [{"prompt": f"<image>{i}", "images": [photo(224, 224, seed=i)], "data_source": "shapes",
             "reward_model": {"ground_truth": "1"}} for i in range(6)]
    path = tmp_path / "rows.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([dict(r, images=[{"bytes": r["images"][0], "path": None}]) for r in rows]),
                   path)
    with monkeypatch.context() as patch:  # loading decodes nothing
        patch.setattr(ImageProcessing, "inputs", lambda *_: pytest.fail("decoded at load time"))
        patch.setattr(Image.Image, "load", lambda *_: pytest.fail("decoded at load time"))
        examples, stats = load_prompt_dataset([str(path)], tokenizer, 512, True, 0.0, "data.train_files",
                                              images=processing)
    assert stats.kept == 6
    for e in examples:
        assert isinstance(e.vision, ImageSources) and all(isinstance(s, bytes) for s in e.vision.sources)
        assert e.vision.image_grid_thw_I3.dtype == torch.long and e.vision.image_grid_thw_I3.shape == (1, 3)
    encoded = sum(len(r["images"][0]) for r in rows)
    pickled = len(pickle.dumps(examples))
    assert encoded < pickled < 1.1 * encoded + 6 * 2048, (pickled, encoded)


def test_materialised_prompts_equal_eager_processing(tiny_vl, tmp_path):
    tokenizer, processing = tiny_vl
    rows = _rows(tmp_path)
    for r in rows:
        r.update(data_source="shapes", reward_model={"ground_truth": "1"})
    (tmp_path / "rows.jsonl").write_text("")  # paths are relative to the data file's directory
    examples, stats = build_prompt_examples(list(enumerate(rows, start=1)), tokenizer, 512, True, 0.0,
                                            "data.train_files", source=str(tmp_path / "rows.jsonl"),
                                            images=processing)
    assert stats.kept == 4
    ready = with_pixels(examples)
    for row, example, done in zip(rows, examples, ready):
        decoded = [load_image(item, str(tmp_path)) for item in row["images"]]
        ids, eager = processing.prompt(tokenize_prompt(image_messages(row["prompt"]), tokenizer, True), decoded)
        assert example.prompt_ids == ids == done.prompt_ids
        assert isinstance(done.vision, VisionInputs)
        assert torch.equal(done.vision.pixel_values_PD, eager.pixel_values_PD)
        assert torch.equal(done.vision.image_grid_thw_I3, eager.image_grid_thw_I3)
        assert [im.tobytes() for im in done.vision.images] == [im.tobytes() for im in decoded]
        assert isinstance(example.vision, ImageSources), "the dataset's prompt stays at rest"
    grids = {tuple(g) for e in examples for g in e.vision.image_grid_thw_I3.tolist()}
    assert (1, 8, 8) in grids and (1, 4, 4) in grids, "images clamped to both of the tiny processor's bounds"


def test_with_pixels_processes_each_prompt_once_and_goes_back_to_rest(tiny_vl, tmp_path):
    tokenizer, processing = tiny_vl
    rows = [{"prompt": "<image>=", "images": [photo(84, 84, seed=i)], "data_source": "shapes",
             "reward_model": {"ground_truth": "1"}} for i in range(2)]
    examples, _ = build_prompt_examples(list(enumerate(rows, start=1)), tokenizer, 512, True, 0.0, "k",
                                        images=processing)
    plain = {"prompt": "1+1=", "data_source": "a", "reward_model": {"ground_truth": "2"}}
    text, _ = build_prompt_examples([(1, plain)], tokenizer, 512, True, 0.0, "k", images=processing)
    repeated = [examples[0]] * 3 + [examples[1]] * 3 + text
    ready = with_pixels(repeated)
    assert ready[0] is ready[2] and ready[3] is ready[5] and ready[0] is not ready[3] and ready[6] is text[0]
    assert with_pixels(ready)[0] is ready[0], "already processed: passes as it is"
    back = at_rest(ready)
    assert back[0].vision is examples[0].vision and back[3].vision is examples[1].vision and back[6] is text[0]
    assert back[0] is back[2] and back[0].index == examples[0].index
    # a processed prompt pickles as its sources; the receiving side decodes its own equal copy
    sent = pickle.dumps(ready[:1])
    assert len(sent) < len(pickle.dumps(examples[:1])) + 1024
    (received,) = pickle.loads(sent)
    assert torch.equal(received.vision.pixel_values_PD, ready[0].vision.pixel_values_PD)
    assert pickle.loads(pickle.dumps(processing)) is processing, "the processing pickles as its model directory"


def test_unreadable_images_are_malformed_rows_at_load(tiny_vl, caplog):
    tokenizer, processing = tiny_vl
    rows = [{"prompt": "<image>=", "images": [image], "data_source": "s", "reward_model": {"ground_truth": "1"}}
            for image in (photo(56, 56), b"garbage", photo(800, 2))]
    examples, stats = build_prompt_examples(list(enumerate(rows, start=1)), tokenizer, 512, True, 1.0, "k",
                                            images=processing)
    assert stats.kept == 1 and stats.malformed == 2
    assert "line 2: image unreadable" in caplog.text and "line 3: absolute aspect ratio" in caplog.text


class Recorder:
    """A stand-in engine: one-token replies; keeps the images each call was given."""

    def __init__(self):
        self.visions = []

    def generate(self, prompt_token_ids, sampling, seeds=None, vision=None):
        from spmd_rlhf.rollout.base import Samples

        self.visions.append(vision)
        rows = len(prompt_token_ids) * sampling.n
        return Samples([[14]] * rows, [[-0.5]] * rows, ["stop"] * rows)


class Zero:
    def score(self, sources, texts, truths, extras):
        return [0.0] * len(texts), {}


def test_a_step_processes_its_prompts_once_for_the_engine_batch_and_replay(tiny_vl):
    """Generation decodes a round's prompts once: the engine and the rollout's training batch read the
    same VisionInputs; the dataset keeps its prompts at rest, and so does the replay buffer."""
    from spmd_rlhf.config import Config
    from spmd_rlhf.rollout.generation import Generation
    from spmd_rlhf.rollout.scoring import Scoring
    from spmd_rlhf.trainer.replay import GroupReplayBuffer

    tokenizer, processing = tiny_vl
    rows = [{"prompt": "<image>=", "images": [photo(84 + 28 * i, 56, seed=i)], "data_source": "shapes",
             "reward_model": {"ground_truth": "1"}} for i in range(2)]
    examples, _ = build_prompt_examples(list(enumerate(rows, start=1)), tokenizer, 512, True, 0.0, "k",
                                        images=processing)
    cfg = Config()
    cfg.rollout.n = 2
    engine = Recorder()
    rollout = Generation(cfg, None, engine, None, Scoring(cfg, tokenizer, Zero())).generate(examples, step=0)
    (given,) = engine.visions
    assert all(isinstance(v, VisionInputs) for v in given)
    batch = rollout.batch(pad_id=0)
    assert [id(v) for v in batch.vision] == [id(v) for v in given for _ in range(2)], "the engine's own tensors"
    for v, row in zip(given, rows):
        eager = processing.inputs([load_image(row["images"][0])])
        assert torch.equal(v.pixel_values_PD, eager.pixel_values_PD)
    assert all(isinstance(e.vision, ImageSources) for e in examples)
    rollout.rewards = torch.tensor([0.0, 1.0, 1.0, 0.0])
    buffer = GroupReplayBuffer(capacity=4, min_reward=1.0, seed=0)
    assert buffer.add(rollout) == 2
    assert all(isinstance(e.vision, ImageSources) for g in buffer.groups for e in g.examples)
    mixed, replaced = buffer.mix(rollout, 0.5, filtered=[])
    assert replaced == 1 and all(isinstance(e.vision, VisionInputs) for e in mixed.examples)
    pixels = {e.index: v.pixel_values_PD for e, v in zip(examples, given)}
    for e, v in zip(mixed.examples, mixed.batch(0).vision):  # a replayed group's images, processed again
        assert torch.equal(v.pixel_values_PD, pixels[e.index])


def test_replayed_images_checkpoint_as_plain_values(tiny_vl, tmp_path):
    """The replay buffer's state holds a group's images at rest as plain values (``weights_only``
    loads them) and restores them to the same pixels."""
    from spmd_rlhf.rollout.base import Samples
    from spmd_rlhf.rollout.groups import Rollout
    from spmd_rlhf.trainer.replay import GroupReplayBuffer

    tokenizer, processing = tiny_vl
    rows = [{"prompt": "<image>=", "images": [photo(84, 56, seed=7)], "data_source": "shapes",
             "reward_model": {"ground_truth": "1"}}]
    examples, _ = build_prompt_examples(list(enumerate(rows, start=1)), tokenizer, 512, True, 0.0, "k",
                                        images=processing)
    ready = with_pixels(examples) * 2
    rollout = Rollout(ready, Samples([[14], [15]], [[-0.1], [-0.2]], ["stop"] * 2), 2, torch.tensor([0.0, 1.0]))
    buffer = GroupReplayBuffer(capacity=2, min_reward=1.0, seed=0)
    assert buffer.add(rollout) == 1
    torch.save(buffer.state_dict(), tmp_path / "replay.pt")
    restored = GroupReplayBuffer(capacity=2, min_reward=1.0, seed=0)
    restored.load_state_dict(torch.load(tmp_path / "replay.pt", weights_only=True))
    (group,) = restored.groups
    assert isinstance(group.examples[0].vision, ImageSources) and group.examples[0].prompt_ids == ready[0].prompt_ids
    (back,) = with_pixels(group.examples[:1])
    assert torch.equal(back.vision.pixel_values_PD, ready[0].vision.pixel_values_PD)
