"""One GRPO step gives the same weights on 1, 2 and 4 ranks, for every loss aggregation.

(``seq-mean-token-sum-norm``, Dr. GRPO's, divides by rollout.max_new_tokens instead of the
response count; with gradient clipping active it ends elsewhere than seq-mean-token-sum.)

The worker runs the real ``Trainer`` (``generate`` with a stub engine, ``targets``, ``update``)
on a fixed rollout with unequal lengths, 2 mini-batches and gradient accumulation, with the k3
KL loss against a frozen reference. Losses are normalised by global counts, so the weights may
differ only by float summation order (fp32 on CPU). The step must also move the weights far
beyond that tolerance, and the three loss modes must disagree with each other.

AdamW all but ignores a constant scale of the gradient, so the rank-reduced grad norm and losses
are compared too: they catch a missing or doubled data-parallel scale that the weights would not
show. For the same reason token-mean and seq-mean-token-sum (the same loss within a mini-batch,
divided by a different constant) differ only through how the two mini-batches weigh against each
other and through gradient clipping: less than the other pairs, still far beyond the tolerance.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "grpo_step_worker.py"
MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RTOL, ATOL = 1e-5, 1e-6
MOVED = 1e-4  # a step moves some weight by at least this much (100x the tolerance; lr is 1e-3)
DIFFERENT = 1e-5  # two loss modes end at least this far apart (10x the tolerance)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_world(tmp_path_factory):
    """Launch the worker once per world size (on first use) and load rank 0's results."""
    out = tmp_path_factory.mktemp("grpo_step")
    cache: dict[int, dict] = {}

    def get(nproc: int) -> dict:
        if nproc not in cache:
            path = out / f"world{nproc}.pt"
            torchrun([str(WORKER), str(path)], nproc, timeout=240)
            cache[nproc] = torch.load(path)
            assert cache[nproc]["world"] == nproc
        return cache[nproc]

    return get


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_step_trains_and_modes_differ(run_world):
    modes = run_world(1)["modes"]
    assert tuple(modes)[: len(MODES)] == MODES
    for mode in MODES:
        result = modes[mode]
        assert result["optimizer_steps"] == 2, mode
        assert max_diff(result["final"], result["initial"]) > MOVED, mode
        assert result["metrics"]["actor/kl_loss"] > 0, mode
        assert result["metrics"]["actor/grad_norm"] > 0, mode
    for a, b in itertools.combinations(MODES, 2):
        assert max_diff(modes[a]["final"], modes[b]["final"]) > DIFFERENT, (a, b)


VARIANTS = ("ppo", "gspo", "rloo", "reinforce_pp")
# Batch whitening adds all-reduced moments: a different summation order on 4 ranks. Adam's first
# step is about lr * g / |g|, so a weight whose gradient is float noise away from zero moves by a
# summation-order-dependent fraction of lr (seen: 3e-6 on 1 of 1024 elements). 1% of lr (1e-3)
# still catches a missing global reduction, which moves most weights by ~lr.
VARIANT_ATOL = 1e-5


@pytest.mark.parametrize("nproc", [2, 4])
def test_variants_match_world_one(run_world, nproc):
    """PPO with a critic (GAE, batch whitening, KL in the reward), GSPO, RLOO and REINFORCE++:
    the same weights (actor and critic) on 1 and ``nproc`` ranks, and the step moved them."""
    want, got = run_world(1)["modes"], run_world(nproc)["modes"]
    for name in VARIANTS:
        assert max_diff(want[name]["final"], want[name]["initial"]) > MOVED, name
        torch.testing.assert_close(got[name]["final"], want[name]["final"], rtol=RTOL, atol=VARIANT_ATOL,
                                   msg=lambda m, name=name: f"{name}, world {nproc} vs 1: {m}")
        torch.testing.assert_close(got[name]["critic_final"], want[name]["critic_final"], rtol=RTOL,
                                   atol=VARIANT_ATOL)
        for key, value in want[name]["metrics"].items():
            assert got[name]["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
    assert want["ppo"]["critic_final"], "the ppo variant trains a critic"


@pytest.mark.parametrize("nproc", [2, 4])
def test_weights_match_world_one(run_world, nproc):
    want, got = run_world(1)["modes"], run_world(nproc)["modes"]
    for mode in MODES:
        torch.testing.assert_close(got[mode]["initial"], want[mode]["initial"], rtol=0, atol=0, msg=f"{mode}: init")
        torch.testing.assert_close(got[mode]["final"], want[mode]["final"], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, mode=mode: f"{mode}, world {nproc} vs 1: {m}")
        assert got[mode]["optimizer_steps"] == 2
        for key, value in want[mode]["metrics"].items():
            assert got[mode]["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (mode, key)


FAST_PATHS = ("packed", "on_policy", "on_policy_packed")


@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_fast_paths_compute_the_slow_paths_step(run_world, nproc):
    """Packed micro-batches give the padded step's weights and metrics; the on-policy update
    (old logprobs = its own, TIS inside the update) gives the two-pass step's; on every world
    size, and the same as world 1."""
    want, got = run_world(1)["modes"], run_world(nproc)["modes"]
    slow = {"packed": "token-mean", "on_policy": "on_policy_two_pass", "on_policy_packed": "on_policy_two_pass"}
    for name in FAST_PATHS:
        reference = got[slow[name]]
        assert max_diff(got[name]["final"], got[name]["initial"]) > MOVED, name
        torch.testing.assert_close(got[name]["final"], reference["final"], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{name} vs {slow[name]}, world {nproc}: {m}")
        torch.testing.assert_close(got[name]["final"], want[name]["final"], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{name}, world {nproc} vs 1: {m}")
        assert got[name]["optimizer_steps"] == reference["optimizer_steps"]
        for key, value in reference["metrics"].items():
            assert got[name]["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
    assert got["on_policy"]["optimizer_steps"] == 1 and got["packed"]["optimizer_steps"] == 2
    assert got["on_policy"]["metrics"]["rollout/logprob_diff"] > 0.1  # the engine's logprobs are all 0
    assert 0 < got["on_policy"]["metrics"]["rollout/tis_weight"] < 1
