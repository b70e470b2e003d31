"""LoRA under split placement: the generation rank's engine gets exactly the merged weights (PEFT's
``merge_and_unload``, 1e-6) through ``CrossWeightSync``, each FSDP block merged as its bucket goes
out, after every push (3 gloo ranks: 2 training, 1 generating; ``workers/lora_split_worker.py``)."""

from __future__ import annotations

import json

import pytest

from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "lora_split_worker.py"
CASES = [f"{arch}/push{push}" for arch in ("llama", "qwen2") for push in (0, 1)]

pytestmark = pytest.mark.slow


def test_split_generation_rank_gets_the_merged_weights(tmp_path):
    out = tmp_path / "passed"
    torchrun([str(WORKER), str(out)], 3, timeout=300)
    for rank in range(3):
        passed = json.loads((tmp_path / f"passed.rank{rank}.json").read_text())
        assert passed == CASES, (rank, passed)
