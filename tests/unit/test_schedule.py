"""Warmup + cosine lr multiplier against hand-computed values."""

import pytest
import torch

from spmd_rlhf.trainer.schedule import build_scheduler, cosine_with_warmup


def test_warmup_then_cosine_to_floor():
    # warmup 4: (step+1)/4 -> 0.25, 0.5, 0.75, 1.0
    # cosine over 12 - 4 = 8 steps, m = 0.1: m + 0.9 * 0.5 * (1 + cos(pi * p))
    #   step 4: p 0 -> 1.0; step 6: p 1/4 -> 0.1 + 0.45 * 1.7071068 = 0.8681981
    #   step 8: p 1/2 -> 0.1 + 0.45 = 0.55; step 12: p 1 -> 0.1; step 20: clamped -> 0.1
    expected = {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0, 6: 0.8681981, 8: 0.55, 12: 0.1, 20: 0.1}
    for step, mult in expected.items():
        assert cosine_with_warmup(step, 4, 12, 0.1) == pytest.approx(mult, rel=0, abs=1e-6), step


def test_no_warmup():
    # p = step / 10, m = 0: step 0 -> 1, step 5 -> 0.5, step 10 -> 0
    assert cosine_with_warmup(0, 0, 10) == pytest.approx(1.0, rel=0, abs=1e-12)
    assert cosine_with_warmup(5, 0, 10) == pytest.approx(0.5, rel=0, abs=1e-12)
    assert cosine_with_warmup(10, 0, 10) == pytest.approx(0.0, rel=0, abs=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_with_warmup(0, -1, 10)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_with_warmup(0, 5, 3)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        cosine_with_warmup(0, 0, 10, 1.5)


def test_build_scheduler_sets_lr():
    # base lr 2, warmup 2, total 6, m = 0:
    #   step 0: 2 * 1/2 = 1; step 1: 2 * 2/2 = 2; step 2: p 0 -> 2
    #   step 3: p 1/4 -> 2 * 0.5 * (1 + 0.7071068) = 1.7071068
    #   step 4: p 1/2 -> 1; step 5: p 3/4 -> 2 * 0.5 * (1 - 0.7071068) = 0.2928932; step 6: 0
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=6, min_lr_ratio=0.0)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 1.7071068, 1.0, 0.2928932, 0.0], rel=0, abs=1e-6)
