"""Colocated vLLM on a CUDA GPU: sync correctness through sleep/wake (marker ``gpu``).

The known failure this guards against: after an update, sync and wake, rollouts silently come
from stale weights. Skips where there is no GPU or no vLLM.
"""

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
    out = tmp_path_factory.mktemp("colocate") / "report.json"
    torchrun(["tests/gpu/workers/colocate_worker.py", str(out)], nproc=1, timeout=600)
    return json.loads(out.read_text())


BF16_MEAN, BF16_MAX = 0.02, 0.15  # |logprob| gaps from bf16 engine vs fp32 actor


def test_engine_logprobs_follow_the_actor_after_update_sync_wake(report):
    mean, worst = report["gap_after_update"]
    assert mean < BF16_MEAN and worst < BF16_MAX, report
    mean0, _ = report["gap_before_update"]
    assert mean0 < BF16_MEAN, report
    stale_mean, _ = report["stale_gap"]
    assert stale_mean > 10 * BF16_MEAN, "the update must move the policy far enough to expose stale weights"
    assert report["weight_version"] == 2


def test_dtensor_and_full_sync_give_bit_identical_weights(report):
    assert report["paths_identical"] and report["num_params"] > 10


def test_sleep_level_2_generates_what_level_1_generates(report):
    assert report["level2_equals_level1"], report
    assert report["level2_logprob_max_diff"] < 1e-3
    free_awake, free_asleep = report["free_gib_awake_vs_asleep"]
    assert free_asleep > free_awake, "sleep must free memory"


def test_actor_offload_frees_memory_and_restores_weights(report):
    assert report["offload_freed_mib"] > 1.0, report
    assert report["offload_tokens_equal"] and report["offload_weights_restored"], report
