"""What every rollout engine takes and returns (DESIGN §5)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..data.vision import VisionInputs


@dataclass
class SamplingConfig:
    """How to sample completions.

    ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` switch those filters off.
    ``seed`` seeds the call: with per-prompt ``seeds`` given to ``generate``, each sample draws
    from a stream keyed by (``seed``, its prompt's seed, its index); without them, one generator
    per replica (all tp ranks of one replica must pass the same ``seed``).
    """

    max_new_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    # token-id sequences that end a row once its generated tokens end with one (kept in the output,
    # finish reason "stop"); TorchEngine honours any, vLLM (no tokenizer) the one-token ones
    stop_sequences: tuple[tuple[int, ...], ...] = ()

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
        assert all(len(seq) > 0 for seq in self.stop_sequences), "an empty stop sequence"

    def single_token_stops(self) -> list[int]:
        """The token ids of the one-token stop sequences (what an engine with stop ids only can honour)."""
        return sorted({seq[0] for seq in self.stop_sequences if len(seq) == 1})


@dataclass
class Samples:
    """Completions, prompt-major: prompt ``i``'s ``n`` samples sit at ``[i*n, (i+1)*n)``.

    ``token_ids`` holds the generated tokens only (an emitted EOS included); ``logprobs[j][t]``
    is the log-probability of ``token_ids[j][t]`` under ``softmax(logits / T)`` before top-k/top-p
    (T = 1 when greedy), the quantity the actor recomputes. ``finish_reasons`` is ``"stop"``
    (EOS or a stop sequence emitted) or ``"length"`` (max_new_tokens reached).

    ``loss_masks`` (multi-turn rollouts, ``rollout/multi_turn.py``): per token of ``token_ids``, 1
    where the policy generated it and 0 where it was inserted (tool output, chat-template tokens
    around it; their logprobs are 0). None: every token was generated.
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    loss_masks: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.token_ids)


@runtime_checkable
class RolloutEngine(Protocol):
    """A generation engine hosting one tensor-parallel replica per tp group.

    Everything the trainer and the weight sync read of an engine is declared here; ``EngineBase``
    gives the defaults an engine may keep.
    """

    weight_version: int  # incremented by every load_weights
    # True: ``load_weights`` takes whole tensors in HF naming (``full_tensor()``), not tp slices
    wants_full_weights: bool
    dtype: torch.dtype  # the weight sync casts to it before sending

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig,
                 seeds: list[int] | None = None, vision: list[VisionInputs | None] | None = None) -> Samples:
        """Sample ``sampling.n`` completions for each of this rank's prompts; ``seeds`` (one per
        prompt) make a prompt's samples independent of which replica draws them and of its batch;
        ``vision`` (one per prompt, None: no images) holds the images of a vision-language policy's
        prompts, whose token ids carry their expanded placeholders."""
        ...

    def load_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """Copy tensor-parallel slices (``reshard_stream`` with ``shard_dims``) in, or
        whole tensors when ``wants_full_weights``."""
        ...

    def shard_dims(self, dims: dict[str, int | None]) -> dict[str, int | None]:
        """The trainer's tensor-parallel plan (``distributed/tp_plan.py``) adjusted to how this
        engine lays its parameters out."""
        ...

    def sleep(self) -> None:
        """Release what memory the engine can until ``wake``."""
        ...

    def wake(self) -> None:
        """Undo ``sleep``; weights must be (re)loaded if sleep dropped them."""
        ...

    def close(self) -> None:
        """Release the engine's resources; called once, while the process group is alive."""
        ...


class EngineBase:
    """The protocol's defaults, spelled out: tp slices in the trainer's plan unchanged, nothing to
    release on sleep or close, version 0 before the first sync."""

    weight_version: int = 0
    wants_full_weights: bool = False
    dtype: torch.dtype = torch.float32

    def shard_dims(self, dims: dict[str, int | None]) -> dict[str, int | None]:
        return dims

    def sleep(self) -> None:
        return None

    def wake(self) -> None:
        return None

    def close(self) -> None:
        return None


def sample_seeds(seed: int, prompt_ids: list[int], n: int) -> list[int]:
    """One 63-bit seed per sample (prompt-major): splitmix64 of (call seed, prompt id, sample j).

    ``prompt_ids`` identify prompts independently of placement (the dataset index), so a sample's
    random stream is the same whichever rank or replica draws it."""
    mask = (1 << 64) - 1
    out = []
    for pid in prompt_ids:
        for j in range(n):
            x = (seed * 0x9E3779B97F4A7C15 + (pid + 1) * 0xBF58476D1CE4E5B9 + (j + 1) * 0x94D049BB133111EB) & mask
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
            out.append((x ^ (x >> 31)) >> 1)
    return out


def gather_tp_prompts(tp_mesh: DeviceMesh, prompts: list) -> tuple[list, int]:
    """Concatenate the prompt lists (or any per-prompt lists) of a tp group (rank order); returns
    them and this rank's offset.

    Every rank of one replica then submits the same requests, and keeps rows
    ``[offset * n, (offset + len(prompts)) * n)`` of the result.
    """
    if tp_mesh.size() == 1:
        return prompts, 0
    gathered: list[list | None] = [None] * tp_mesh.size()
    dist.all_gather_object(gathered, prompts, group=tp_mesh.get_group())
    rank = tp_mesh.get_local_rank()
    offset = sum(len(part) for part in gathered[:rank])
    return [p for part in gathered for p in part], offset
