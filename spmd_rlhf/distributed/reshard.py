"""Actor -> rollout resharding: one flat all-to-all per bucket (DESIGN §4).

FSDP2 keeps each parameter as a DTensor ``Shard(0)`` over ``dp_shard`` (torch.chunk semantics:
``ceil(N / S)`` rows per rank, the last ranks shorter or empty). The rollout engine wants, on
every rank, its tensor-parallel slice: column-parallel weights split on dim 0, row-parallel on
dim 1, norms whole. On the reshard mesh ``(dp_replicate, gen_in_shard, tp)`` the FSDP layout is
``[Replicate(), Shard(0), Shard(0)]`` and the target is ``[Replicate(), Replicate(), Shard(d)]``.

Within one dp_shard group that reshard is an all-to-all: shard rank ``s`` owes every rank of tp
rank ``t`` the rows of its block that ``t``'s slice holds, cut to ``t``'s columns, and the pieces
from all shards stacked in shard order are the slice (``reshard_plan`` works out the
arithmetic). So each bucket of parameters costs

* one cast: every parameter's local block into a flat buffer of the output dtype (dim-1 columns
  packed per tp rank) by ``torch._foreach_copy_``; casting before sending halves bf16 traffic;
* one ``all_to_all_single`` over the dp_shard group with per-rank split sizes, carrying every
  parameter of the bucket (none where nothing moves: dp_shard == tp and every tensor splits
  rows, since FSDP's blocks are then the tp chunks). HSDP replicas (``dp_replicate``) hold the
  same blocks and exchange within their own group; at tp = 1 it is an all-gather;
* one ``torch.cat`` of every slice's pieces in order (none where they are already one range,
  as when nothing moves), cut into the slices as views.

Python work per parameter is a few list operations: the plan (``reshard_plan``) is cached by
shapes, and buffers are cut into views by one call over meta-tensor templates.

Bytes: a rank receives exactly its slice less its own block's part of it, so about 1/tp of the
model (``perf/reshard_bytes_per_rank`` counts the slices, 1/tp), never a whole tensor it does not
keep. Uneven shapes need no padding: split sizes are exact. Slices are bit-identical to
``tp_chunk`` of the full tensor (after the cast).

Transfer is streamed in buckets: ``reshard_stream`` yields lists of ``(name, local_slice)``
holding at least ``bucket_bytes`` of output (the last may be less; bounds are drawn on tp rank
0's slice sizes so every rank agrees), so peak extra memory is a few buckets (cast, send,
receive and output buffers); slices may be views of one bucket buffer, and the consumer copies
them into the engine and drops them. ``full_tensor_stream`` is the fallback for engines that take
whole tensors and slice them themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch._utils import _unflatten_dense_tensors
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .reshard_plan import BucketPlan, Layout, ParamSpec, chunk_range, part_range, plan_buckets


def tp_chunk(full: torch.Tensor, dim: int, tp: int, tp_rank: int) -> torch.Tensor:
    """torch.chunk / DTensor ``Shard`` semantics: slice ``tp_rank`` of ``tp`` along ``dim``."""
    start, stop = chunk_range(full.shape[dim], tp, tp_rank)
    return full.narrow(dim, start, stop - start)


def _layout(param: torch.Tensor, mesh: DeviceMesh) -> tuple[Layout, DeviceMesh]:
    """This rank's place in the FSDP shard group, checked against the reshard mesh."""
    assert isinstance(param, DTensor), "reshard expects FSDP2 DTensor parameters"
    assert mesh.ndim == 3, "reshard mesh is (dp_replicate, gen_in_shard, tp)"
    fsdp_mesh, tp = param.device_mesh, mesh.size(2)
    shard_dim = fsdp_mesh.ndim - 1
    layout = Layout(fsdp_mesh.size(shard_dim), tp, fsdp_mesh.get_local_rank(shard_dim))
    assert layout.shards == mesh.size(1) * tp, "FSDP shards over the reshard mesh's (gen_in_shard, tp)"
    assert layout.rank == mesh.get_local_rank(1) * tp + mesh.get_local_rank(2), "shard rank is g * tp + t"
    return layout, fsdp_mesh


def _spec(name: str, param: torch.Tensor, shard_dims: dict[str, int | None], dtype: torch.dtype | None,
          fsdp_mesh: DeviceMesh, placements: tuple) -> ParamSpec:
    assert name in shard_dims, f"no tensor-parallel placement planned for {name}"
    assert isinstance(param, DTensor), f"{name}: reshard expects FSDP2 DTensor parameters"
    assert param.device_mesh is fsdp_mesh or param.device_mesh == fsdp_mesh, f"{name}: on another mesh"
    assert param.placements == placements, (name, param.placements)
    return ParamSpec(name, tuple(param.shape), shard_dims[name], dtype or param.dtype)


def _cast(plan: BucketPlan, blocks: list[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """This rank's blocks of the bucket in the output dtype, in one flat buffer on ``device`` (the
    mesh's: blocks FSDP offloads to host memory are copied there by the cast; default the blocks'):
    dense blocks as they are, dim-1 blocks with tp rank t's columns at part t."""
    cast = torch.empty(plan.cast_numel, dtype=plan.dtype, device=device or blocks[0].device)
    regions = _unflatten_dense_tensors(cast, plan.cast_templates)
    if plan.dense:
        torch._foreach_copy_([regions[i] for i in plan.dense], [blocks[i] for i in plan.dense])
    if plan.columns:
        tp = plan.layout.tp
        sources = [blocks[i].unflatten(1, (tp, -1)).movedim(1, 0) for i in plan.columns]
        torch._foreach_copy_([regions[i] for i in plan.columns], sources)
    for i in plan.uneven_columns:
        _copy_uneven_columns(plan.specs[i], plan.layout, blocks[i], regions[i])
    return cast


def _copy_uneven_columns(spec: ParamSpec, layout: Layout, block: torch.Tensor, region: torch.Tensor) -> None:
    """Columns that do not divide by tp: one copy per tp rank's part."""
    for t in range(layout.tp):
        (lo, hi), (start, stop) = chunk_range(spec.shape[1], layout.tp, t), part_range(spec, layout, t)
        source = block.narrow(1, lo, hi - lo)
        region[start:stop].view(source.shape).copy_(source)


def _join(pieces: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Concatenate flat pieces; a single piece is returned as it is (no copy)."""
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces) if pieces else like[:0]


def _exchange(plan: BucketPlan, cast: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The bucket's one collective: every rank's pieces to every other rank of the shard group."""
    send = _join([cast[a:b] for a, b in plan.send_ranges], cast)
    assert send.numel() == sum(plan.send_splits)
    recv = cast.new_empty(sum(plan.recv_splits))
    dist.all_to_all_single(recv, send, list(plan.recv_splits), list(plan.send_splits), group=group)
    return recv


def _assemble(plan: BucketPlan, cast: torch.Tensor, recv: torch.Tensor) -> list[torch.Tensor]:
    """Every slice from its pieces: one concatenation (none where they are one range), cut into views."""
    buffers = (cast, recv)  # indexed by "from the receive buffer"
    flat = _join([buffers[from_recv][lo:hi] for from_recv, lo, hi in plan.out_ranges], cast)
    slices = _unflatten_dense_tensors(flat, plan.out_templates)
    return [s if s.shape == t.shape else flat.new_empty(t.shape) for s, t in zip(slices, plan.out_templates)]


LocalBlock = Callable[[str, DTensor], torch.Tensor]  # (name, parameter) -> the block to send in its place


@torch.no_grad()
def _reshard_bucket(plan: BucketPlan, params: list[tuple[str, torch.Tensor]], group: dist.ProcessGroup | None,
                    device: torch.device, local_block: LocalBlock | None = None) -> list[tuple[str, torch.Tensor]]:
    if local_block is None:  # to_local() without autograd: FSDP's unpadded block
        blocks = [param._local_tensor for _, param in params]
    else:
        blocks = [local_block(name, param) for name, param in params]
    assert all(b.shape == shape for b, shape in zip(blocks, plan.local_shapes)), "blocks are FSDP2's torch.chunk"
    cast = _cast(plan, blocks, device)
    recv = _exchange(plan, cast, group) if plan.moves else cast[:0]
    return [(spec.name, piece) for spec, piece in zip(plan.specs, _assemble(plan, cast, recv))]


def reshard_stream(
    named_params: Iterable[tuple[str, DTensor]],
    shard_dims: dict[str, int | None],
    mesh: DeviceMesh,
    bucket_bytes: int,
    dtype: torch.dtype | None = None,
    local_block: LocalBlock | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of ``(name, tp_slice)``; every rank must consume the whole stream.

    ``local_block(name, param)``, when given, supplies the block that stands for ``param``'s local
    shard (same shape), computed when its bucket is cast: LoRA's merged ``W + s B A`` blocks."""
    params = list(named_params)
    if not params:
        return iter(())
    layout, fsdp_mesh = _layout(params[0][1], mesh)
    placements = (Replicate(),) * (fsdp_mesh.ndim - 1) + (Shard(0),)  # FSDP2, or HSDP
    specs = tuple(_spec(name, param, shard_dims, dtype, fsdp_mesh, placements) for name, param in params)
    plans = plan_buckets(specs, layout, bucket_bytes)
    group = fsdp_mesh.get_group(fsdp_mesh.ndim - 1) if layout.shards > 1 else None
    return _stream(plans, params, group, torch.device(fsdp_mesh.device_type), local_block)


def _stream(plans, params, group, device: torch.device,
            local_block: LocalBlock | None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    start = 0
    for plan in plans:
        stop = start + len(plan.specs)
        yield _reshard_bucket(plan, params[start:stop], group, device, local_block)
        start = stop
    assert start == len(params)


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
            if isinstance(param, DTensor) and param.device.type != param.device_mesh.device_type:
                param = param.to(param.device_mesh.device_type)  # a shard FSDP keeps in host memory
            full = (param.full_tensor() if isinstance(param, DTensor) else param).detach()
            yield name, full if dtype is None else full.to(dtype)

    return buckets(pieces(), bucket_bytes)
