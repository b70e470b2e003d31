"""Failing well: out-of-memory messages that name the phase and the knob, and an abort after
too many non-finite steps in a row.

A non-finite loss or gradient makes the optimizer step a no-op (``Learner._finish_step``, actor
and critic, counts it); one such step is noise, ``trainer.max_consecutive_skips`` in a row means
the run has diverged and continuing would only burn GPU hours, so the run stops with a message.
"""

from __future__ import annotations

import contextlib

import torch

# phase -> what to turn down (or on) when it runs out of memory
OOM_KNOBS = {
    "reshard": "rollout.bucket_mb (smaller weight-sync buckets)",
    "generate": "rollout.vllm.gpu_memory_utilization (vLLM) or rollout.max_batch_size (torch engine), or "
                "trainer.offload_actor_during_rollout=true",
    "reference": "trainer.micro_batch_size (sequences per forward), or model.activation_checkpointing=true",
    "update": "trainer.micro_batch_size (sequences per forward/backward), or model.activation_checkpointing=true",
    "eval": "rollout.vllm.gpu_memory_utilization or rollout.max_batch_size",
}


class PhaseOutOfMemory(RuntimeError):
    """CUDA ran out of memory in a named phase of the step."""


@contextlib.contextmanager
def oom_hint(phase: str):
    """Re-raise an out-of-memory error with the phase that ran out and the knob to turn."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        knob = OOM_KNOBS.get(phase, "trainer.micro_batch_size")
        raise PhaseOutOfMemory(f"out of memory during the {phase} phase; lower {knob}. ({err})") from err


class NonFiniteGuard:
    """Counts steps in which an optimizer step was skipped for a non-finite gradient."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive = 0

    def after_step(self, skipped_this_step: bool, step: int) -> None:
        """Raise after ``max_consecutive`` steps in a row with a skipped optimizer step."""
        self.consecutive = self.consecutive + 1 if skipped_this_step else 0
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"step {step}: the loss or gradient was non-finite in {self.consecutive} consecutive steps "
                f"(trainer.max_consecutive_skips={self.max_consecutive}); the run has diverged. Resume from an "
                "earlier checkpoint with a lower trainer.lr, or check the rewards and data for NaN/inf"
            )
