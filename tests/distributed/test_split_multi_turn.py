"""Multi-turn tool use under split placement: recipe=tiny_arithmetic_tools on 3 real gloo ranks
(2 training + 1 generation, TorchEngine) at ``trainer.max_staleness=0`` trains on what a 2-rank
colocated run trains on: the same turns (tokens, engine logprobs, loss masks with the tool messages
masked out), the same tool metrics and held-out results through the tools, and the same weights
after two steps (up to the order of the gradient sums)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.test_split_placement import ATOL, MOVED, RTOL, SPLIT, samples_of, step_records
from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "split_placement_worker.py"
# 8 prompts x 8 samples, 2 steps; 1-digit additions and an exact teacher, so that after the warm
# start a share of the samples call the calculator and groups' rewards differ (the updates have
# advantages to follow); 32 held-out prompts sampled (not greedy), so that some of them call it too
TOOLS = ["recipe=tiny_arithmetic_tools", "data.arithmetic.digits=1", "data.arithmetic.carry_drop_prob=0",
         "trainer.total_steps=2", "trainer.batch_size=8",
         "trainer.mini_batch_size=4", "rollout.n=8", "trainer.sft.steps=200", "data.arithmetic.num_val=32",
         "rollout.val_temperature=1.0", "logging.progress_bar=false", "logging.console=false",
         "distributed.timeout_s=120"]
TOOL_KEYS = ("rollout/turns", "rollout/tool_calls", "rollout/tool_errors", "rollout/tool_timeouts")

pytestmark = pytest.mark.slow


def launch(tmp_path, name: str, nproc: int, overrides: list[str]) -> dict:
    out = tmp_path / name
    torchrun([str(WORKER), str(out), *TOOLS, *overrides], nproc, timeout=600)
    ranks = [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(2)]
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"ranks": ranks, "metrics": metrics}


def masks_of(run: dict, step: int) -> dict[int, list]:
    """Prompt index -> its samples' loss masks, over both training ranks."""
    out: dict[int, list] = {}
    for rank in run["ranks"]:
        for index, mask in rank["masks"][step]:
            out.setdefault(index, []).append(mask)
    return out


def test_split_multi_turn_at_k0_matches_colocated(tmp_path):
    colocated = launch(tmp_path, "colocated", 2, [])
    split = launch(tmp_path, "split", 3, SPLIT)

    inserted = 0
    for step in (0, 1):
        want, got = samples_of(colocated, step), samples_of(split, step)
        want_masks, got_masks = masks_of(colocated, step), masks_of(split, step)
        assert sorted(got) == sorted(want) and len(want) == 8
        for index in want:
            assert [t for t, _ in got[index]] == [t for t, _ in want[index]], f"step {step}, prompt {index}"
            assert got_masks[index] == want_masks[index], f"step {step}, prompt {index}: loss masks differ"
            for (tokens, lp_got), (_, lp_want), mask in zip(got[index], want[index], got_masks[index]):
                torch.testing.assert_close(torch.tensor(lp_got), torch.tensor(lp_want), rtol=1e-5, atol=1e-5)
                assert mask is not None and len(mask) == len(tokens)
                assert all(lp == 0.0 for lp, m in zip(lp_got, mask) if m == 0), "inserted tokens have logprob 0"
                inserted += mask.count(0)
    assert inserted > 0, "no tool message reached the training ranks: nothing masked was compared"

    moved = 0.0
    for name, w in colocated["ranks"][0]["weights"].items():
        torch.testing.assert_close(split["ranks"][0]["weights"][name], w, rtol=RTOL, atol=ATOL, msg=name)
        assert torch.equal(split["ranks"][1]["weights"][name], split["ranks"][0]["weights"][name]), name
        moved = max(moved, float((w - colocated["ranks"][0]["initial"][name]).abs().max()))
    assert moved > MOVED, f"the steps moved no weight by more than {moved}: nothing was compared"

    records, want_records = step_records(split), step_records(colocated)
    assert len(records) == len(want_records) == 2
    mixed = 1.0 - records[0]["rollout/solve_none_groups"] - records[0]["rollout/solve_all_groups"]
    assert mixed > 0.0, "some groups' rewards differ: the update follows advantages"
    for record, want_record in zip(records, want_records):
        assert record["rollout/tool_calls"] > 0 and 1.0 < record["rollout/turns"] <= 2.0
        for key in (*TOOL_KEYS, "rollout/reward", "actor/pg_loss"):
            assert record[key] == pytest.approx(want_record[key], rel=1e-5, abs=1e-6), key

    evals = [r for r in split["metrics"] if "eval/turns" in r]
    want_evals = [r for r in colocated["metrics"] if "eval/turns" in r]
    assert [r["step"] for r in evals] == [r["step"] for r in want_evals] == [0, 2]
    assert evals[0]["eval/turns"] > 1.0, "the held-out answers went through the tools"
    for key in ("eval/turns", "eval/accuracy", "eval/examples"):
        assert evals[0][key] == want_evals[0][key], key
