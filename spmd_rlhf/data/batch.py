"""Padded training tensors from (prompt, response) token lists, and their micro-batches.

Layout: each row is ``prompt + response`` right-padded to the longest row. Everything the losses
see is aligned with *predicted* tokens: column ``t`` of ``loss_mask_BT`` / logprobs refers to
token ``t + 1`` of ``input_ids``, i.e. to the logits at position ``t``. A response token is
predicted at column ``prompt_len + j - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class TokenBatch:
    input_ids_BT: torch.Tensor  # [B, T] prompt + response, right-padded
    attention_mask_BT: torch.Tensor  # [B, T]
    position_ids_BT: torch.Tensor  # [B, T]
    loss_mask_BT: torch.Tensor  # [B, T-1] float: 1 where column t predicts a response token

    @property
    def size(self) -> int:
        return self.input_ids_BT.shape[0]

    def select(self, rows: slice | torch.Tensor) -> TokenBatch:
        """A subset of rows, trimmed to the longest remaining row."""
        picked = {f.name: getattr(self, f.name)[rows] for f in fields(self)}
        length = int(picked["attention_mask_BT"].sum(dim=1).max().item()) if picked["attention_mask_BT"].numel() else 1
        length = max(length, 2)
        return TokenBatch(
            input_ids_BT=picked["input_ids_BT"][:, :length],
            attention_mask_BT=picked["attention_mask_BT"][:, :length],
            position_ids_BT=picked["position_ids_BT"][:, :length],
            loss_mask_BT=picked["loss_mask_BT"][:, : length - 1],
        )

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
            response_masks: list[list[int]] | None = None) -> TokenBatch:
    """Right-padded ``prompt + response`` rows with masks for the response tokens.

    ``response_masks`` (multi-turn rollouts): per response token, 1 to train on it, 0 for tokens
    the policy did not generate (tool output); None trains on every response token."""
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
    return TokenBatch(input_ids, attention, positions, loss_mask)


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
