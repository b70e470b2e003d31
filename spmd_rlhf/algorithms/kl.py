"""KL between the policy and the reference model: per-token estimators, the KL-in-reward
penalty and its coefficient controllers.

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

The KL can also be paid in the reward instead of the loss (Ouyang et al., 2022, "InstructGPT",
following Ziegler et al., 2019): ``kl_reward_penalty`` subtracts ``coef * kl`` from every
response token's reward. The coefficient is fixed (``FixedKLController``) or adapted toward a
target KL (``AdaptiveKLController``, Ziegler et al., 2019, "Fine-Tuning Language Models from
Human Preferences"):

    error = clip(current_kl / target - 1, -0.2, 0.2)
    coef  = coef * (1 + error * n_steps / horizon)

as in the paper, with ``n_steps`` the number of samples of the batch that measured ``current_kl``.
Both controllers keep one plain float and checkpoint it through ``state_dict``.
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


def kl_reward_penalty(token_rewards_BT: Tensor, kl_BT: Tensor, mask_BT: Tensor, coef: float) -> Tensor:
    """Token rewards minus ``coef * kl`` on valid columns, 0 at padding (a target: no gradient)."""
    assert token_rewards_BT.shape == kl_BT.shape == mask_BT.shape
    return torch.where(mask_BT.bool(), token_rewards_BT.detach() - coef * kl_BT.detach(), 0.0)


class _KLController:
    """A KL coefficient ``value`` (a plain float) with checkpoint state."""

    def __init__(self, coef: float):
        if coef < 0:
            raise ValueError(f"algorithm.kl_in_reward.coef={coef} must be >= 0; set it to a non-negative value")
        self.value = float(coef)

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController(_KLController):
    """A constant KL coefficient."""

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController(_KLController):
    """The coefficient grows when the measured KL is above ``target`` and shrinks when below, by at
    most 20% per ``horizon`` samples (Ziegler et al., 2019)."""

    def __init__(self, init_coef: float, target: float, horizon: int):
        super().__init__(init_coef)
        if target <= 0:
            raise ValueError(f"algorithm.kl_in_reward.target={target} must be > 0; set the KL to steer toward")
        if horizon <= 0:
            raise ValueError(f"algorithm.kl_in_reward.horizon={horizon} must be > 0; set it to e.g. 10000 samples")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
