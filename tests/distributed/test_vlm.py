"""The tiny Qwen2.5-VL under FSDP2 on 1 and 2 gloo ranks (``workers/vl_worker.py``): log-probs of
rows with images equal plain HF forwards (and the reference copy's), a text-only micro-batch on one
rank beside an image one on the other does not hang, and one update lands on the same weights on
1 and 2 ranks, the frozen vision tower untouched."""

from __future__ import annotations

import pytest
import torch

from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "vl_worker.py"
CHECKS = ["logprobs", "reference", "update"]

pytestmark = pytest.mark.slow


def run(tmp_path, nproc: int, *args: str) -> dict:
    path = tmp_path / f"world{nproc}{''.join(args)}.pt"
    torchrun([str(WORKER), str(path), *args], nproc, timeout=240)
    result = torch.load(path)
    assert result["world"] == nproc and result["passed"] == CHECKS
    return result


def test_vision_language_policy_is_the_same_on_one_and_two_ranks(tmp_path):
    one, two = run(tmp_path, 1), run(tmp_path, 2)
    torch.testing.assert_close(two["logprobs"], one["logprobs"], rtol=0, atol=1e-5)
    assert one["logprobs"].abs().sum() > 0
    for name, weight in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
        if name.startswith("model.visual."):
            assert torch.equal(two["weights"][name], two["initial"][name]), name
    moved = max((two["weights"][n] - two["initial"][n]).abs().max() for n in two["weights"] if ".layers." in n)
    assert moved > 1e-4, "the language model moves"
    assert abs(one["metrics"]["actor/pg_loss"] - two["metrics"]["actor/pg_loss"]) <= 1e-5


def test_a_trained_vision_tower_lands_on_the_same_weights_on_one_and_two_ranks(tmp_path):
    """model.vision.freeze_vision_tower=false: the tower's gradients reduce in step on both ranks,
    also where one rank's micro-batch has no image."""
    one, two = run(tmp_path, 1, "unfrozen"), run(tmp_path, 2, "unfrozen")
    visual = [n for n in one["weights"] if n.startswith("model.visual.")]
    for name, weight in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert sum(not torch.equal(two["weights"][n], two["initial"][n]) for n in visual) > len(visual) // 2


def test_vision_language_tensor_parallel_layout_and_forward(tmp_path):
    """tp = 2: the language model split as the weight sync slices it, the tower whole, logits exact."""
    out = tmp_path / "tp.txt"
    torchrun([str(REPO_ROOT / "tests" / "distributed" / "workers" / "vl_tp_worker.py"), str(out)], 2, timeout=240)
    assert out.read_text() == "ok"
