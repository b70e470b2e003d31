"""Loss aggregation, PPO (dual-clip) / GSPO policy losses, value loss and logit helpers against
hand-computed values.

Common batch: B=2, T=3, mask [[1,1,1],[1,1,0]] (lengths 3 and 2, 5 valid tokens).
"""

import math

import pytest
import torch
from torch.testing import assert_close

from spmd_rlhf.algorithms.losses import (
    LOSS_AGG_MODES,
    aggregate_loss,
    entropy_from_logits,
    gspo_policy_loss,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    policy_loss,
    value_loss,
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


# ---------------------------------------------------------------- seq-mean-token-sum-norm (Dr. GRPO)


def test_seq_mean_token_sum_norm():
    # per-sequence sums 6 and 10; norm_constant 4: (6 + 10) / (2 * 4) = 2; with num_seqs 4: 16 / 16 = 1
    assert "seq-mean-token-sum-norm" in LOSS_AGG_MODES
    assert_close(aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", norm_constant=4.0), scalar(2.0),
                 rtol=0, atol=1e-6)
    assert_close(aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", num_seqs=4, norm_constant=4.0), scalar(1.0),
                 rtol=0, atol=1e-6)
    with pytest.raises(AssertionError, match="norm_constant"):
        aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm")


def test_policy_loss_passes_norm_constant():
    # ratio 1, A = [[2,2,2],[-1,-1,pad]]: per-sequence sums of -A are -6 and 2 -> (-6 + 2) / (2 * 8) = -0.25
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 1e4]])
    adv = torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, float("nan")]])
    loss, _ = policy_loss(old, old, adv, MASK, 0.2, 0.2, "seq-mean-token-sum-norm", norm_constant=8.0)
    assert_close(loss, scalar(-0.25), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- dual clip

LN2, LN4, LN8 = math.log(2.0), math.log(4.0), math.log(8.0)


def _dual_batch():
    # clip 0.2 both sides -> [0.8, 1.2]
    # token  ratio  A     pg1 = -A r  pg2 = -A clip(r)  max   c=3: -A*3  dual loss  dual active  clip active
    # (0,0)  4     -1       4          1.2              4      3          3          yes          no
    # (0,1)  2     -1       2          1.2              2      3          2          no           no
    # (0,2)  4     +1      -4         -1.2             -1.2    (A > 0)   -1.2        no           yes
    # (1,0)  0.5   -2       1          1.6              1.6    6          1.6        no           yes
    # (1,1)  8     -0.5     4          0.6              4      1.5        1.5        yes          no
    # (1,2)  pad (NaN)
    old = torch.tensor([[-1.0, -3.0, -2.0], [-1.5, -4.0, 1e4]])
    log_ratio = torch.tensor([[LN4, LN2, LN4], [LN0_5, LN8, float("nan")]])
    logp = (old + log_ratio).requires_grad_(True)
    adv = torch.tensor([[-1.0, -1.0, 1.0], [-2.0, -0.5, float("nan")]])
    return logp, old, adv


def test_dual_clip_active():
    # loss (3 + 2 - 1.2 + 1.6 + 1.5) / 5 = 6.9 / 5 = 1.38
    # gradient only where neither clip is active: (0,1): -A r / 5 = 2/5 = 0.4; dual-clipped tokens get 0
    # pg_clipfrac 2/5 ((0,2), (1,0)); pg_clipfrac_lower 2/5 ((0,0), (1,1))
    logp, old, adv = _dual_batch()
    loss, metrics = policy_loss(logp, old, adv, MASK, 0.2, 0.2, "token-mean", clip_ratio_c=3.0)
    loss.backward()
    assert_close(loss.detach(), scalar(1.38), rtol=0, atol=1e-5)
    assert_close(logp.grad, torch.tensor([[0.0, 0.4, 0.0], [0.0, 0.0, 0.0]]), rtol=0, atol=1e-6)
    assert_close(metrics["pg_clipfrac"], scalar(0.4), rtol=0, atol=1e-6)
    assert_close(metrics["pg_clipfrac_lower"], scalar(0.4), rtol=0, atol=1e-6)


def test_dual_clip_off_and_inactive():
    # off (clip_ratio_c = 0): loss (4 + 2 - 1.2 + 1.6 + 4) / 5 = 10.4 / 5 = 2.08
    # gradient -A r / 5: (0,0) 4/5 = 0.8, (0,1) 0.4, (1,1) 0.5*8/5 = 0.8; clipped tokens 0
    logp, old, adv = _dual_batch()
    loss, metrics = policy_loss(logp, old, adv, MASK, 0.2, 0.2, "token-mean")
    loss.backward()
    assert_close(loss.detach(), scalar(2.08), rtol=0, atol=1e-5)
    assert_close(logp.grad, torch.tensor([[0.8, 0.4, 0.0], [0.0, 0.8, 0.0]]), rtol=0, atol=1e-6)
    assert_close(metrics["pg_clipfrac_lower"], scalar(0.0), rtol=0, atol=0)
    # c = 10 exceeds every ratio of a negative-advantage token (4, 2, 0.5, 8): the bound is never hit
    # and loss, gradient and metrics are exactly those of c = 0
    grad_off = logp.grad.clone()
    logp.grad = None
    loss_c, metrics_c = policy_loss(logp, old, adv, MASK, 0.2, 0.2, "token-mean", clip_ratio_c=10.0)
    loss_c.backward()
    assert_close(loss_c.detach(), loss.detach(), rtol=0, atol=0)
    assert_close(logp.grad, grad_off, rtol=0, atol=0)
    for key in metrics:
        assert_close(metrics_c[key], metrics[key], rtol=0, atol=0)


def test_dual_clip_needs_c_above_one():
    logp, old, adv = _dual_batch()
    with pytest.raises(AssertionError, match="clip_ratio_c"):
        policy_loss(logp, old, adv, MASK, 0.2, 0.2, "token-mean", clip_ratio_c=0.5)


# ---------------------------------------------------------------- GSPO


def _gspo_batch():
    # token log-ratios row 0 [0.1, 0.3, -0.1] (mean 0.1), row 1 [0.2, -0.4, pad] (mean -0.1)
    # sequence ratios s_0 = e^0.1 = 1.1051709, s_1 = e^-0.1 = 0.9048374; A = +1 on row 0, -2 on row 1
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.1, 1e4]])
    log_ratio = torch.tensor([[0.1, 0.3, -0.1], [0.2, -0.4, float("nan")]])
    logp = (old + log_ratio).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, float("nan")]])
    return logp, old, adv


S0, S1 = math.exp(0.1), math.exp(-0.1)  # 1.1051709, 0.9048374


def test_gspo_ratio_is_exp_of_mean_token_log_ratio():
    # no clip reached ([0.1, 1.9]); token-mean:
    #   loss = (-1 * 3 * 1.1051709 + 2 * 2 * 0.9048374) / 5 = (-3.3155128 + 3.6193496) / 5 = 0.0607674
    #   d loss / d logp_it = -A_i * s_i / 5 (the exponent's gradient is 1 for the token's own logp
    #   and 0 for the others, whose part is stopped): row 0 -1.1051709/5 = -0.2210342,
    #   row 1 2 * 0.9048374 / 5 = 0.3619350
    #   ratio_mean (3 * 1.1051709 + 2 * 0.9048374) / 5 = 1.0250375; ppo_kl -(0.1+0.3-0.1+0.2-0.4)/5 = -0.02
    logp, old, adv = _gspo_batch()
    loss, metrics = gspo_policy_loss(logp, old, adv, MASK, 0.9, 0.9, "token-mean")
    loss.backward()
    assert_close(loss.detach(), scalar(0.0607674), rtol=0, atol=1e-6)
    assert_close(logp.grad, torch.tensor([[-0.2210342] * 3, [0.3619350, 0.3619350, 0.0]]), rtol=0, atol=1e-6)
    assert_close(metrics["ratio_mean"], scalar(1.0250375), rtol=0, atol=1e-6)
    assert_close(metrics["ppo_kl"], scalar(-0.02), rtol=0, atol=1e-6)
    assert_close(metrics["pg_clipfrac"], scalar(0.0), rtol=0, atol=0)
    assert set(metrics) == {"pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "ratio_mean"}


def test_gspo_token_equals_sequence_level_objective():
    # with a per-sequence advantage and seq-mean-token-mean, GSPO-token is GSPO's sequence objective
    #   J = (1/2) sum_i -A_i exp(mean_t (logp_it - old_it)),  dJ/dlogp_it = -A_i s_i / (|y_i| * 2):
    #   row 0: -1.1051709 / 6 = -0.1841952; row 1: 2 * 0.9048374 / 4 = 0.4524187
    logp, old, adv = _gspo_batch()
    loss, _ = gspo_policy_loss(logp, old, adv, MASK, 0.9, 0.9, "seq-mean-token-mean")
    loss.backward()
    assert_close(logp.grad, torch.tensor([[-0.1841952] * 3, [0.4524187, 0.4524187, 0.0]]), rtol=0, atol=1e-6)
    # and the same objective written directly
    ref = logp.detach().clone().requires_grad_(True)
    seq_lr = torch.stack([(ref[0] - old[0]).mean(), (ref[1, :2] - old[1, :2]).mean()])
    j = (-torch.tensor([1.0, -2.0]) * seq_lr.exp()).mean()
    j.backward()
    assert_close(loss.detach(), j.detach(), rtol=0, atol=1e-6)
    assert_close(logp.grad[:, :2], ref.grad[:, :2], rtol=0, atol=1e-6)


def test_gspo_clips_whole_sequences():
    # clip_low 0.2, clip_high 0.05 -> [0.8, 1.05]
    #   row 0: s = 1.1051709 > 1.05 with A = +1: loss -1.05 per token, clipped, gradient 0
    #   row 1: s = 0.9048374 inside: loss 2 * 0.9048374 = 1.8096748 per token, gradient 2 * s / 5 = 0.3619350
    #   token-mean (3 * -1.05 + 2 * 1.8096748) / 5 = (-3.15 + 3.6193496) / 5 = 0.0938699; clipfrac 3/5
    logp, old, adv = _gspo_batch()
    loss, metrics = gspo_policy_loss(logp, old, adv, MASK, 0.2, 0.05, "token-mean")
    loss.backward()
    assert_close(loss.detach(), scalar(0.0938699), rtol=0, atol=1e-6)
    assert_close(logp.grad, torch.tensor([[0.0] * 3, [0.3619350, 0.3619350, 0.0]]), rtol=0, atol=1e-6)
    assert_close(metrics["pg_clipfrac"], scalar(0.6), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- ratio 1 is the plain policy gradient


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("loss_fn", [policy_loss, gspo_policy_loss])
def test_ratio_one_gradient_is_plain_policy_gradient(mode, loss_fn):
    # one epoch, logp == old: grad of the clipped loss == grad of -(A * logp) aggregated the same way
    # (responses starting at different columns; clip ranges tiny, so any ratio != 1 would show)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    old = torch.randn(3, 5, generator=g) - 2.0
    adv = torch.randn(3, 5, generator=g)
    logp = old.clone().requires_grad_(True)
    loss, _ = loss_fn(logp, old, adv, mask, 0.01, 0.01, mode, norm_constant=5.0)
    loss.backward()
    ref = old.clone().requires_grad_(True)
    aggregate_loss(-(adv * ref), mask, mode, norm_constant=5.0).backward()
    assert (ref.grad.abs() > 0).sum() == 8  # every valid token has a gradient
    assert_close(logp.grad, ref.grad, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- value loss


def _value_batch():
    # clip_range 0.5; per token (v, old, R):
    #   (0,0) v=1,    old=0,    R=2:  (v-R)^2 = 1; clipped v = 0 + 0.5 = 0.5: (0.5-2)^2 = 2.25 -> 2.25, clipped
    #   (0,1) v=1,    old=0.75, R=0:  1; v - old = 0.25 inside: clipped v = 1 -> 1 (tie), not clipped
    #   (0,2) v=-1,   old=0,    R=-3: 4; clipped v = -0.5: 2.5^2 = 6.25 -> 6.25, clipped
    #   (1,0) v=3,    old=2,    R=0:  9; clipped v = 2.5: 6.25 -> 9, not clipped
    #   (1,1) v=0.25, old=0,    R=1:  0.5625; inside -> 0.5625, not clipped
    #   (1,2) pad (NaN)
    nan = float("nan")
    values = torch.tensor([[1.0, 1.0, -1.0], [3.0, 0.25, nan]], requires_grad=True)
    old = torch.tensor([[0.0, 0.75, 0.0], [2.0, 0.0, nan]])
    returns = torch.tensor([[2.0, 0.0, -3.0], [0.0, 1.0, nan]])
    return values, old, returns


def test_value_loss_clipped():
    # 0.5 * [2.25, 1, 6.25, 9, 0.5625] = [1.125, 0.5, 3.125, 4.5, 0.28125], sum 9.53125, / 5 = 1.90625
    # gradient (v - R) / 5 where unclipped, 0 where clipped: [[0, 0.2, 0], [0.6, -0.15, 0]]
    # vf_clipfrac 2/5; vpred_mean (1 + 1 - 1 + 3 + 0.25) / 5 = 0.85
    values, old, returns = _value_batch()
    loss, metrics = value_loss(values, old, returns, MASK, 0.5, "token-mean")
    loss.backward()
    assert_close(loss.detach(), scalar(1.90625), rtol=0, atol=1e-6)
    assert_close(values.grad, torch.tensor([[0.0, 0.2, 0.0], [0.6, -0.15, 0.0]]), rtol=0, atol=1e-6)
    assert_close(metrics["vf_clipfrac"], scalar(0.4), rtol=0, atol=1e-6)
    assert_close(metrics["vpred_mean"], scalar(0.85), rtol=0, atol=1e-6)
    assert all(not v.requires_grad for v in metrics.values())
    # seq-mean-token-mean: ((1.125 + 0.5 + 3.125) / 3 + (4.5 + 0.28125) / 2) / 2
    #                    = (1.5833333 + 2.390625) / 2 = 1.9869792
    loss_seq, _ = value_loss(values, old, returns, MASK, 0.5, "seq-mean-token-mean")
    assert_close(loss_seq.detach(), scalar(1.9869792), rtol=0, atol=1e-6)


def test_value_loss_unclipped():
    # clip_range 0: 0.5 * (v - R)^2 = [0.5, 0.5, 2, 4.5, 0.28125], sum 7.78125, / 5 = 1.55625
    # gradient (v - R) / 5 = [[-0.2, 0.2, 0.4], [0.6, -0.15, 0]]
    values, old, returns = _value_batch()
    loss, metrics = value_loss(values, old, returns, MASK, 0.0, "token-mean")
    loss.backward()
    assert_close(loss.detach(), scalar(1.55625), rtol=0, atol=1e-6)
    assert_close(values.grad, torch.tensor([[-0.2, 0.2, 0.4], [0.6, -0.15, 0.0]]), rtol=0, atol=1e-6)
    assert_close(metrics["vf_clipfrac"], scalar(0.0), rtol=0, atol=0)


# ---------------------------------------------------------------- padding never matters


def _regarbage(tensors, fill):
    """Copies of ``tensors`` with position (1, 2), the padding of MASK, set to ``fill``."""
    out = []
    for t in tensors:
        t = t.detach().clone()
        t[1, 2] = fill
        out.append(t)
    return out


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -1e6])
def test_padding_never_changes_new_losses(fill):
    def run(fn, batch):
        first = batch[0].requires_grad_(True)
        loss, metrics = fn(first, *batch[1:])
        loss.backward()
        return loss.detach(), first.grad, metrics

    cases = [
        (lambda lp, o, a: policy_loss(lp, o, a, MASK, 0.2, 0.2, "token-mean", clip_ratio_c=3.0), _dual_batch()),
        (lambda lp, o, a: gspo_policy_loss(lp, o, a, MASK, 0.2, 0.05, "seq-mean-token-mean"), _gspo_batch()),
        (lambda v, o, r: value_loss(v, o, r, MASK, 0.5, "token-mean"), _value_batch()),
    ]
    for fn, batch in cases:
        clean = _regarbage(batch, 0.0)
        dirty = _regarbage(batch, fill)
        loss_c, grad_c, metrics_c = run(fn, clean)
        loss_d, grad_d, metrics_d = run(fn, dirty)
        assert torch.isfinite(grad_d).all()
        assert_close(loss_d, loss_c, rtol=0, atol=0)
        assert_close(grad_d, grad_c, rtol=0, atol=0)
        for key in metrics_c:
            assert_close(metrics_d[key], metrics_c[key], rtol=0, atol=0)
