"""Policy and value losses, loss aggregation and per-token quantities from logits.

``policy_loss`` implements the PPO clipped surrogate (Schulman et al., 2017) with the decoupled
clip range of DAPO (Yu et al., 2025, "clip-higher") and, optionally, the dual clip of Ye et al.
(2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning"):

    ratio = exp(logp - old_logp)
    loss  = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
    loss  = min(loss, -A * clip_ratio_c)        only where A < 0, only if clip_ratio_c > 0

The dual clip bounds what a token with negative advantage can cost when its ratio has grown
large: past ``ratio = clip_ratio_c`` its loss is a constant and it gets no gradient.

``gspo_policy_loss`` is GSPO (Zheng et al., 2025) in its GSPO-token form: the same clipped
surrogate with the token ratio replaced by

    s_it = exp(sg(mean_t' (logp_it' - old_logp_it')) + logp_it - sg(logp_it))

whose value is the sequence's length-normalised ratio and whose gradient is that of the token's
own log-prob (``sg`` = stop-gradient). With an advantage that is constant over each sequence and
"seq-mean-token-mean" aggregation it is exactly the sequence-level GSPO objective: the gradient
with respect to ``logp_it`` is ``-A_i * s_i / |y_i|`` (divided by the number of sequences).

``value_loss`` is PPO's clipped value loss (Schulman et al., 2017, as in OpenAI baselines):

    loss = 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)

Departures from the papers:
  * The log-ratio is clamped to [-20, 20] before ``exp`` (as verl does), so a stale token cannot
    overflow the ratio; for GSPO the clamp applies to the token log-ratio above, whose value is
    the sequence's.
  * GSPO takes no dual clip.
  * An optional, detached per-token weight ``is_weights_BT`` multiplies the policy loss:
    truncated importance-sampling weights that correct for the mismatch between the inference
    engine that sampled the tokens and the trainer.
  * How per-token losses are reduced to a scalar is a choice (``aggregate_loss``):
    "token-mean" is DAPO's token-level loss, "seq-mean-token-mean" is the per-sequence average of
    the original GRPO, "seq-mean-token-sum" is the length-unnormalised sum divided by the number
    of sequences, and "seq-mean-token-sum-norm" is Dr. GRPO's (Liu et al., 2025): the sum also
    divided by a constant (the generation budget, max_new_tokens) instead of each length.

Masks are 0/1 (bool or float). Values at padded positions never reach the
result, not even as NaN or inf, and get zero gradient.
"""

import torch
from torch import Tensor

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum of x over the positions where mask is set (a 0-dim tensor)."""
    return torch.where(mask.bool(), x, 0.0).sum()


def masked_mean(x: Tensor, mask: Tensor, denom: float | Tensor | None = None) -> Tensor:
    """masked_sum(x, mask) / denom; denom defaults to the number of valid positions
    (at least 1, so an all-padding mask gives 0 rather than NaN)."""
    if denom is None:
        denom = mask.sum().clamp(min=1)
    return masked_sum(x, mask) / denom


def aggregate_loss(
    loss_BT: Tensor,
    mask_BT: Tensor,
    mode: str,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    norm_constant: float | None = None,
) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    Modes (len_b = mask_BT[b].sum()):
      "token-mean":              sum_{b,t} loss*mask / num_tokens   (default: mask.sum())
      "seq-mean-token-sum":      sum_b (sum_t loss*mask) / num_seqs (default: B)
      "seq-mean-token-mean":     sum_b (sum_t loss*mask / max(len_b, 1)) / num_seqs (default: B);
                                 an all-padding row adds 0 but still counts in B.
      "seq-mean-token-sum-norm": sum_b (sum_t loss*mask) / (num_seqs * norm_constant); the
                                 caller passes the generation budget (rollout.max_new_tokens).

    Every mode is a plain sum over local sequences divided by a constant. A
    distributed caller that passes the GLOBAL count (num_tokens or num_seqs over
    all ranks and the whole mini-batch, however it is split into micro-batches)
    and sums the gradients across ranks and micro-batches therefore gets exactly
    the gradient of the loss over the whole mini-batch, on any number of ranks.
    With the defaults the result is the local mean instead.
    """
    if mode == "token-mean":
        denom = mask_BT.sum().clamp(min=1) if num_tokens is None else num_tokens
        return masked_sum(loss_BT, mask_BT) / denom
    seq_sum_B = torch.where(mask_BT.bool(), loss_BT, 0.0).sum(dim=-1)
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        per_seq_B = seq_sum_B
    elif mode == "seq-mean-token-mean":
        per_seq_B = seq_sum_B / mask_BT.sum(dim=-1).clamp(min=1)
    else:
        raise ValueError(f"algorithm.loss_agg_mode={mode!r} is unknown; valid choices: {LOSS_AGG_MODES}")
    denom = loss_BT.shape[0] if num_seqs is None else num_seqs
    if mode == "seq-mean-token-sum-norm":
        assert norm_constant is not None and norm_constant > 0, (
            f"loss_agg_mode {mode!r} needs norm_constant > 0 (the generation budget), got {norm_constant}")
        denom = denom * norm_constant
    return per_seq_B.sum() / denom


def _clipped_surrogate(log_ratio_BT: Tensor, advantages_BT: Tensor, clip_low: float, clip_high: float,
                       clip_ratio_c: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token PPO loss from a log-ratio that is already 0 at padding.

    Returns (loss_BT, ratio_BT, clipped_BT, dual_BT): the two boolean tensors mark where the
    clipped term is the larger one and where the dual clip replaced the loss."""
    log_ratio_BT = torch.clamp(log_ratio_BT, min=-20.0, max=20.0)
    ratio_BT = torch.exp(log_ratio_BT)
    pg1_BT = -advantages_BT * ratio_BT
    pg2_BT = -advantages_BT * torch.clamp(ratio_BT, 1.0 - clip_low, 1.0 + clip_high)
    loss_BT = torch.maximum(pg1_BT, pg2_BT)
    clipped_BT = pg2_BT > pg1_BT
    if clip_ratio_c > 0:
        pg3_BT = -advantages_BT * clip_ratio_c
        dual_BT = (advantages_BT < 0) & (loss_BT > pg3_BT)
        loss_BT = torch.where(dual_BT, pg3_BT, loss_BT)
    else:
        dual_BT = torch.zeros_like(clipped_BT)
    return loss_BT, ratio_BT, clipped_BT, dual_BT


def _policy_metrics(logprobs_BT: Tensor, old_logprobs_BT: Tensor, ratio_BT: Tensor, clipped_BT: Tensor,
                    dual_BT: Tensor, mask_BT: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        return {
            "pg_clipfrac": masked_mean(clipped_BT.float(), mask_BT),
            "pg_clipfrac_lower": masked_mean(dual_BT.float(), mask_BT),
            "ppo_kl": masked_mean(old_logprobs_BT - logprobs_BT, mask_BT),
            "ratio_mean": masked_mean(ratio_BT, mask_BT),
        }


def policy_loss(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    clip_low: float,
    clip_high: float,
    agg_mode: str,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    is_weights_BT: Tensor | None = None,
    *,
    clip_ratio_c: float = 0.0,
    norm_constant: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with clip range [1 - clip_low, 1 + clip_high].

    ``clip_ratio_c > 1`` turns on the dual clip for negative advantages; 0 leaves it off.
    Returns (loss, metrics). The loss is aggregated by ``aggregate_loss`` with
    ``agg_mode``, ``num_tokens``, ``num_seqs`` and ``norm_constant``. Metrics are detached local
    masked means: "pg_clipfrac" (fraction of valid tokens where the clipped term
    is the larger one, i.e. the clip is active), "pg_clipfrac_lower" (fraction where the dual
    clip is active), "ppo_kl" (mean of old_logp - logp) and "ratio_mean".
    """
    assert logprobs_BT.shape == old_logprobs_BT.shape == advantages_BT.shape == mask_BT.shape
    assert clip_ratio_c == 0.0 or clip_ratio_c > 1.0, f"clip_ratio_c={clip_ratio_c} must be 0 (off) or > 1"
    # zero the log-ratio at padding so that NaN/inf there cannot leak into the gradient
    log_ratio_BT = torch.where(mask_BT.bool(), logprobs_BT - old_logprobs_BT, 0.0)
    loss_BT, ratio_BT, clipped_BT, dual_BT = _clipped_surrogate(
        log_ratio_BT, advantages_BT, clip_low, clip_high, clip_ratio_c)
    if is_weights_BT is not None:
        loss_BT = loss_BT * is_weights_BT.detach()
    loss = aggregate_loss(loss_BT, mask_BT, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs,
                          norm_constant=norm_constant)
    return loss, _policy_metrics(logprobs_BT, old_logprobs_BT, ratio_BT, clipped_BT, dual_BT, mask_BT)


def gspo_policy_loss(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    clip_low: float,
    clip_high: float,
    agg_mode: str,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    is_weights_BT: Tensor | None = None,
    *,
    norm_constant: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token clipped surrogate: every token's ratio is its sequence's geometric-mean ratio.

    Arguments, aggregation and metrics as ``policy_loss`` ("ratio_mean" averages the sequence
    ratios over valid tokens; "pg_clipfrac_lower" is always 0, GSPO has no dual clip).
    """
    assert logprobs_BT.shape == old_logprobs_BT.shape == advantages_BT.shape == mask_BT.shape
    valid_BT = mask_BT.bool()
    token_log_ratio_BT = torch.where(valid_BT, logprobs_BT - old_logprobs_BT, 0.0)
    seq_log_ratio_B = token_log_ratio_BT.sum(dim=-1) / mask_BT.sum(dim=-1).clamp(min=1)
    own_grad_BT = torch.where(valid_BT, logprobs_BT - logprobs_BT.detach(), 0.0)  # value 0, gradient of logp_t
    log_ratio_BT = torch.where(valid_BT, seq_log_ratio_B.detach()[:, None] + own_grad_BT, 0.0)
    loss_BT, ratio_BT, clipped_BT, dual_BT = _clipped_surrogate(log_ratio_BT, advantages_BT, clip_low, clip_high, 0.0)
    if is_weights_BT is not None:
        loss_BT = loss_BT * is_weights_BT.detach()
    loss = aggregate_loss(loss_BT, mask_BT, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs,
                          norm_constant=norm_constant)
    return loss, _policy_metrics(logprobs_BT, old_logprobs_BT, ratio_BT, clipped_BT, dual_BT, mask_BT)


def value_loss(
    values_BT: Tensor,
    old_values_BT: Tensor,
    returns_BT: Tensor,
    mask_BT: Tensor,
    clip_range: float,
    agg_mode: str,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    *,
    norm_constant: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO value loss, clipped around ``old_values_BT`` by ``clip_range`` (0 = unclipped).

    ``old_values_BT`` and ``returns_BT`` are targets (detached). Returns (loss, metrics), the loss
    aggregated as in ``aggregate_loss``; metrics are detached local masked means: "vf_clipfrac"
    (fraction of valid tokens where the clipped term is the larger one) and "vpred_mean".
    """
    assert values_BT.shape == old_values_BT.shape == returns_BT.shape == mask_BT.shape
    assert clip_range >= 0, f"clip_range={clip_range} must be >= 0 (0 = unclipped)"
    valid_BT = mask_BT.bool()
    # zero every input at padding: NaN/inf there would otherwise reach the gradient through (v - R)^2
    v_BT = torch.where(valid_BT, values_BT, 0.0)
    old_BT = torch.where(valid_BT, old_values_BT.detach(), 0.0)
    ret_BT = torch.where(valid_BT, returns_BT.detach(), 0.0)
    vf_BT = (v_BT - ret_BT).square()
    clipped_BT = torch.zeros_like(valid_BT)
    if clip_range > 0:
        v_clipped_BT = old_BT + torch.clamp(v_BT - old_BT, -clip_range, clip_range)
        vf_clipped_BT = (v_clipped_BT - ret_BT).square()
        clipped_BT = vf_clipped_BT > vf_BT
        vf_BT = torch.maximum(vf_BT, vf_clipped_BT)
    loss = aggregate_loss(0.5 * vf_BT, mask_BT, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs,
                          norm_constant=norm_constant)
    with torch.no_grad():
        metrics = {"vf_clipfrac": masked_mean(clipped_BT.float(), mask_BT), "vpred_mean": masked_mean(v_BT, mask_BT)}
    return loss, metrics


def _fp32_rowwise(fn, logits_BTV: Tensor) -> Tensor:
    """Apply fn to fp32 logits; low-precision inputs are upcast one row at a time,
    so at most one [T, V] fp32 copy exists instead of a [B, T, V] one."""
    if logits_BTV.dtype in (torch.float32, torch.float64):
        return fn(logits_BTV)
    return torch.stack([fn(row_TV.float()) for row_TV in logits_BTV])


def entropy_from_logits(logits_BTV: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position [B, T], in fp32:
    H = logsumexp(z) - sum_v softmax(z)_v * z_v, with z shifted by its max first
    so that the two terms do not cancel catastrophically for large logits."""

    def entropy(z: Tensor) -> Tensor:
        z = z - z.amax(dim=-1, keepdim=True).detach()
        return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)

    return _fp32_rowwise(entropy, logits_BTV)


def logprobs_from_logits(logits_BTV: Tensor, tokens_BT: Tensor) -> Tensor:
    """log softmax(logits)[token] per position [B, T], in fp32, computed as
    logits.gather(token) - logsumexp(logits) (no full log_softmax tensor)."""
    assert logits_BTV.shape[:-1] == tokens_BT.shape
    picked_BT = logits_BTV.gather(-1, tokens_BT.unsqueeze(-1)).squeeze(-1).float()
    lse_BT = _fp32_rowwise(lambda z: torch.logsumexp(z, dim=-1), logits_BTV)
    return picked_BT - lse_BT.float()
