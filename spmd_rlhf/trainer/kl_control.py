"""KL to the reference, measured and acted on: the in-reward coefficient and the KL guard.

* ``algorithm.kl_in_reward``: a fixed or adaptive (Ziegler et al., 2019) coefficient for the
  per-token KL penalty subtracted from the reward; the adaptive one is updated after every step
  with the measured KL (mean over the batch of the per-sequence KL sum) and the global batch size.
* ``algorithm.kl_guard``: when the measured per-token KL (k3, mean over every rank's response
  tokens, before the update) exceeds ``max_kl``, the step's update is skipped and the learning
  rate's base is multiplied by ``lr_decay`` (it stays lowered); each event is counted and logged.
"""

from __future__ import annotations

import torch

from ..algorithms.kl import AdaptiveKLController, FixedKLController, kl_penalty
from ..algorithms.losses import masked_sum
from ..config import AlgorithmConfig
from ..distributed.comm import all_reduce_floats


class KLControl:
    def __init__(self, algo: AlgorithmConfig):
        kr = algo.kl_in_reward
        self.reward_controller = None
        if kr.enable:
            self.reward_controller = (AdaptiveKLController(kr.coef, kr.target, kr.horizon) if kr.controller == "adaptive"
                                      else FixedKLController(kr.coef))
        self.reward_estimator = kr.estimator
        self.max_kl = algo.kl_guard.max_kl
        self.lr_decay = algo.kl_guard.lr_decay
        self.guard_skips = 0
        self.lr_scale = 1.0

    @property
    def needs_reference(self) -> bool:
        return self.reward_controller is not None or self.max_kl > 0

    def reward_penalty_BT(self, old_BT: torch.Tensor, ref_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        """Per-token KL for the reward (0 off the response); the caller scales by ``coef``."""
        return torch.where(mask_BT.bool(), kl_penalty(old_BT, ref_BT, self.reward_estimator), 0.0)

    @property
    def coef(self) -> float:
        return 0.0 if self.reward_controller is None else self.reward_controller.value

    def after_step(self, kl_BT: torch.Tensor, mask_BT: torch.Tensor) -> dict[str, float]:
        """Update the adaptive coefficient with this step's per-sequence KL; returns metrics."""
        if self.reward_controller is None:
            return {}
        seq_kl_sum, seqs = all_reduce_floats([float(masked_sum(kl_BT, mask_BT)), float(kl_BT.shape[0])])
        current = seq_kl_sum / max(seqs, 1.0)
        coef = self.coef
        self.reward_controller.update(current, int(seqs))
        return {"actor/kl_in_reward": current, "actor/kl_coef": coef}

    def measured_kl(self, old_BT: torch.Tensor, ref_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
        """Mean per-token k3 KL to the reference over every rank's response tokens."""
        total, count = all_reduce_floats([float(masked_sum(kl_penalty(old_BT, ref_BT, "k3"), mask_BT)),
                                    float(mask_BT.sum())])
        return total / max(count, 1.0)

    def guard(self, kl: float, schedulers: list) -> bool:
        """True when the update must be skipped; lowers the learning rates of ``schedulers``."""
        if self.max_kl <= 0 or kl <= self.max_kl:
            return False
        self.guard_skips += 1
        self.lr_scale *= self.lr_decay
        for scheduler in schedulers:
            scheduler.base_lrs = [lr * self.lr_decay for lr in scheduler.base_lrs]
            for group in scheduler.optimizer.param_groups:
                group["lr"] *= self.lr_decay
        return True

    def state_dict(self) -> dict:
        state = {"guard_skips": self.guard_skips, "lr_scale": self.lr_scale}
        if self.reward_controller is not None:
            state["reward_controller"] = self.reward_controller.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.guard_skips = state["guard_skips"]
        self.lr_scale = state["lr_scale"]
        if self.reward_controller is not None and "reward_controller" in state:
            self.reward_controller.load_state_dict(state["reward_controller"])
