"""Split placement on 3 real gloo ranks (2 training + 1 generation, TorchEngine) against a 2-rank
colocated run of the same config: at ``trainer.max_staleness=0`` a step's samples are the same
(each prompt's samples draw from per-prompt streams, whichever rank generates them) and so are the
weights after it (up to the order of the gradient sums: the groups sit on other training ranks).
At ``max_staleness=1`` the generation rank runs one batch ahead: every batch after the first is one
policy version old, and a run resumed from a checkpoint with a batch in flight ends bit-identical.
A training rank that raises ends the job, generation rank included, long before the timeout.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.integration import reward_raises_on_rank1
from tests.integration.jobs import Job, logged_steps, records
from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "split_placement_worker.py"
SPLIT = ["distributed.placement=split", "distributed.generation_ranks=1"]
# 8 prompts x 8 samples, 2 mini-batches (2 optimizer steps a step); a warm start long enough that
# rewards differ within groups (non-zero advantages); 16 held-out prompts
COMMON = ["trainer.batch_size=8", "trainer.mini_batch_size=4", "rollout.n=8", "trainer.sft.steps=150",
          "trainer.sft.batch_size=16", "data.arithmetic.num_val=16", "logging.progress_bar=false",
          "logging.console=false", "distributed.timeout_s=120"]
RTOL, ATOL = 1e-5, 1e-6  # as tests/distributed/test_grpo_step_equivalence.py (lr here is 3e-4)
MOVED = 1e-4  # the step moves some weight by at least this much (100x the tolerance)

pytestmark = pytest.mark.slow


def launch(tmp_path, name: str, nproc: int, overrides: list[str]) -> dict:
    out = tmp_path / name
    proc = torchrun([str(WORKER), str(out), *COMMON, *overrides], nproc, timeout=600)
    assert "outlived shutdown" not in proc.stdout + proc.stderr, "every rank ends its process groups"
    ranks = [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(2)]
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"ranks": ranks, "metrics": metrics}


def samples_of(run: dict, step: int) -> dict[int, list]:
    """Prompt index -> its samples (token ids, logprobs), over both training ranks."""
    out: dict[int, list] = {}
    for rank in run["ranks"]:
        for index, tokens, logprobs in rank["samples"][step]:
            out.setdefault(index, []).append((tokens, logprobs))
    return out


def step_records(run: dict) -> list[dict]:
    return [r for r in run["metrics"] if "rollout/reward" in r]


def test_split_at_k0_matches_colocated(tmp_path):
    colocated = launch(tmp_path, "colocated", 2, ["trainer.total_steps=1"])
    split = launch(tmp_path, "split", 3, ["trainer.total_steps=1", *SPLIT])

    want, got = samples_of(colocated, 0), samples_of(split, 0)
    assert sorted(got) == sorted(want) and len(want) == 8
    for index in want:
        assert len(got[index]) == len(want[index]) == 8
        assert [t for t, _ in got[index]] == [t for t, _ in want[index]], f"prompt {index}: samples differ"
        for (_, lp_got), (_, lp_want) in zip(got[index], want[index]):
            torch.testing.assert_close(torch.tensor(lp_got), torch.tensor(lp_want), rtol=1e-5, atol=1e-5)

    moved = 0.0
    for name, w in colocated["ranks"][0]["weights"].items():
        torch.testing.assert_close(split["ranks"][0]["initial"][name], colocated["ranks"][0]["initial"][name],
                                   rtol=0, atol=0, msg=f"{name}: the same warm start")
        torch.testing.assert_close(split["ranks"][0]["weights"][name], w, rtol=RTOL, atol=ATOL, msg=name)
        torch.testing.assert_close(split["ranks"][1]["weights"][name], w, rtol=0, atol=0, msg=name)
        moved = max(moved, float((w - colocated["ranks"][0]["initial"][name]).abs().max()))
    assert moved > MOVED, f"the step moved no weight by more than {moved}: nothing was compared"

    before = [r for r in colocated["metrics"] if "eval/accuracy" in r]
    split_before = [r for r in split["metrics"] if "eval/accuracy" in r]
    assert [r["step"] for r in split_before] == [r["step"] for r in before] == [0, 1]
    assert split_before[0]["eval/accuracy"] == before[0]["eval/accuracy"], "the same greedy answers at step 0"
    assert split_before[0]["eval/examples"] == 16.0

    (record,) = step_records(split)
    assert 0.0 < record["rollout/reward"] < 1.0, "rewards differ: the update has advantages to follow"
    assert record["rollout/staleness"] == 0.0
    assert record["perf/reshard_bytes_per_rank"] > 0 and record["timing/reshard"] > 0
    (want_record,) = step_records(colocated)
    for key in ("rollout/reward", "rollout/response_length", "actor/pg_loss"):
        assert record[key] == pytest.approx(want_record[key], rel=1e-5, abs=1e-6), key


STALE = [*SPLIT, "trainer.max_staleness=1", "algorithm.tis_cap=2.0", "trainer.total_steps=4",
         "trainer.save_every=2", "trainer.val_every=2"]


def test_one_step_ahead_and_resume_with_a_batch_in_flight(tmp_path):
    straight = launch(tmp_path, "straight", 3, [*STALE, f"trainer.checkpoint_dir={tmp_path / 'ckpt'}"])
    steps = step_records(straight)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["rollout/staleness"] for r in steps] == [0.0, 1.0, 1.0, 1.0], "batch i+1 generated during update i"
    assert all(r["rollout/logprob_diff"] > 0 for r in steps[1:]), "stale batches: the actor moved since"
    assert all("rollout/tis_weight" in r for r in steps)
    evals = [r["step"] for r in straight["metrics"] if "eval/accuracy" in r]
    assert evals == [0, 2, 4]

    resumed = launch(tmp_path, "resumed", 3, [*STALE, f"trainer.checkpoint_dir={tmp_path / 'ckpt_resumed'}",
                                              f"trainer.resume={tmp_path / 'ckpt' / 'step_00000002'}"])
    assert resumed["ranks"][0]["resumed_at"] == 2
    assert sorted(resumed["ranks"][0]["samples"]) == [2, 3], "the in-flight batch 2 came from the checkpoint"
    for rank in range(2):
        for step in (2, 3):
            assert resumed["ranks"][rank]["samples"][step] == straight["ranks"][rank]["samples"][step], (rank, step)
        for name, w in straight["ranks"][rank]["weights"].items():
            assert torch.equal(resumed["ranks"][rank]["weights"][name], w), f"rank {rank}: {name}"
    later = [r for r in straight["metrics"] if r["step"] > 2]
    again = resumed["metrics"]
    assert len(later) == len(again) > 0
    for want, got in zip(later, again):
        keys = {k for k in want if not k.startswith(("timing/", "perf/")) and k != "time"}
        assert keys == {k for k in got if not k.startswith(("timing/", "perf/")) and k != "time"}
        assert {k: got[k] for k in keys} == {k: want[k] for k in keys}, f"step {want['step']}"


def test_a_training_rank_that_raises_stops_the_generation_rank_too(tmp_path):
    """Rank 1's reward function raises in step 3 (split: it scores 128 responses a step and no
    held-out ones); the generation rank is then generating or waiting for weights. The job ends
    with the message, far sooner than the collective timeout."""
    run_dir, timeout_s = tmp_path / "run", 600
    reward = f"{Path(reward_raises_on_rank1.__file__)}:reward"
    job = Job(["trainer.sft.steps=100", "data.arithmetic.num_val=32", "logging.progress_bar=false", *SPLIT,
               f"hydra.run.dir={run_dir}", "trainer.total_steps=20", f"reward.custom_function={reward}",
               "reward.sandbox.custom_function=false",  # its call count is per process
               f"distributed.timeout_s={timeout_s}"], 3, tmp_path / "job.log")
    rc = job.wait(300)
    ended = time.time()
    out = job.output()
    assert rc != 0, out[-6000:]
    assert logged_steps(run_dir) == [1, 2], "rank 1 raises in step 3 (its 300th reward call)"
    assert ended - records(run_dir)[-1]["time"] < timeout_s / 2, "the job waited for the collective timeout"
    assert out.count(reward_raises_on_rank1.MESSAGE) == 1, out[-6000:]
