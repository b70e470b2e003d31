"""``build_critic`` and ``Critic``: exact initialisation, aligned values, the same update on 1 and 2 ranks.

The worker builds a seeded tiny actor (vocab 15: uneven shards on 2 ranks), critics from it and
from a random reward-model directory, and trains critics for a few updates toward fixed returns
(see the worker's docstring). Weights after the updates may differ between world sizes only by
float summation order (fp32 on CPU); the updates must move them far beyond that tolerance.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from tests.distributed.workers.critic_worker import HEAD_SEED, HEAD_STD, RUNS, fixed_returns
from tests.distributed.workers.scalar_heads import fixed_batch, fixed_rows, save_random_reward_model
from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "critic_worker.py"
RTOL, ATOL = 1e-5, 1e-6
# Adam moves a weight whose gradient is float noise away from zero by a summation-order-dependent
# fraction of lr (2e-3) per step: seen 1.5e-6 on 1 of 32 bias elements after 6 steps on 2 ranks with
# transformers 5.19. 0.5 % of lr still catches a missing global reduction, which moves weights by ~lr.
WEIGHTS_ATOL = 1e-5
MOVED = 1e-3  # the updates move some backbone weight at least this far (lr 2e-3, 6 steps)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("critic_rm") / "rm"
    save_random_reward_model(str(path), seed=5)
    return path


@pytest.fixture(scope="module")
def run_world(rm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("critic")
    cache: dict[int, dict] = {}

    def get(nproc: int) -> dict:
        if nproc not in cache:
            path = out / f"world{nproc}.pt"
            torchrun([str(WORKER), str(path), str(rm_dir)], nproc, timeout=120)
            cache[nproc] = torch.load(path)
            assert cache[nproc]["world"] == nproc
        return cache[nproc]

    return get


def backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(("model.", "buffer:"))}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("nproc", [1, 2])
def test_critic_from_actor_copies_the_backbone_exactly(run_world, nproc):
    result = run_world(nproc)
    actor = backbone(result["actor"])
    assert len(actor) > 10 and any(k.startswith("buffer:") for k in actor)  # weights and rotary tables
    for name in ("zero_head", "random_head"):
        critic = result[name]["state"]
        assert backbone(critic).keys() == actor.keys(), name
        for key, tensor in actor.items():
            torch.testing.assert_close(critic[key], tensor, rtol=0, atol=0, msg=f"{name}: {key}")
        assert result[name]["resharded"], name
    zero = result["zero_head"]
    assert not zero["state"]["score.weight"].any() and not zero["state"]["score.bias"].any()
    assert not zero["values"].any(), "a zero head gives V = 0 everywhere"
    random_head = result["random_head"]["state"]
    assert not random_head["score.bias"].any()
    generator = torch.Generator().manual_seed(HEAD_SEED)  # the full head from the seed, on every world size
    want = torch.zeros(random_head["score.weight"].shape).normal_(0.0, HEAD_STD, generator=generator)
    torch.testing.assert_close(random_head["score.weight"], want, rtol=0, atol=0)


def test_critic_from_reward_model_takes_its_weights_and_values_align_with_the_mask(run_world, rm_dir):
    result = run_world(2)["reward_model"]
    saved = load_file(str(rm_dir / "model.safetensors"))
    state = result["state"]
    assert {k for k in state if not k.startswith("buffer:")} == set(saved) | {"score.bias"}
    for key, tensor in saved.items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0, msg=key)
    assert not state["score.bias"].any()
    # plain HF, one unpadded row at a time: the head at position t is the value in column t
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    mask_BT = fixed_batch(0).loss_mask_BT
    want_BT = torch.zeros_like(mask_BT)
    with torch.no_grad():
        for i, (prompt, response) in enumerate(zip(*fixed_rows())):
            hidden_1TH = model.model(input_ids=torch.tensor([prompt + response])).last_hidden_state
            want_BT[i, : len(prompt) + len(response) - 1] = model.score(hidden_1TH)[0, :-1, 0]
    torch.testing.assert_close(result["values"], want_BT * mask_BT, rtol=1e-5, atol=1e-5)
    assert (result["values"] != 0).sum() == mask_BT.sum(), "every response column has a value"


@pytest.mark.parametrize("run", ["token-mean", "seq-mean-token-sum-norm"])
def test_value_loss_falls_toward_fixed_returns(run_world, run):
    result = run_world(1)[f"train/{run}"]
    _, norm_constant, _ = RUNS[run]
    losses = [step["critic/vf_loss"] for step in result["history"]]
    assert losses[-1] < 0.3 * losses[0], losses
    assert result["skipped"] == 0
    assert max_diff(backbone(result["final"]), backbone(result["initial"])) > MOVED, "the backbone learns too"
    # the first step's loss, from the initial values: 0.5 * (V - R)^2 over the response columns,
    # divided by the token count (token-mean) or by rows * norm_constant (seq-mean-token-sum-norm)
    values_BT, mask_BT = run_world(1)["random_head"]["values"], fixed_batch(0).loss_mask_BT
    squares = (0.5 * (values_BT - fixed_returns()).square() * mask_BT).sum()  # values are 0 off the mask
    denom = mask_BT.sum() if norm_constant is None else mask_BT.shape[0] * norm_constant
    assert losses[0] == pytest.approx(float(squares / denom), rel=1e-5)


def test_clipping_engages_when_values_leave_the_range_of_the_old_ones(run_world):
    """Six updates against one set of old values: the value clip must become active and the loss,
    held up by the clipped term, must stop falling as it does when the old values follow."""
    clipped, free = run_world(1)["train/clipped"]["history"], run_world(1)["train/token-mean"]["history"]
    assert clipped[0]["critic/vf_loss"] == pytest.approx(free[0]["critic/vf_loss"], rel=1e-6)
    assert clipped[0]["critic/vf_clipfrac"] == 0.0  # values equal the old ones at the first step
    assert max(step["critic/vf_clipfrac"] for step in clipped) > 0.3
    assert clipped[-1]["critic/vf_loss"] > 2 * free[-1]["critic/vf_loss"]


@pytest.mark.parametrize("run", RUNS)
def test_update_gives_the_same_weights_on_one_and_two_ranks(run_world, run):
    want, got = run_world(1)[f"train/{run}"], run_world(2)[f"train/{run}"]
    torch.testing.assert_close(got["initial"], want["initial"], rtol=0, atol=0)
    torch.testing.assert_close(got["final"], want["final"], rtol=RTOL, atol=WEIGHTS_ATOL)
    assert max_diff(want["final"], want["initial"]) > 100 * WEIGHTS_ATOL
    assert got["resharded"] and want["resharded"]
    # the loss and the grad norm are global; clipfrac and vpred_mean are means of per-rank means
    for step, (a, b) in enumerate(zip(got["history"], want["history"], strict=True)):
        for key in ("critic/vf_loss", "critic/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (step, key)
