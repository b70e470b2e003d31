"""LoRA's merged weight sync gives the engine what a full sync of the merged model gives it.

Two ranks on gloo (``workers/lora_sync_worker.py``): tiny Llama and Qwen2 models with random
adapters; the truth is PEFT's ``merge_and_unload``. The reshard stream (tp = 2 and tp = 1) into
a ``TorchEngine``, and the whole-tensor stream, carry the base model's names and the merged
tensors (1e-6); the actor with its adapters disabled computes the base model's logits.
"""

from __future__ import annotations

import json

import pytest

from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "lora_sync_worker.py"
CASES = [f"{arch}/{case}" for arch in ("llama", "qwen2")
         for case in ("tp2/sync", "tp1/sync", "full_stream", "reference")]

pytestmark = pytest.mark.slow


def test_merged_sync_equals_full_sync_of_merged_model(tmp_path):
    out = tmp_path / "passed"
    torchrun([str(WORKER), str(out)], 2, timeout=300)
    for rank in range(2):
        passed = json.loads((tmp_path / f"passed.rank{rank}.json").read_text())
        assert sorted(passed) == sorted(CASES), (rank, passed)
