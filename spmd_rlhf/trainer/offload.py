"""Move the actor's FSDP2 shards and optimizer state off the GPU while the engine generates.

With ``trainer.offload_actor_during_rollout`` the step runs: wake engine weights -> sync ->
actor and optimizer state to host memory -> wake KV cache -> generate -> sleep -> back to the GPU,
so the KV cache can use the room training needs the rest of the time. At build time the actor is
moved out while vLLM profiles free memory, so ``rollout.vllm.gpu_memory_utilization`` can count
on it. A no-op where the actor is not on a CUDA device, and where FSDP2 already keeps it in host
memory (``trainer.cpu_offload``, ``CPUOffloadPolicy``: moving it would fight the policy).
"""

from __future__ import annotations

import torch

from ..models.parallelize import cpu_offloaded


def move_actor(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device) -> None:
    """Move parameters (FSDP2 shards) and optimizer state tensors to ``device``.

    Optimizer ``step`` counters stay where they are (AdamW keeps them on the host unless fused or
    capturable). Gradients must already be freed (``zero_grad(set_to_none=True)``).
    """
    model.to(device)
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, value in state.items():
                if key != "step" and torch.is_tensor(value):
                    state[key] = value.to(device, non_blocking=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        if device.type == "cpu":
            torch.cuda.empty_cache()


class ActorOffload:
    """``with offload:`` keeps the actor in host memory for the block (CUDA only; already there under
    FSDP's CPU offload, where this does nothing)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device,
                 enabled: bool):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.enabled = enabled and device.type == "cuda" and not cpu_offloaded(model)

    def __enter__(self) -> ActorOffload:
        if self.enabled:
            move_actor(self.model, self.optimizer, torch.device("cpu"))
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            move_actor(self.model, self.optimizer, self.device)
