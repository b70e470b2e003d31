"""KL estimators against hand-computed values."""

import pytest
import torch
from torch.testing import assert_close

from spmd_rlhf.algorithms.kl import kl_penalty

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
