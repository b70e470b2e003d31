"""Padded training tensors from (prompt, response) token lists, and their micro-batches.

Layout: each row is ``prompt + response`` right-padded to the longest row. Everything the losses
see is aligned with *predicted* tokens: column ``t`` of ``loss_mask_BT`` / logprobs refers to
token ``t + 1`` of ``input_ids``, i.e. to the logits at position ``t``. A response token is
predicted at column ``prompt_len + j - 1``.

A vision-language batch also carries each row's images (``vision``: ``VisionInputs`` or None per
row, on the host); the policy's forward turns a micro-batch's rows of it into pixel inputs and
M-RoPE positions (``models/vlm.vision_forward_kwargs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .vision import VisionInputs

TENSOR_FIELDS = ("input_ids_BT", "attention_mask_BT", "position_ids_BT", "loss_mask_BT")


@dataclass
class TokenBatch:
    input_ids_BT: torch.Tensor  # [B, T] prompt + response, right-padded
    attention_mask_BT: torch.Tensor  # [B, T]
    position_ids_BT: torch.Tensor  # [B, T]
    loss_mask_BT: torch.Tensor  # [B, T-1] float: 1 where column t predicts a response token
    vision: list[VisionInputs | None] | None = None  # per row, host tensors; None: a text-only batch

    def __post_init__(self) -> None:
        assert self.vision is None or len(self.vision) == self.input_ids_BT.shape[0], "one vision entry per row"

    @property
    def size(self) -> int:
        return self.input_ids_BT.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """The token tensors, in field order (what moves to the device and is shared across ranks)."""
        return [getattr(self, name) for name in TENSOR_FIELDS]

    def with_tensors(self, tensors: list[torch.Tensor]) -> TokenBatch:
        """The same rows with new token tensors (e.g. on the device); ``vision`` stays as it is."""
        return TokenBatch(*tensors, vision=self.vision)

    def vision_rows(self, rows: slice | torch.Tensor | list[int]) -> list[VisionInputs | None] | None:
        """The vision entries of ``rows`` (None for a text-only batch)."""
        if self.vision is None:
            return None
        if isinstance(rows, slice):
            return self.vision[rows]
        return [self.vision[i] for i in torch.as_tensor(rows).tolist()]

    def select(self, rows: slice | torch.Tensor) -> TokenBatch:
        """A subset of rows, trimmed to the longest remaining row."""
        picked = {name: getattr(self, name)[rows] for name in TENSOR_FIELDS}
        length = int(picked["attention_mask_BT"].sum(dim=1).max().item()) if picked["attention_mask_BT"].numel() else 1
        length = max(length, 2)
        return TokenBatch(
            input_ids_BT=picked["input_ids_BT"][:, :length],
            attention_mask_BT=picked["attention_mask_BT"][:, :length],
            position_ids_BT=picked["position_ids_BT"][:, :length],
            loss_mask_BT=picked["loss_mask_BT"][:, : length - 1],
            vision=self.vision_rows(rows),
        )

    def to(self, device: torch.device) -> TokenBatch:
        """The token tensors on ``device``; the images stay on the host (the forward moves a
        micro-batch's pixels itself)."""
        return self.with_tensors([t.to(device) for t in self.tensors()])


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
            response_masks: list[list[int]] | None = None,
            visions: list[VisionInputs | None] | None = None) -> TokenBatch:
    """Right-padded ``prompt + response`` rows with masks for the response tokens.

    ``response_masks`` (multi-turn rollouts): per response token, 1 to train on it, 0 for tokens
    the policy did not generate (tool output); None trains on every response token. ``visions``:
    each row's images (its prompt's); all None is the same as None, a text-only batch."""
    assert len(prompts) == len(responses) and prompts, "one response per prompt row, at least one row"
    assert response_masks is None or [len(m) for m in response_masks] == [len(r) for r in responses], \
        "one mask value per response token"
    length = max(2, max(len(p) + len(r) for p, r in zip(prompts, responses)))
    rows = len(prompts)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, length), dtype=torch.long)
    loss_mask = torch.zeros((rows, length - 1), dtype=torch.float32)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        assert prompt, "empty prompt"
        total = len(prompt) + len(response)
        input_ids[i, :total] = torch.tensor(prompt + response, dtype=torch.long)
        attention[i, :total] = 1
        if response_masks is None:
            loss_mask[i, len(prompt) - 1 : total - 1] = 1.0
        elif response:
            loss_mask[i, len(prompt) - 1 : total - 1] = torch.tensor(response_masks[i], dtype=torch.float32)
    positions = torch.arange(length).expand(rows, length).clone()
    if visions is not None and all(v is None for v in visions):
        visions = None
    return TokenBatch(input_ids, attention, positions, loss_mask, vision=visions)


def response_tensor(values: list[list[float]], like: TokenBatch, prompt_lengths: list[int]) -> torch.Tensor:
    """Per-response-token values (e.g. rollout logprobs) placed at their loss columns."""
    out = torch.zeros_like(like.loss_mask_BT)
    for i, (row, plen) in enumerate(zip(values, prompt_lengths)):
        if row:
            out[i, plen - 1 : plen - 1 + len(row)] = torch.tensor(row, dtype=out.dtype)
    return out


def micro_batches(num_rows: int, micro_batch_size: int) -> list[slice]:
    """Contiguous row ranges of at most ``micro_batch_size``."""
    return [slice(start, min(num_rows, start + micro_batch_size)) for start in range(0, num_rows, micro_batch_size)]
