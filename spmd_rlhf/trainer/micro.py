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

Sequence parallel (``distributed.sp`` > 1, packed only; ``distributed/ulysses.py``): ``share``
concatenates the token batches of the sp group, so its ranks plan the same micro-batches; each
packed row is padded to a multiple of sp, every rank runs the decoder and the head on its 1/sp of
the tokens, and the log-probs are summed over the group, so every sp rank returns the whole
micro-batch's (gradients reach each rank's own tokens only).

Vision-language batches (no sequence parallel; ``models/vlm.check_vision_language``): the plan
turns each micro-batch's rows into the forward's pixel inputs and M-RoPE positions once, on the
host, and moves them with the micro-batch (``Micro.vision``); packed, the positions take
transformers' packed form ``[4, 1, N]`` (text positions, then M-RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from transformers import PretrainedConfig

from ..data.batch import TokenBatch, micro_batches
from ..data.packing import PackedBatch, count_micro_batches, pack, plan_micro_batches
from ..distributed.comm import all_reduce_floats
from ..distributed.ulysses import local_span, share_rows, split_decoder, sum_over
from ..distributed.ulysses import sp_group as sp_group_of_process
from ..models.attention import packed_forward_kwargs, use_packed_attention
from ..models.logprobs import fused_policy_forward
from ..models.vlm import packed_vision_forward_kwargs, vision_forward_kwargs


@dataclass
class Micro:
    rows: slice | torch.Tensor  # rows of the batch (a LongTensor on the device when packed)
    width: int  # loss columns: the longest row's length - 1
    packed: PackedBatch | None = None  # device tensors of the packed layout
    sp_group: dist.ProcessGroup | None = None  # sequence parallel: the row is split over this group
    vision: dict[str, torch.Tensor] = field(default_factory=dict)  # device pixel inputs + M-RoPE positions


class MicroBatcher:
    """Plans micro-batches (``max_tokens`` > 0: packed up to that budget) and moves batches.
    ``sp_group``: the sequence-parallel group of packed micro-batches (default: the process's,
    ``ulysses.sp_group()``; padded micro-batches are never split)."""

    def __init__(self, max_tokens: int = 0, chunk_tokens: int = 4096, sp_group: dist.ProcessGroup | None = None):
        assert max_tokens is not None and max_tokens >= 0, "resolve trainer.max_tokens_per_micro_batch first"
        self.max_tokens = max_tokens
        self.chunk_tokens = chunk_tokens
        if sp_group is None and max_tokens > 0:
            sp_group = sp_group_of_process()
        self.sp_group = sp_group
        if self.sp_group is not None and dist.get_world_size(self.sp_group) == 1:
            self.sp_group = None
        assert self.sp_group is None or max_tokens > 0, "sequence parallel needs packed micro-batches (validated)"

    @property
    def sp(self) -> int:
        """Ranks each packed row is split over (1: no sequence parallelism)."""
        return 1 if self.sp_group is None else dist.get_world_size(self.sp_group)

    def share(self, batch: TokenBatch) -> tuple[TokenBatch, slice]:
        """The sp group's batches as one (same on its ranks), and this rank's rows in it."""
        if self.sp_group is None:
            return batch, slice(0, batch.size)
        assert batch.vision is None, "sequence parallel with images (check_vision_language refuses it)"
        tensors, own = share_rows(batch.tensors(), self.sp_group)
        return TokenBatch(*tensors), own

    def share_values(self, values_BT: torch.Tensor | None) -> torch.Tensor | None:
        """Per-token values of this rank's rows (e.g. advantages) laid out like ``share``'s batch."""
        if self.sp_group is None or values_BT is None:
            return values_BT
        return share_rows([values_BT], self.sp_group)[0][0]

    def prepare(self, model: torch.nn.Module) -> None:
        """Packed micro-batches need the variable-length attention (padded calls are unchanged)."""
        if self.max_tokens > 0:
            use_packed_attention(model)

    def to_device(self, batch: TokenBatch, device: torch.device) -> TokenBatch:
        if device.type != "cuda":
            return batch.to(device)
        return batch.with_tensors([t.pin_memory().to(device, non_blocking=True) for t in batch.tensors()])

    def plan(self, batch: TokenBatch, micro_batch_size: int, device: torch.device,
             hf_config: PretrainedConfig | None = None) -> list[Micro]:
        """Micro-batches of the host ``batch``; ``hf_config`` (the policy's) where it has images."""
        lengths = batch.attention_mask_BT.sum(dim=1).tolist()  # host tensor: no device sync
        if self.max_tokens <= 0:
            micros = [Micro(rows, max(2, max(lengths[rows])) - 1)
                      for rows in micro_batches(batch.size, micro_batch_size)]
            if batch.vision is not None:
                for micro in micros:
                    micro.vision = _vision_inputs(batch, micro, hf_config, device)
            return micros
        count = count_micro_batches(lengths, self.max_tokens)
        if dist.is_initialized():
            (count,) = all_reduce_floats([float(count)], op=dist.ReduceOp.MAX)
        micros = []
        for rows in plan_micro_batches(lengths, self.max_tokens, num_micro=int(count)):
            packed = pack(batch, rows).padded(self.sp)  # rows == []: a masked dummy
            vision = _packed_vision_inputs(batch, packed, hf_config, device) if batch.vision is not None else {}
            index = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
            micros.append(Micro(index, packed.width, packed.to(device, non_blocking=True), self.sp_group, vision))
        return micros


def _vision_inputs(batch: TokenBatch, micro: Micro, hf_config: PretrainedConfig | None,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """The device pixel inputs and M-RoPE positions of a padded micro-batch's rows."""
    assert hf_config is not None, "a batch with images needs the policy's config to plan"
    w = micro.width + 1
    rows = micro.rows
    inputs = vision_forward_kwargs(hf_config, batch.input_ids_BT[rows, :w], batch.attention_mask_BT[rows, :w],
                                   batch.vision_rows(rows))
    return {name: t.to(device, non_blocking=True) for name, t in inputs.items()}


def _packed_vision_inputs(batch: TokenBatch, packed: PackedBatch, hf_config: PretrainedConfig | None,
                          device: torch.device) -> dict[str, torch.Tensor]:
    """The device pixel inputs and packed M-RoPE positions of a packed micro-batch (host ``packed``)."""
    assert hf_config is not None, "a batch with images needs the policy's config to plan"
    if not packed.rows:
        return {}
    assert packed.num_tokens == sum(packed.lengths), "sequence parallel filler with images (refused)"
    index = torch.tensor(packed.rows, dtype=torch.long)
    inputs = packed_vision_forward_kwargs(hf_config, batch.input_ids_BT[index], batch.attention_mask_BT[index],
                                          batch.vision_rows(packed.rows), packed.position_ids_1N)
    return {name: t.to(device, non_blocking=True) for name, t in inputs.items()}


def micro_logprobs(model: torch.nn.Module, micro: Micro, batch: TokenBatch, temperature: float, chunk_tokens: int,
                   with_entropy: bool = False, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 ``(logprobs, entropy or None)`` of the micro-batch's rows, ``[rows, micro.width]``,
    zero off the loss mask. ``batch`` is the device copy the plan was made for."""
    mask_BT = batch.loss_mask_BT[micro.rows, : micro.width]
    if micro.packed is None:
        w = micro.width + 1
        vision = dict(micro.vision)
        positions = vision.pop("position_ids", batch.position_ids_BT[micro.rows, :w])
        return fused_policy_forward(model, batch.input_ids_BT[micro.rows, :w], batch.attention_mask_BT[micro.rows, :w],
                                    positions, mask_BT.bool(), temperature, with_entropy=with_entropy,
                                    entropy_requires_grad=entropy_grad, chunk_tokens=chunk_tokens, **vision)
    p = micro.packed
    if micro.sp_group is None:
        vision = dict(micro.vision)
        positions = vision.pop("position_ids", p.position_ids_1N)
        logprobs_1M, entropy_1M = fused_policy_forward(
            model, p.input_ids_1N, None, positions, p.loss_mask_1M.bool(), temperature,
            with_entropy=with_entropy, entropy_requires_grad=entropy_grad, chunk_tokens=chunk_tokens,
            **packed_forward_kwargs(p), **vision)
    else:
        logprobs_1M, entropy_1M = _sequence_parallel_logprobs(model, p, micro.sp_group, temperature, chunk_tokens,
                                                              with_entropy, entropy_grad)
    return p.unpack(logprobs_1M, mask_BT.shape), (p.unpack(entropy_1M, mask_BT.shape) if entropy_1M is not None else None)


def _sequence_parallel_logprobs(model: torch.nn.Module, p: PackedBatch, group: dist.ProcessGroup, temperature: float,
                                chunk_tokens: int, with_entropy: bool,
                                entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[1, M]`` log-probs (and entropies) of the whole packed row on every rank of ``group``;
    this rank runs the decoder and the head on its slice of the tokens only."""
    start, stop = local_span(p.num_tokens, group)
    select_1M = p.loss_mask_1M.bool().clone()
    select_1M[:, :start] = False
    select_1M[:, stop:] = False
    with split_decoder(model.get_decoder(), group):
        logprobs_1M, entropy_1M = fused_policy_forward(
            model, p.input_ids_1N, None, p.position_ids_1N, select_1M, temperature, with_entropy=with_entropy,
            entropy_requires_grad=entropy_grad, chunk_tokens=chunk_tokens, **packed_forward_kwargs(p))
    return sum_over(logprobs_1M, group), (sum_over(entropy_1M, group) if entropy_1M is not None else None)


def token_logits(model: torch.nn.Module, batch: TokenBatch, temperature: float) -> torch.Tensor:
    """Full fp32 logits at every position that predicts a next token, divided by the temperature
    (the reference path: SFT warm start and tests; training uses ``micro_logprobs``). A batch with
    images passes its pixels and M-RoPE positions (``batch`` on the model's device)."""
    inputs = {"position_ids": batch.position_ids_BT}
    if batch.vision is not None:
        device = batch.input_ids_BT.device
        inputs.update({name: t.to(device) for name, t in vision_forward_kwargs(
            model.config, batch.input_ids_BT.cpu(), batch.attention_mask_BT.cpu(), batch.vision).items()})
    out = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT, use_cache=False, **inputs)
    logits = out.logits[:, :-1].float()
    return logits / temperature if temperature not in (0.0, 1.0) else logits
