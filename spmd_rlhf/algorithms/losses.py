"""Policy-gradient loss, loss aggregation and per-token quantities from logits.

``policy_loss`` implements the PPO clipped surrogate (Schulman et al., 2017)
with the decoupled clip range of DAPO (Yu et al., 2025, "clip-higher"):

    ratio = exp(logp - old_logp)
    loss  = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))

Departures from the papers:
  * The log-ratio is clamped to [-20, 20] before ``exp`` (as verl does), so a
    stale token cannot overflow the ratio.
  * No dual-clip (no bound on the loss for negative advantages).
  * An optional, detached per-token weight ``is_weights_BT`` multiplies the loss:
    truncated importance-sampling weights that correct for the mismatch between
    the inference engine that sampled the tokens and the trainer.
  * How per-token losses are reduced to a scalar is a choice (``aggregate_loss``):
    "token-mean" is DAPO's token-level loss, "seq-mean-token-mean" is the
    per-sequence average of the original GRPO, "seq-mean-token-sum" is the
    length-unnormalised sum of Dr. GRPO (divided by the number of sequences).

Masks are 0/1 (bool or float). Values at padded positions never reach the
result, not even as NaN or inf, and get zero gradient.
"""

import torch
from torch import Tensor

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


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
) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    Modes (len_b = mask_BT[b].sum()):
      "token-mean":          sum_{b,t} loss*mask / num_tokens   (default: mask.sum())
      "seq-mean-token-sum":  sum_b (sum_t loss*mask) / num_seqs (default: B)
      "seq-mean-token-mean": sum_b (sum_t loss*mask / max(len_b, 1)) / num_seqs (default: B);
                             an all-padding row adds 0 but still counts in B.

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
    if mode == "seq-mean-token-sum":
        per_seq_B = seq_sum_B
    elif mode == "seq-mean-token-mean":
        per_seq_B = seq_sum_B / mask_BT.sum(dim=-1).clamp(min=1)
    else:
        raise ValueError(f"algorithm.loss_agg_mode={mode!r} is unknown; valid choices: {LOSS_AGG_MODES}")
    denom = loss_BT.shape[0] if num_seqs is None else num_seqs
    return per_seq_B.sum() / denom


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
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with clip range [1 - clip_low, 1 + clip_high].

    Returns (loss, metrics). The loss is aggregated by ``aggregate_loss`` with
    ``agg_mode``, ``num_tokens`` and ``num_seqs``. Metrics are detached local
    masked means: "pg_clipfrac" (fraction of valid tokens where the clipped term
    is the larger one, i.e. the clip is active), "ppo_kl" (mean of
    old_logp - logp) and "ratio_mean".
    """
    assert logprobs_BT.shape == old_logprobs_BT.shape == advantages_BT.shape == mask_BT.shape
    # zero the log-ratio at padding so that NaN/inf there cannot leak into the gradient
    log_ratio_BT = torch.where(mask_BT.bool(), logprobs_BT - old_logprobs_BT, 0.0)
    log_ratio_BT = torch.clamp(log_ratio_BT, min=-20.0, max=20.0)
    ratio_BT = torch.exp(log_ratio_BT)
    pg1_BT = -advantages_BT * ratio_BT
    pg2_BT = -advantages_BT * torch.clamp(ratio_BT, 1.0 - clip_low, 1.0 + clip_high)
    loss_BT = torch.maximum(pg1_BT, pg2_BT)
    if is_weights_BT is not None:
        loss_BT = loss_BT * is_weights_BT.detach()
    loss = aggregate_loss(loss_BT, mask_BT, agg_mode, num_tokens=num_tokens, num_seqs=num_seqs)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((pg2_BT > pg1_BT).float(), mask_BT),
            "ppo_kl": masked_mean(old_logprobs_BT - logprobs_BT, mask_BT),
            "ratio_mean": masked_mean(ratio_BT, mask_BT),
        }
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
