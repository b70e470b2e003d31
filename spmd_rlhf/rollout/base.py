"""What every rollout engine takes and returns (DESIGN §5)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


@dataclass
class SamplingConfig:
    """How to sample completions.

    ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` switch those filters off.
    ``seed`` seeds this call's generator; callers give each generation replica its own seed
    (all tp ranks of one replica must pass the same one).
    """

    max_new_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"rollout.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"rollout.top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class Samples:
    """Completions, prompt-major: prompt ``i``'s ``n`` samples sit at ``[i*n, (i+1)*n)``.

    ``token_ids`` holds the generated tokens only (an emitted EOS included); ``logprobs[j][t]``
    is the log-probability of ``token_ids[j][t]`` under ``softmax(logits / T)`` before top-k/top-p
    (T = 1 when greedy), the quantity the actor recomputes. ``finish_reasons`` is ``"stop"``
    (EOS emitted) or ``"length"`` (max_new_tokens reached).
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]

    def __len__(self) -> int:
        return len(self.token_ids)


@runtime_checkable
class RolloutEngine(Protocol):
    """A generation engine hosting one tensor-parallel replica per tp group."""

    weight_version: int  # incremented by every load_weights
    # True: ``load_weights`` takes whole tensors in HF naming (``full_tensor()``), not tp slices
    wants_full_weights: bool

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> Samples:
        """Sample ``sampling.n`` completions for each of this rank's prompts."""
        ...

    def load_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """Copy tensor-parallel slices (``reshard_stream`` with ``param_shard_dims``) in, or
        whole tensors when ``wants_full_weights``."""
        ...

    def sleep(self) -> None:
        """Release what memory the engine can until ``wake``."""
        ...

    def wake(self) -> None:
        """Undo ``sleep``; weights must be (re)loaded if sleep dropped them."""
        ...


def gather_tp_prompts(tp_mesh: DeviceMesh, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
    """Concatenate the prompt lists of a tp group (rank order); returns them and this rank's offset.

    Every rank of one replica then submits the same requests, and keeps rows
    ``[offset * n, (offset + len(prompts)) * n)`` of the result.
    """
    if tp_mesh.size() == 1:
        return prompts, 0
    gathered: list[list[list[int]] | None] = [None] * tp_mesh.size()
    dist.all_gather_object(gathered, prompts, group=tp_mesh.get_group())
    rank = tp_mesh.get_local_rank()
    offset = sum(len(part) for part in gathered[:rank])
    return [p for part in gathered for p in part], offset
