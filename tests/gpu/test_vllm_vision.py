"""vLLM with a vision-language policy on a CUDA GPU (marker ``gpu``): greedy tokens and logprobs equal
the TorchEngine's on prompts with zero, one and two images (fp32 both), through the full weight sync.
Skips where there is no GPU, no vLLM or no torchvision (vLLM's Qwen2-VL imports it)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.launch import torchrun

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("vllm")
    pytest.importorskip("torchvision")
    root = tmp_path_factory.mktemp("vision")
    torchrun(["tests/gpu/workers/vllm_vision_worker.py", str(root / "report.json"), str(root / "tiny_vl")],
             nproc=1, timeout=600)
    return json.loads((root / "report.json").read_text())


def test_vllm_generates_with_images_as_the_torch_engine(report):
    assert report["tokens_equal"], report
    assert report["max_logprob_gap"] < 1e-3, report
    assert report["no_placeholder_generated"] and report["sampled_rows"] == 16, report
