"""Ulysses sequence parallel on gloo: sp=2 gives the log-probs, losses and gradients of sp=1.

The worker runs the actor's log-prob pass and one update (plain SGD at lr 1: the weight change
is minus the gradient) on packed micro-batches of a tiny Qwen2 policy; at 2 ranks the two form one
sequence-parallel group, each holding half the rows and half of every packed row's tokens. Then
the real program: ``distributed.sp=2`` with packing, under torchrun, colocated and split, exits 0
and logs its steps.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "ulysses_worker.py"
TOL = 1e-5
METRICS = ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/ppo_kl", "actor/pg_clipfrac")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out, cache = tmp_path_factory.mktemp("ulysses"), {}

    def launch(nproc: int, variant: str = "plain") -> dict:
        if (nproc, variant) not in cache:
            path = out / f"{nproc}_{variant}.pt"
            torchrun([str(WORKER), str(path), variant], nproc=nproc, timeout=240)
            cache[nproc, variant] = torch.load(path)
        return cache[nproc, variant]

    return launch


def _assert_same_update(one: dict, two: dict) -> None:
    width = one["logprobs"][0].shape[1]
    logprobs_sp2 = torch.cat([F.pad(part, (0, width - part.shape[1])) for part in two["logprobs"]])
    torch.testing.assert_close(logprobs_sp2, one["logprobs"][0], rtol=0, atol=TOL)
    assert one["logprobs"][0].abs().max() > 1.0  # real log-probs, not zeros
    moved = 0.0
    for name, before in one["before"].items():
        torch.testing.assert_close(two["before"][name], before, rtol=0, atol=0)
        grad_sp1, grad_sp2 = before - one["after"][name], two["before"][name] - two["after"][name]
        torch.testing.assert_close(grad_sp2, grad_sp1, rtol=0, atol=TOL, msg=name)
        moved = max(moved, float(grad_sp1.abs().max()))
    assert moved > 100 * TOL, "the update must move the weights far beyond the tolerance"
    for key in METRICS:
        assert math.isclose(two["metrics"][key], one["metrics"][key], rel_tol=TOL, abs_tol=TOL), key
    assert one["metrics"]["actor/pg_clipfrac"] > 0  # ratios away from 1: the clip acts


def test_sp2_equals_sp1(run):
    one, two = run(1), run(2)
    _assert_same_update(one, two)
    # each sp rank's MLP saw half of every packed row (rows padded to an even length)
    assert len(two["mlp_tokens"]) == len(one["mlp_tokens"]) >= 4
    assert two["mlp_tokens"] == [math.ceil(n / 2) for n in one["mlp_tokens"]]


def test_sp2_with_activation_checkpointing_equals_sp1(run):
    _assert_same_update(run(1), run(2, "ac"))


# colocated on 2 ranks; split: ranks 0-1 train (one sp group), rank 2 generates
LAYOUTS = {"colocate": (2, []), "split": (3, ["distributed.placement=split", "distributed.generation_ranks=1"])}


@pytest.mark.parametrize("placement", sorted(LAYOUTS))
def test_train_sp2_end_to_end(tmp_path, placement):
    nproc, layout = LAYOUTS[placement]
    proc = torchrun(["-m", "spmd_rlhf.train", "distributed.sp=2", *layout, "trainer.total_steps=2",
                     "trainer.max_tokens_per_micro_batch=256", "trainer.sft.steps=0", "trainer.eval_before=false",
                     "trainer.eval_after=false", "algorithm.entropy_coef=0.01", f"hydra.run.dir={tmp_path}"],
                    nproc=nproc, timeout=240)
    assert proc.returncode == 0
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    updates = [s for s in steps if "actor/pg_loss" in s]
    assert [s["step"] for s in updates] == [1, 2]
    # no warm start: rewards are all 0, so the entropy bonus is what moves the weights
    assert all(math.isfinite(s["actor/grad_norm"]) and s["actor/grad_norm"] > 0 for s in updates)
