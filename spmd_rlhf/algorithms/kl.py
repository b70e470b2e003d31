"""Per-token KL estimators between the policy and the reference model.

Implements the three Monte-Carlo estimators of KL(pi || pi_ref) from
J. Schulman, "Approximating KL Divergence" (2020), evaluated at tokens sampled
from pi, with log r = ref_logp - logp:

    k1 = -log r             = logp - ref_logp      (unbiased, high variance, can be < 0)
    k2 = 0.5 * (log r)^2                           (biased, low variance, >= 0)
    k3 = r - 1 - log r                             (unbiased, low variance, >= 0)

Departure from the note, following verl's ``low_var_kl``: for k3 the log-ratio
is clamped to [-20, 20] before ``exp`` and the result is clamped to [-10, 10],
so a single token with a huge log-ratio cannot blow up the loss (this makes k3
biased on such outliers). ``"low_var_kl"`` is accepted as an alias of ``"k3"``.
"""

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")


def kl_penalty(logprobs_BT: Tensor, ref_logprobs_BT: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate [B, T]; masking/aggregation is the caller's job."""
    assert logprobs_BT.shape == ref_logprobs_BT.shape
    if estimator == "k1":
        return logprobs_BT - ref_logprobs_BT
    if estimator == "k2":
        return 0.5 * (logprobs_BT - ref_logprobs_BT).square()
    if estimator in ("k3", "low_var_kl"):
        log_r_BT = torch.clamp(ref_logprobs_BT - logprobs_BT, min=-20.0, max=20.0)
        k3_BT = torch.exp(log_r_BT) - log_r_BT - 1.0
        return torch.clamp(k3_BT, min=-10.0, max=10.0)
    raise ValueError(f"algorithm.kl_estimator={estimator!r} is unknown; valid choices: {KL_ESTIMATORS}")
