"""The trainer's own state between steps, as checkpoint components (DESIGN §8).

``TrainState`` holds the step; ``Counters`` saves it with the other counters every training rank
agrees on (loader position, KL control, skip counters, the engines' weight version); ``PerRank``
wraps a component whose state differs per rank (the replay buffer, the in-flight batches of split
placement), saved in per-rank files.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.loader import PromptLoader
from .faults import NonFiniteGuard
from .kl_control import KLControl


@dataclass
class TrainState:
    """Where a run is: ``step`` updates done (the policy version)."""

    step: int = 0
    saved_step: int | None = None  # step of the last checkpoint this process wrote


class Counters:
    """The checkpoint component of the scalar state: ``TrainState``, the loader, KL control, the
    learners' skip counters and the rollouts' ``weight_version`` (logged as
    ``rollout/weight_version``; a resumed run continues it)."""

    def __init__(self, state: TrainState, loader: PromptLoader, kl_control: KLControl, non_finite: NonFiniteGuard,
                 actor, critic, rollouts):
        self.state = state
        self.loader = loader
        self.kl_control = kl_control
        self.non_finite = non_finite
        self.actor = actor
        self.critic = critic
        self.rollouts = rollouts

    def state_dict(self) -> dict:
        return {"step": self.state.step, "loader": self.loader.state_dict(),
                "kl_control": self.kl_control.state_dict(), "actor_skipped_steps": self.actor.skipped_steps,
                "non_finite_in_a_row": self.non_finite.consecutive,
                "critic_skipped_steps": self.critic.skipped_steps if self.critic is not None else 0,
                "engine_weight_version": self.rollouts.weight_version}

    def load_state_dict(self, state: dict) -> None:
        self.state.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        self.kl_control.load_state_dict(state["kl_control"])
        self.actor.skipped_steps = int(state["actor_skipped_steps"])
        self.non_finite.consecutive = int(state["non_finite_in_a_row"])
        if self.critic is not None:
            self.critic.skipped_steps = int(state["critic_skipped_steps"])
        self.rollouts.weight_version = int(state["engine_weight_version"])


class PerRank:
    """A component whose state differs per rank: saved in per-rank files."""

    per_rank = True

    def __init__(self, component):
        self.component = component

    def state_dict(self) -> dict:
        return self.component.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.component.load_state_dict(state)
