"""TorchEngine with a vision-language policy: batched, left-padded generation with images gives a
plain HF model's greedy continuation of each prompt alone, with its log-probabilities (HF computing
its own M-RoPE positions and image embeddings, unpadded, without a cache)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoConfig, AutoModelForImageTextToText

from spmd_rlhf.data.vision import load_image_processing
from spmd_rlhf.rollout.base import SamplingConfig
from spmd_rlhf.rollout.torch_engine import TorchEngine
from tests.launch import REPO_ROOT

_spec = importlib.util.spec_from_file_location("make_tiny_model", REPO_ROOT / "tools" / "make_tiny_model.py")
make_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tiny)

START, END, PAD_IMAGE, EOS, PAD = 15, 16, 17, 1, 0
BANNED = torch.zeros(19, dtype=torch.bool)
BANNED[[17, 18]] = True  # <|image_pad|>, <|video_pad|>


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vl") / "tiny")
    make_tiny.make_tiny_model("qwen2_5_vl", out)
    config = AutoConfig.from_pretrained(out)
    # a tied random head copies the last token: untie it (a fresh random head) and sharpen it so that
    # greedy continuations differ by prompt
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(out, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    return config, model, load_image_processing(out, config.image_token_id, config.vision_config.spatial_merge_size)


def prompts(processing) -> tuple[list[list[int]], list]:
    """Prompts of different lengths: one 56-pixel image, one 84-pixel image mid-text, two images, text only."""
    rng = torch.Generator().manual_seed(0)
    image = lambda size: Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=rng,  # noqa: E731
                                                       dtype=torch.uint8).numpy())
    rows = [([START, PAD_IMAGE, END, 13], [image(56)]),
            ([5, 6, START, PAD_IMAGE, END, 7, 8, 13], [image(84)]),
            ([START, PAD_IMAGE, END, 9, START, PAD_IMAGE, END, 13], [image(56), image(84)]),
            ([4, 5, 12, 6, 7, 13], None)]
    ids, visions = [], []
    for tokens, images in rows:
        expanded, vision = processing.prompt(tokens, images) if images else (tokens, None)
        ids.append(expanded)
        visions.append(vision)
    return ids, visions


def hf_greedy(model, ids: list[int], vision, steps: int) -> tuple[list[int], list[float]]:
    """Greedy continuation by full forwards of the prompt alone, and its logprobs (of the unmasked
    distribution), never an image or video placeholder. HF computes the M-RoPE positions itself from
    the processor's ``mm_token_type_ids`` (1 at image tokens)."""
    tokens: list[int] = []
    logprobs: list[float] = []
    pixels = {} if vision is None else {"pixel_values": vision.pixel_values_PD,
                                        "image_grid_thw": vision.image_grid_thw_I3}
    for _ in range(steps):
        ids_1L = torch.tensor([ids + tokens])
        types = {} if vision is None else {"mm_token_type_ids": (ids_1L == PAD_IMAGE).int()}
        with torch.no_grad():
            logits_V = model(input_ids=ids_1L, **pixels, **types).logits[0, -1].float()
        token = int(logits_V.masked_fill(BANNED, float("-inf")).argmax())  # the engine never picks a placeholder
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits_V, -1)[token]))
        if token == EOS:
            break
    return tokens, logprobs


def test_greedy_with_images_matches_hf(world_of_one, tiny_vl):
    config, model, processing = tiny_vl
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("gen_dp", "tp"))
    engine = TorchEngine(config, mesh, torch.device("cpu"), torch.float32, [EOS], PAD, max_batch_size=3)
    engine.load_weights([list(model.named_parameters())])
    ids, visions = prompts(processing)
    out = engine.generate(ids, SamplingConfig(max_new_tokens=6, n=2, temperature=0.0), vision=visions)
    assert len(out) == 8  # two samples per prompt, chunks of 3 rows straddle prompts
    distinct = set()
    for i, (prompt, vision) in enumerate(zip(ids, visions)):
        tokens, logprobs = hf_greedy(model, prompt, vision, 6)
        distinct.add(tuple(tokens))
        for j in (2 * i, 2 * i + 1):
            assert out.token_ids[j] == tokens, i
            assert torch.allclose(torch.tensor(out.logprobs[j]), torch.tensor(logprobs), atol=1e-5, rtol=0), i
    assert len(distinct) > 1, "the prompts' continuations should differ for the check to see the images"


def test_images_change_the_continuation(world_of_one, tiny_vl):
    """The pixels reach the model: the same prompt with another image continues differently."""
    config, model, processing = tiny_vl
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("gen_dp", "tp"))
    engine = TorchEngine(config, mesh, torch.device("cpu"), torch.float32, [EOS], PAD)
    engine.load_weights([list(model.named_parameters())])
    black, white = Image.new("RGB", (56, 56), (0, 0, 0)), Image.new("RGB", (56, 56), (255, 255, 255))
    (ids, dark), (_, light) = (processing.prompt([START, PAD_IMAGE, END, 13], [im]) for im in (black, white))
    sampling = SamplingConfig(max_new_tokens=4, temperature=0.0)
    a, b = engine.generate([ids, ids], sampling, vision=[dark, light]), engine.generate([ids], sampling, vision=[dark])
    assert a.logprobs[0] == pytest.approx(b.logprobs[0], abs=1e-5)
    assert a.logprobs[0][0] != pytest.approx(a.logprobs[1][0], abs=1e-3)


def test_placeholders_are_never_sampled(world_of_one, tiny_vl):
    """A policy whose head favours the image placeholder still never generates it."""
    config, model, processing = tiny_vl
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("gen_dp", "tp"))
    engine = TorchEngine(config, mesh, torch.device("cpu"), torch.float32, [EOS], PAD)
    ids, visions = prompts(processing)
    hidden = []
    for prompt, vision in zip(ids, visions):
        pixels = {} if vision is None else {"pixel_values": vision.pixel_values_PD,
                                            "image_grid_thw": vision.image_grid_thw_I3,
                                            "mm_token_type_ids": (torch.tensor([prompt]) == PAD_IMAGE).int()}
        with torch.no_grad():
            hidden.append(model.model(input_ids=torch.tensor([prompt]), **pixels).last_hidden_state[0, -1])
    direction = torch.stack(hidden).mean(0)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    params["lm_head.weight"][PAD_IMAGE] = 100 * direction / direction.norm()
    favoured = [int((h @ params["lm_head.weight"].T).argmax()) == PAD_IMAGE for h in hidden]
    assert sum(favoured) >= 2, "the placeholder should be the unmasked argmax for the check to mean anything"
    engine.load_weights([list(params.items())])
    for sampling in (SamplingConfig(max_new_tokens=4, temperature=0.0), SamplingConfig(max_new_tokens=4, n=4, seed=1)):
        out = engine.generate(ids, sampling, vision=visions)
        assert all(t not in (PAD_IMAGE, 18) for row in out.token_ids for t in row)
