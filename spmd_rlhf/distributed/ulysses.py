"""DeepSpeed-Ulysses sequence parallelism: one packed row split over the ``sp`` ranks of a group.

Every rank of an sp group holds the same packed micro-batch and runs the decoder on its own
contiguous 1/sp of the tokens (embeddings, MLPs, norms, rotary at the row's own positions).
Around attention, an all-to-all turns ``(tokens/sp, all heads)`` into ``(all tokens, heads/sp)``,
the variable-length attention runs on the whole row with the whole row's sequence boundaries,
and the inverse all-to-all turns it back. Each all-to-all's backward is the other one.

Pieces (no model code here; ``models/attention.py`` and ``trainer/micro.py`` use them):

* ``share_rows``: the sp group's token batches concatenated (every sp rank then plans the same
  micro-batches), and which rows are this rank's own;
* ``split_decoder``: forward hooks that hand the decoder this rank's token slice and give back a
  full-length hidden state, zero outside the slice (so the head scores local tokens only);
* ``ulysses_attention``: the all-to-all around an attention function;
* ``sum_over``: per-token values summed over the group, identity backward (each rank's tokens are
  nonzero on that rank only, so the sum is the full row on every rank, exactly).

The sp group of this process is set once by ``distributed.topology.init_distributed``
(``use_sp_group``); ``sp_group()`` is None without sequence parallelism.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .comm import collective_device

_SP_GROUP: dist.ProcessGroup | None = None


def use_sp_group(group: dist.ProcessGroup | None) -> None:
    """Make ``group`` this process's sequence-parallel group (None: no sequence parallelism)."""
    global _SP_GROUP
    _SP_GROUP = group


def sp_group() -> dist.ProcessGroup | None:
    """This process's sequence-parallel group, or None."""
    return _SP_GROUP


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Chunk ``scatter_dim`` over the ranks (chunk j to rank j); concatenate what arrives along ``gather_dim``."""
    size = dist.get_world_size(group)
    assert x.shape[scatter_dim] % size == 0, f"dim {scatter_dim} of {tuple(x.shape)} over {size} ranks"
    send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Differentiable all-to-all: ``scatter_dim`` shrinks by the group size, ``gather_dim`` grows by it."""
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def ulysses_attention(attention: Callable, group: dist.ProcessGroup, module: torch.nn.Module, query: torch.Tensor,
                      key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """Run ``attention`` (transformers' interface: q ``[1, H, L, D]``, k/v ``[1, Hkv, L, D]`` in,
    ``[1, L, H, D]`` out) on the whole row: heads split over the group around it. ``kwargs`` must
    carry the whole row's sequence boundaries."""
    q, k, v = (all_to_all(t, group, scatter_dim=1, gather_dim=2) for t in (query, key, value))
    out_1NhD, _ = attention(module, q, k, v, attention_mask, **kwargs)
    return all_to_all(out_1NhD, group, scatter_dim=1, gather_dim=2), None


class _SumOver(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``x`` summed over the group; the gradient passes unchanged (every rank computes the same loss
    from the sum, and each rank's part of ``x`` depends on its own tokens only)."""
    return _SumOver.apply(x, group)


def local_span(length: int, group: dist.ProcessGroup) -> tuple[int, int]:
    """This rank's ``[start, stop)`` of a row of ``length`` tokens (a multiple of the group size)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    assert length % size == 0, f"a row of {length} tokens does not split over {size} ranks: pad it first"
    chunk = length // size
    return rank * chunk, (rank + 1) * chunk


@contextlib.contextmanager
def split_decoder(decoder: torch.nn.Module, group: dist.ProcessGroup) -> Iterator[None]:
    """While open, ``decoder(input_ids=[1, N], position_ids=[1, N], ...)`` runs on this rank's
    slice of the tokens (positions: the row's own), passes ``sp_group`` to the attention, and
    returns ``last_hidden_state`` ``[1, N, H]``: this rank's slice, zero elsewhere (differentiable)."""
    span: list[tuple[int, int, int]] = []

    def before(module, args, kwargs):
        assert not args, "call the decoder with keyword arguments"
        length = kwargs["input_ids"].shape[1]
        start, stop = local_span(length, group)
        span.append((start, stop, length))
        kwargs = dict(kwargs, sp_group=group)
        for name in ("input_ids", "position_ids"):
            kwargs[name] = kwargs[name][:, start:stop]
        return args, kwargs

    def after(module, args, kwargs, output):
        start, stop, length = span.pop()
        output.last_hidden_state = F.pad(output.last_hidden_state, (0, 0, start, length - stop))
        return output

    handles = [decoder.register_forward_pre_hook(before, with_kwargs=True),
               decoder.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _gather_padded(tensor: torch.Tensor, sizes: list[list[int]], group: dist.ProcessGroup,
                   device: torch.device) -> torch.Tensor:
    """Every rank's ``tensor`` (shapes ``sizes``), rows concatenated in rank order, other dims
    right-padded with zeros to the largest."""
    widest = [max(s[d] for s in sizes) for d in range(tensor.dim())]
    pad = [p for d in reversed(range(tensor.dim())) for p in (0, widest[d] - tensor.shape[d])]
    dtype = torch.uint8 if tensor.dtype == torch.bool else tensor.dtype
    local = F.pad(tensor.to(device=device, dtype=dtype), pad)
    pieces = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(pieces, local, group=group)
    rows = [piece[: s[0]] for piece, s in zip(pieces, sizes)]
    return torch.cat(rows).to(device=tensor.device, dtype=tensor.dtype)


def share_rows(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> tuple[list[torch.Tensor], slice]:
    """Each tensor (same number of rows on this rank) concatenated over the group's ranks in rank
    order, zero-padded to the widest; and the slice of the result that holds this rank's rows."""
    assert tensors and len({t.shape[0] for t in tensors}) == 1, "tensors of one batch: same rows"
    device = collective_device(group)
    shapes = torch.tensor([list(t.shape) + [0] * (3 - t.dim()) for t in tensors], dtype=torch.long, device=device)
    gathered = [torch.empty_like(shapes) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, shapes, group=group)
    per_rank = [g.tolist() for g in gathered]  # [rank][tensor] -> shape (padded to 3 dims)
    out = [_gather_padded(t, [shape[i][: t.dim()] for shape in per_rank], group, device) for i, t in enumerate(tensors)]
    rank = dist.get_rank(group)
    start = sum(shape[0][0] for shape in per_rank[:rank])
    return out, slice(start, start + tensors[0].shape[0])
