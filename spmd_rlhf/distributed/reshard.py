"""Actor -> rollout resharding by DTensor ``redistribute`` (DESIGN §4).

FSDP2 keeps each parameter as a DTensor ``Shard(0)`` over ``dp_shard`` (torch.chunk semantics:
``ceil(N / S)`` rows per rank, the last ranks shorter or empty). The rollout engine wants, on
every rank, its tensor-parallel slice: column-parallel weights split on dim 0, row-parallel on
dim 1, norms whole. On the reshard mesh ``(dp_replicate, gen_in_shard, tp)`` the FSDP layout is
``[Replicate(), Shard(0), Shard(0)]`` and the target is ``[Replicate(), Replicate(), Shard(d)]``,
so each rank receives 1/tp of every tensor, never all of it.

Uneven shapes. The FSDP layout equals the nested mesh layout only when dim 0 divides by
``dp_shard``, so the source is the FSDP shard zero-padded to ``ceil(N/S)`` rows (exactly FSDP2's
own padding). Padding rows are cut where dim 0 is whole on every rank:
* ``d = 1`` (row-parallel): one redistribute, then drop the padded rows;
* ``d = 0`` (column-parallel), ``N % S != 0``: redistribute to ``Shard(1)`` first (dim 0 whole),
  drop the padding, re-wrap at the true shape, then redistribute to ``Shard(0)`` over tp, which
  gives torch.chunk's uneven tp slices;
* replicated tensors and uneven 1-D column-parallel tensors (biases) go through ``Replicate``;
  they are small.

Transfer is streamed in buckets: ``reshard_stream`` yields lists of ``(name, local_slice)``
holding at most ``bucket_bytes`` of output (or one tensor, if larger), so peak extra memory is
one bucket; the consumer copies the slices into the engine and drops them. ``full_tensor_stream``
is the fallback for engines that take whole tensors and slice them themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

_REPLICATE3 = [Replicate(), Replicate(), Replicate()]
# DTensor warns that nested Shard(0) -> Replicate needs two all-gathers; that is the plan here.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def _wrap(local: torch.Tensor, mesh: DeviceMesh, placements, shape: tuple[int, ...]) -> DTensor:
    return DTensor.from_local(
        local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=_contiguous_stride(shape)
    )


def tp_chunk(full: torch.Tensor, dim: int, tp: int, tp_rank: int) -> torch.Tensor:
    """torch.chunk / DTensor ``Shard`` semantics: slice ``tp_rank`` of ``tp`` along ``dim``."""
    size = full.shape[dim]
    chunk = -(-size // tp)
    start = min(size, tp_rank * chunk)
    stop = min(size, start + chunk)
    return full.narrow(dim, start, stop - start)


def reshard_param(param: DTensor, shard_dim: int | None, mesh: DeviceMesh, dtype: torch.dtype | None = None) -> torch.Tensor:
    """This rank's tensor-parallel slice of one FSDP2 parameter (a plain local tensor)."""
    assert isinstance(param, DTensor), "reshard expects FSDP2 DTensor parameters"
    assert mesh.ndim == 3, "reshard mesh is (dp_replicate, gen_in_shard, tp)"
    local = param.to_local().detach()
    if dtype is not None:
        local = local.to(dtype)
    if mesh.size() == 1:  # one rank holds everything: no communication, no DTensor bookkeeping
        return local
    shape = tuple(param.shape)
    rows = shape[0]
    dp_shard = mesh.size(1) * mesh.size(2)
    rows_per_rank = -(-rows // dp_shard)
    padded_rows = rows_per_rank * dp_shard
    if local.shape[0] < rows_per_rank:
        pad = [0, 0] * (local.dim() - 1) + [0, rows_per_rank - local.shape[0]]
        local = F.pad(local, pad)
    source = _wrap(local.contiguous(), mesh, [Replicate(), Shard(0), Shard(0)], (padded_rows, *shape[1:]))
    even_rows = padded_rows == rows

    if shard_dim is None:
        return source.redistribute(mesh, _REPLICATE3).to_local()[:rows]
    if shard_dim == 1:
        return source.redistribute(mesh, [Replicate(), Replicate(), Shard(1)]).to_local()[:rows]
    assert shard_dim == 0, f"unsupported shard dim {shard_dim}"
    if even_rows:
        return source.redistribute(mesh, [Replicate(), Replicate(), Shard(0)]).to_local()
    if len(shape) == 1:
        full = source.redistribute(mesh, _REPLICATE3).to_local()[:rows]
        return tp_chunk(full, 0, mesh.size(2), mesh.get_local_rank(2)).clone()
    columns = source.redistribute(mesh, [Replicate(), Shard(1), Shard(1)]).to_local()[:rows]
    middle = _wrap(columns.contiguous(), mesh, [Replicate(), Shard(1), Shard(1)], shape)
    return middle.redistribute(mesh, [Replicate(), Replicate(), Shard(0)]).to_local()


def buckets(pieces: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pieces into lists of at least ``bucket_bytes`` (the last may be
    smaller); pieces are produced lazily, so only one bucket is alive at a time."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, piece in pieces:
        bucket.append((name, piece))
        size += piece.numel() * piece.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def reshard_stream(
    named_params: Iterable[tuple[str, DTensor]],
    shard_dims: dict[str, int | None],
    mesh: DeviceMesh,
    bucket_bytes: int,
    dtype: torch.dtype | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of ``(name, tp_slice)``; every rank must consume the whole stream."""

    def pieces():
        for name, param in named_params:
            assert name in shard_dims, f"no tensor-parallel placement planned for {name}"
            yield name, reshard_param(param, shard_dims[name], mesh, dtype)

    return buckets(pieces(), bucket_bytes)


def full_tensor_stream(
    named_params: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    dtype: torch.dtype | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of ``(name, whole tensor)``: the generic fallback for engines that slice
    for themselves (``load_weights`` of a vLLM model). One parameter is gathered at a time
    (``DTensor.full_tensor()``, a collective over the training mesh: every rank must consume the
    whole stream); a bucket holds at most ``bucket_bytes`` (or one tensor, if larger)."""

    def pieces():
        for name, param in named_params:
            full = (param.full_tensor() if isinstance(param, DTensor) else param).detach()
            yield name, full if dtype is None else full.to(dtype)

    return buckets(pieces(), bucket_bytes)
