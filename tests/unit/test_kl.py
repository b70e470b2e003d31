"""KL estimators, the KL-in-reward penalty and its controllers against hand-computed values."""

import pytest
import torch
from torch.testing import assert_close

from spmd_rlhf.algorithms.kl import AdaptiveKLController, FixedKLController, kl_penalty, kl_reward_penalty

LN2 = 0.6931471805599453

# ref - logp = log r with r = 2, 0.5, 1 at logp = -1, -2, -0.5
LOGP = torch.tensor([[-1.0, -2.0, -0.5]])
REF = LOGP + torch.tensor([[LN2, -LN2, 0.0]])


def test_k1():
    # logp - ref = -log r = [-ln2, ln2, 0]
    expected = torch.tensor([[-0.6931472, 0.6931472, 0.0]])
    assert_close(kl_penalty(LOGP, REF, "k1"), expected, rtol=0, atol=1e-6)


def test_k2():
    # 0.5 * (ln2)^2 = 0.5 * 0.4804530 = 0.2402265
    expected = torch.tensor([[0.2402265, 0.2402265, 0.0]])
    assert_close(kl_penalty(LOGP, REF, "k2"), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["k3", "low_var_kl"])
def test_k3(name):
    # r - 1 - log r:  r=2: 2 - 1 - 0.6931472 = 0.3068528
    #                 r=0.5: 0.5 - 1 + 0.6931472 = 0.1931472
    #                 r=1: 0
    expected = torch.tensor([[0.3068528, 0.1931472, 0.0]])
    assert_close(kl_penalty(LOGP, REF, name), expected, rtol=0, atol=1e-6)


def test_k3_clamps():
    # log r = 30 -> clamped to 20 -> e^20 - 21 ~ 4.85e8 -> clamped to 10
    # log r = -30 -> clamped to -20 -> e^-20 + 20 - 1 = 19.000000002 -> clamped to 10
    # log r = -5 -> e^-5 + 5 - 1 = 0.0067379 + 4 = 4.0067379 (inside the clamp)
    logp = torch.zeros(1, 3)
    ref = torch.tensor([[30.0, -30.0, -5.0]])
    expected = torch.tensor([[10.0, 10.0, 4.0067379]])
    assert_close(kl_penalty(logp, ref, "k3"), expected, rtol=0, atol=1e-6)


def test_k3_nonnegative_on_random():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(8, 64, generator=g) * 3
    ref = torch.randn(8, 64, generator=g) * 3
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, ref, "k2") >= 0).all()
    assert (kl_penalty(logp, ref, "k1") < 0).any()  # k1 alone can go negative


def test_unknown_estimator():
    with pytest.raises(ValueError, match="algorithm.kl_estimator"):
        kl_penalty(LOGP, REF, "abs")


# ---------------------------------------------------------------- KL in the reward


def test_kl_reward_penalty():
    # coef 0.1, mask [[1,1,1],[1,1,0]]:
    #   row 0: r [0, 0, 1],  kl [0.5, -0.5, 1]  -> [-0.05, 0.05, 1 - 0.1] = [-0.05, 0.05, 0.9]
    #   row 1: r [0, 2, pad], kl [0.25, 0.5, pad] -> [-0.025, 2 - 0.05, 0] = [-0.025, 1.95, 0]
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    expected = torch.tensor([[-0.05, 0.05, 0.9], [-0.025, 1.95, 0.0]])
    for fill in (float("nan"), float("inf"), 1e6):
        rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, fill]])
        kl = torch.tensor([[0.5, -0.5, 1.0], [0.25, 0.5, fill]], requires_grad=True)
        out = kl_reward_penalty(rewards, kl, mask, 0.1)
        assert_close(out, expected, rtol=0, atol=1e-6)
        assert not out.requires_grad


# ---------------------------------------------------------------- coefficient controllers


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=10.0, n_steps=1000)
    assert ctl.value == 0.05
    assert ctl.state_dict() == {"value": 0.05}


def test_adaptive_controller_by_hand():
    # init 0.5, target 1, horizon 100
    #   kl 1.1, n 10:  error clip(0.1)  = 0.1  -> x (1 + 0.1 * 10/100) = 1.01  -> 0.505
    #   kl 3.0, n 50:  error clip(2.0)  = 0.2  -> x (1 + 0.2 * 50/100) = 1.1   -> 0.5555
    #   kl 0.0, n 100: error clip(-1.0) = -0.2 -> x (1 - 0.2)          = 0.8   -> 0.4444
    #   kl 0.9, n 20:  error clip(-0.1) = -0.1 -> x (1 - 0.1 * 20/100) = 0.98  -> 0.435512
    ctl = AdaptiveKLController(init_coef=0.5, target=1.0, horizon=100)
    assert ctl.value == 0.5
    for (kl, n), want in zip([(1.1, 10), (3.0, 50), (0.0, 100), (0.9, 20)], [0.505, 0.5555, 0.4444, 0.435512]):
        ctl.update(kl, n)
        assert ctl.value == pytest.approx(want, rel=0, abs=1e-12)
        assert isinstance(ctl.value, float)


def test_adaptive_controller_checkpoint_round_trip():
    ctl = AdaptiveKLController(0.5, 1.0, 100)
    ctl.update(3.0, 50)  # 0.55
    state = ctl.state_dict()
    assert all(type(v) is float for v in state.values())
    resumed = AdaptiveKLController(0.5, 1.0, 100)
    resumed.load_state_dict(state)
    assert resumed.value == ctl.value
    ctl.update(0.0, 100)
    resumed.update(0.0, 100)
    assert resumed.value == ctl.value == pytest.approx(0.44, rel=0, abs=1e-12)  # 0.55 * 0.8


@pytest.mark.parametrize("kwargs, key", [
    (dict(init_coef=0.1, target=0.0, horizon=100), "algorithm.kl_in_reward.target"),
    (dict(init_coef=0.1, target=1.0, horizon=0), "algorithm.kl_in_reward.horizon"),
    (dict(init_coef=-0.1, target=1.0, horizon=100), "algorithm.kl_in_reward.coef"),
])
def test_adaptive_controller_rejects_bad_settings(kwargs, key):
    with pytest.raises(ValueError, match=key):
        AdaptiveKLController(**kwargs)
