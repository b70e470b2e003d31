"""Loss aggregation, PPO/GRPO policy loss and logit helpers against hand-computed values.

Common batch: B=2, T=3, mask [[1,1,1],[1,1,0]] (lengths 3 and 2, 5 valid tokens).
"""

import math

import pytest
import torch
from torch.testing import assert_close

from spmd_rlhf.algorithms.losses import (
    aggregate_loss,
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    policy_loss,
)

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
LN1_5 = math.log(1.5)
LN0_5 = math.log(0.5)


def scalar(x: float) -> torch.Tensor:
    return torch.tensor(x)


# ---------------------------------------------------------------- masked helpers


def test_masked_sum_and_mean_ignore_padding_garbage():
    # valid: 1+2+3+4+6 = 16 over 5 tokens
    for garbage in (999.0, float("nan"), float("inf")):
        x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 6.0, garbage]])
        assert_close(masked_sum(x, MASK), scalar(16.0), rtol=0, atol=1e-6)
        assert_close(masked_mean(x, MASK), scalar(3.2), rtol=0, atol=1e-6)
        assert_close(masked_mean(x, MASK, denom=8.0), scalar(2.0), rtol=0, atol=1e-6)


def test_masked_mean_empty_mask_is_zero():
    assert_close(masked_mean(torch.ones(2, 3), torch.zeros(2, 3)), scalar(0.0), rtol=0, atol=0)


# ---------------------------------------------------------------- aggregate_loss

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 6.0, float("nan")]])


def test_token_mean():
    # (1+2+3+4+6) / 5 = 3.2
    assert_close(aggregate_loss(LOSS, MASK, "token-mean"), scalar(3.2), rtol=0, atol=1e-6)


def test_seq_mean_token_sum():
    # (6 + 10) / 2 = 8
    assert_close(aggregate_loss(LOSS, MASK, "seq-mean-token-sum"), scalar(8.0), rtol=0, atol=1e-6)


def test_seq_mean_token_mean_differs_from_token_mean():
    # (6/3 + 10/2) / 2 = (2 + 5) / 2 = 3.5, whereas token-mean is 3.2
    assert_close(aggregate_loss(LOSS, MASK, "seq-mean-token-mean"), scalar(3.5), rtol=0, atol=1e-6)


def test_global_counts_scale_the_loss():
    # num_tokens = 10 = 2 x local: 16 / 10 = 1.6, half of 3.2
    assert_close(aggregate_loss(LOSS, MASK, "token-mean", num_tokens=10), scalar(1.6), rtol=0, atol=1e-6)
    # num_seqs = 4: 16 / 4 = 4 and 7 / 4 = 1.75
    assert_close(aggregate_loss(LOSS, MASK, "seq-mean-token-sum", num_seqs=4), scalar(4.0), rtol=0, atol=1e-6)
    assert_close(aggregate_loss(LOSS, MASK, "seq-mean-token-mean", num_seqs=4), scalar(1.75), rtol=0, atol=1e-6)


def test_split_batch_with_global_counts_sums_to_full_loss():
    # one row per "rank", global counts 5 tokens / 2 seqs:
    #   token-mean:          6/5 + 10/5 = 1.2 + 2.0 = 3.2
    #   seq-mean-token-mean: (6/3)/2 + (10/2)/2 = 1.0 + 2.5 = 3.5
    parts = [(LOSS[i : i + 1], MASK[i : i + 1]) for i in range(2)]
    tok = [aggregate_loss(l, m, "token-mean", num_tokens=5) for l, m in parts]
    seq = [aggregate_loss(l, m, "seq-mean-token-mean", num_seqs=2) for l, m in parts]
    assert_close(torch.stack(tok), torch.tensor([1.2, 2.0]), rtol=0, atol=1e-6)
    assert_close(torch.stack(seq), torch.tensor([1.0, 2.5]), rtol=0, atol=1e-6)


def test_all_padding_row():
    # mask [[1,1,1],[0,0,0]], loss [[1,2,3],[7,7,7]]
    #   token-mean 6/3 = 2; seq-mean-token-sum 6/2 = 3; seq-mean-token-mean (2 + 0)/2 = 1
    loss = torch.tensor([[1.0, 2.0, 3.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    assert_close(aggregate_loss(loss, mask, "token-mean"), scalar(2.0), rtol=0, atol=1e-6)
    assert_close(aggregate_loss(loss, mask, "seq-mean-token-sum"), scalar(3.0), rtol=0, atol=1e-6)
    assert_close(aggregate_loss(loss, mask, "seq-mean-token-mean"), scalar(1.0), rtol=0, atol=1e-6)


def test_unknown_agg_mode():
    with pytest.raises(ValueError, match="algorithm.loss_agg_mode"):
        aggregate_loss(LOSS, MASK, "seq-sum")


# ---------------------------------------------------------------- policy_loss


def test_ratio_one_is_plain_policy_gradient():
    # logp == old: ratio 1, nothing clipped, loss = -mean(A) over valid tokens.
    # A = [[2,2,2],[-1,-1,pad]]: -(2*3 - 1*2)/5 = -0.8; d loss / d logp = -A/5 = [[-0.4]*3, [0.2, 0.2, 0]]
    # seq-mean-token-mean: -(2 + (-1))/2 = -0.5
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 1e4]])
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, 1e4]])
    loss, metrics = policy_loss(logp, old, adv, MASK, 0.2, 0.2, "token-mean")
    loss.backward()
    assert_close(loss.detach(), scalar(-0.8), rtol=0, atol=1e-6)
    assert_close(logp.grad, torch.tensor([[-0.4, -0.4, -0.4], [0.2, 0.2, 0.0]]), rtol=0, atol=1e-6)
    assert_close(metrics["pg_clipfrac"], scalar(0.0), rtol=0, atol=0)
    assert_close(metrics["ppo_kl"], scalar(0.0), rtol=0, atol=1e-6)
    assert_close(metrics["ratio_mean"], scalar(1.0), rtol=0, atol=1e-6)
    loss_seq, _ = policy_loss(old, old, adv, MASK, 0.2, 0.2, "seq-mean-token-mean")
    assert_close(loss_seq, scalar(-0.5), rtol=0, atol=1e-6)


def _clip_batch():
    # clip_low 0.3 -> lower bound 0.7, clip_high 0.2 -> upper bound 1.2
    # token  ratio  A    pg1 = -A r   pg2 = -A clip(r)   loss   clipped  d loss/d logp (= -A r if unclipped)
    # (0,0)  1.5   +1     -1.5          -1.2             -1.2    yes      0
    # (0,1)  1.5   -1      1.5           1.2              1.5    no       1.5
    # (0,2)  0.5   +1     -0.5          -0.7             -0.5    no      -0.5
    # (1,0)  0.5   -1      0.5           0.7              0.7    yes      0
    # (1,1)  1.0   +2     -2.0          -2.0             -2.0    no      -2.0
    # (1,2)  pad (NaN / huge garbage)
    old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -0.5, 1e4]])
    log_ratio = torch.tensor([[LN1_5, LN1_5, LN0_5], [LN0_5, 0.0, float("nan")]])
    logp = (old + log_ratio).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 2.0, float("nan")]])
    return logp, old, adv


def test_clipped_surrogate_token_mean():
    # sum of losses: -1.2 + 1.5 - 0.5 + 0.7 - 2.0 = -1.5; / 5 = -0.3
    # grad / 5: [[0, 0.3, -0.1], [0, -0.4, 0]]
    # clipfrac 2/5; ratio_mean (1.5+1.5+0.5+0.5+1)/5 = 1
    # ppo_kl = -(2 ln1.5 + 2 ln0.5)/5 = -2 ln0.75 / 5 = 2 * 0.2876821 / 5 = 0.1150728
    logp, old, adv = _clip_batch()
    loss, metrics = policy_loss(logp, old, adv, MASK, 0.3, 0.2, "token-mean")
    loss.backward()
    assert_close(loss.detach(), scalar(-0.3), rtol=0, atol=1e-6)
    assert_close(logp.grad, torch.tensor([[0.0, 0.3, -0.1], [0.0, -0.4, 0.0]]), rtol=0, atol=1e-6)
    assert_close(metrics["pg_clipfrac"], scalar(0.4), rtol=0, atol=1e-6)
    assert_close(metrics["ratio_mean"], scalar(1.0), rtol=0, atol=1e-6)
    assert_close(metrics["ppo_kl"], scalar(0.1150728), rtol=0, atol=1e-6)
    assert all(not v.requires_grad for v in metrics.values())


def test_clipped_surrogate_other_modes():
    # per-sequence sums: row0 -1.2 + 1.5 - 0.5 = -0.2, row1 0.7 - 2.0 = -1.3
    #   seq-mean-token-sum:  (-0.2 - 1.3)/2 = -0.75
    #   seq-mean-token-mean: (-0.2/3 - 1.3/2)/2 = (-0.0666667 - 0.65)/2 = -0.3583333
    logp, old, adv = _clip_batch()
    loss_sum, _ = policy_loss(logp, old, adv, MASK, 0.3, 0.2, "seq-mean-token-sum")
    loss_mean, _ = policy_loss(logp, old, adv, MASK, 0.3, 0.2, "seq-mean-token-mean")
    assert_close(loss_sum.detach(), scalar(-0.75), rtol=0, atol=1e-6)
    assert_close(loss_mean.detach(), scalar(-0.3583333), rtol=0, atol=1e-6)


def test_clip_high_blocks_gradient():
    # ratio 1.5 > 1 + 0.2 with A = +1: loss = -1.2 (constant), gradient exactly 0
    old = torch.tensor([[-1.0]])
    logp = (old + LN1_5).requires_grad_(True)
    loss, metrics = policy_loss(logp, old, torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.2, "token-mean")
    loss.backward()
    assert_close(loss.detach(), scalar(-1.2), rtol=0, atol=1e-6)
    assert_close(logp.grad, torch.zeros(1, 1), rtol=0, atol=0)
    assert_close(metrics["pg_clipfrac"], scalar(1.0), rtol=0, atol=0)


def test_global_num_tokens_halves_policy_loss():
    # same batch as test_clipped_surrogate_token_mean with num_tokens 10: -1.5 / 10 = -0.15
    logp, old, adv = _clip_batch()
    loss, _ = policy_loss(logp, old, adv, MASK, 0.3, 0.2, "token-mean", num_tokens=10)
    assert_close(loss.detach(), scalar(-0.15), rtol=0, atol=1e-6)


def test_is_weights_scale_tokens_and_are_detached():
    # ratio 1, A = 1 everywhere valid, weights [[2, 1, 0.5], [1, 4, pad]]:
    # -(2 + 1 + 0.5 + 1 + 4)/5 = -1.7; grad -A*w/5 = [[-0.4, -0.2, -0.1], [-0.2, -0.8, 0]]
    old = torch.zeros(2, 3)
    logp = old.clone().requires_grad_(True)
    w = torch.tensor([[2.0, 1.0, 0.5], [1.0, 4.0, float("nan")]], requires_grad=True)
    loss, _ = policy_loss(logp, old, torch.ones(2, 3), MASK, 0.2, 0.2, "token-mean", is_weights_BT=w)
    loss.backward()
    assert_close(loss.detach(), scalar(-1.7), rtol=0, atol=1e-6)
    assert_close(logp.grad, torch.tensor([[-0.4, -0.2, -0.1], [-0.2, -0.8, 0.0]]), rtol=0, atol=1e-6)
    assert w.grad is None


def test_padding_never_changes_policy_loss():
    # the same valid tokens with two different kinds of padding garbage give identical results
    logp, old, adv = _clip_batch()
    logp2, old2, adv2 = (t.detach().clone() for t in (logp, old, adv))
    logp2[1, 2], old2[1, 2], adv2[1, 2] = -7.0, 3.0, -1e6
    logp2.requires_grad_(True)
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        l1, m1 = policy_loss(logp, old, adv, MASK, 0.3, 0.2, mode)
        l2, m2 = policy_loss(logp2, old2, adv2, MASK, 0.3, 0.2, mode)
        assert_close(l1, l2, rtol=0, atol=0)
        for k in m1:
            assert_close(m1[k], m2[k], rtol=0, atol=0)


# ---------------------------------------------------------------- logits helpers


def test_entropy_uniform_is_log_v():
    # uniform over V=8: log 8 = 2.0794415; also at a huge offset (naive exp overflows) and in bf16
    for logits in (torch.zeros(2, 3, 8), torch.full((2, 3, 8), 1e4), torch.zeros(2, 3, 8, dtype=torch.bfloat16)):
        ent = entropy_from_logits(logits)
        assert ent.dtype == torch.float32
        assert_close(ent, torch.full((2, 3), 2.0794415), rtol=0, atol=1e-6)


def test_entropy_two_way():
    # logits [0, ln3] -> p = [0.25, 0.75]
    # H = 0.25 ln4 + 0.75 ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert_close(entropy_from_logits(logits), torch.tensor([[0.5623351]]), rtol=0, atol=1e-6)


def test_logprobs_from_logits():
    # row [0, 0, ln2, 0] -> p = [0.2, 0.2, 0.4, 0.2]: token 2 -> ln0.4 = -0.9162907, token 0 -> ln0.2 = -1.6094379
    # row [0, ln3, -inf, 0] -> p = [0.2, 0.6, 0, 0.2]: token 1 -> ln0.6 = -0.5108256
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0), 0.0], [0.0, 0.0, math.log(2.0), 0.0],
                            [0.0, math.log(3.0), float("-inf"), 0.0]]])
    tokens = torch.tensor([[2, 0, 1]])
    expected = torch.tensor([[-0.9162907, -1.6094379, -0.5108256]])
    assert_close(logprobs_from_logits(logits, tokens), expected, rtol=0, atol=1e-6)


def test_logprobs_from_bf16_logits_are_fp32():
    # bf16 logits [1, 0] (exact in bf16): token 0 -> ln(e/(e+1)) = -0.3132617, token 1 -> -1.3132617
    logits = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], dtype=torch.bfloat16)
    out = logprobs_from_logits(logits, torch.tensor([[0, 1]]))
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([[-0.3132617, -1.3132617]]), rtol=0, atol=1e-6)
