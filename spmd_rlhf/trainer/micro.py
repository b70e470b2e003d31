"""Micro-batches of a token batch, and the policy's log-probs on one of them.

Two layouts, one contract (``micro_logprobs`` returns ``[rows, width]`` tensors aligned with the
batch's ``loss_mask_BT`` columns, zero off the mask):

* padded (``trainer.max_tokens_per_micro_batch=0``): contiguous runs of ``micro_batch_size``
  rows, trimmed to their longest row;
* packed (``> 0``): rows grouped up to the token budget and concatenated without padding
  (``data/packing.py``), positions restarting per sequence, variable-length attention
  (``models/attention.py``). Every rank runs the same number of micro-batches (FSDP2 gathers
  and reduces per micro-batch), agreed by one all-reduce per plan.

Plans are made from the host copy of the batch (no device reads); the batch itself moves to the
device once, from pinned memory.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from ..data.batch import TokenBatch, micro_batches
from ..data.packing import PackedBatch, count_micro_batches, pack, plan_micro_batches
from ..distributed.comm import all_reduce_floats
from ..models.attention import packed_forward_kwargs, use_packed_attention
from ..models.logprobs import fused_policy_forward


@dataclass
class Micro:
    rows: slice | torch.Tensor  # rows of the batch (a LongTensor on the device when packed)
    width: int  # loss columns: the longest row's length - 1
    packed: PackedBatch | None = None  # device tensors of the packed layout


class MicroBatcher:
    """Plans micro-batches (``max_tokens`` > 0: packed up to that budget) and moves batches."""

    def __init__(self, max_tokens: int = 0, chunk_tokens: int = 4096):
        assert max_tokens is not None and max_tokens >= 0, "resolve trainer.max_tokens_per_micro_batch first"
        self.max_tokens = max_tokens
        self.chunk_tokens = chunk_tokens

    def prepare(self, model: torch.nn.Module) -> None:
        """Packed micro-batches need the variable-length attention (padded calls are unchanged)."""
        if self.max_tokens > 0:
            use_packed_attention(model)

    def to_device(self, batch: TokenBatch, device: torch.device) -> TokenBatch:
        if device.type != "cuda":
            return batch.to(device)
        return TokenBatch(**{f.name: getattr(batch, f.name).pin_memory().to(device, non_blocking=True)
                             for f in fields(batch)})

    def plan(self, batch: TokenBatch, micro_batch_size: int, device: torch.device) -> list[Micro]:
        lengths = batch.attention_mask_BT.sum(dim=1).tolist()  # host tensor: no device sync
        if self.max_tokens <= 0:
            return [Micro(rows, max(2, max(lengths[rows])) - 1) for rows in micro_batches(batch.size, micro_batch_size)]
        count = count_micro_batches(lengths, self.max_tokens)
        if dist.is_initialized():
            (count,) = all_reduce_floats([float(count)], op=dist.ReduceOp.MAX)
        micros = []
        for rows in plan_micro_batches(lengths, self.max_tokens, num_micro=int(count)):
            packed = pack(batch, rows).to(device, non_blocking=True)  # rows == []: a masked dummy
            index = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
            micros.append(Micro(index, packed.width, packed))
        return micros


def micro_logprobs(model: torch.nn.Module, micro: Micro, batch: TokenBatch, temperature: float, chunk_tokens: int,
                   with_entropy: bool = False, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 ``(logprobs, entropy or None)`` of the micro-batch's rows, ``[rows, micro.width]``,
    zero off the loss mask. ``batch`` is the device copy the plan was made for."""
    mask_BT = batch.loss_mask_BT[micro.rows, : micro.width]
    if micro.packed is None:
        w = micro.width + 1
        return fused_policy_forward(model, batch.input_ids_BT[micro.rows, :w], batch.attention_mask_BT[micro.rows, :w],
                                    batch.position_ids_BT[micro.rows, :w], mask_BT.bool(), temperature,
                                    with_entropy=with_entropy, entropy_requires_grad=entropy_grad,
                                    chunk_tokens=chunk_tokens)
    p = micro.packed
    logprobs_1M, entropy_1M = fused_policy_forward(
        model, p.input_ids_1N, None, p.position_ids_1N, p.loss_mask_1M.bool(), temperature, with_entropy=with_entropy,
        entropy_requires_grad=entropy_grad, chunk_tokens=chunk_tokens, **packed_forward_kwargs(p))
    return p.unpack(logprobs_1M, mask_BT.shape), (p.unpack(entropy_1M, mask_BT.shape) if entropy_1M is not None else None)


def token_logits(model: torch.nn.Module, batch: TokenBatch, temperature: float) -> torch.Tensor:
    """Full fp32 logits at every position that predicts a next token, divided by the temperature
    (the reference path: SFT warm start and tests; training uses ``micro_logprobs``)."""
    out = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT,
                position_ids=batch.position_ids_BT, use_cache=False)
    logits = out.logits[:, :-1].float()
    return logits / temperature if temperature not in (0.0, 1.0) else logits
