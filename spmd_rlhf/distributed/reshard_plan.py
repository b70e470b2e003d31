"""The reshard plan: which rows and columns of which FSDP shard each rank receives (arithmetic only).

A parameter of shape ``(N, *rest)`` is FSDP2-sharded over ``S = dp_shard`` ranks in torch.chunk
blocks: shard rank ``s`` holds rows ``[s*c, (s+1)*c)`` of ``c = ceil(N/S)``, cut at ``N`` (the last
blocks shorter or empty). Shard rank ``m`` is ``g * tp + t`` on the reshard mesh (gen_in_shard
``g``, tp ``t``), and tp rank ``t`` wants the ``t``-th torch.chunk along the parameter's shard dim:
rows for dim 0, columns for dim 1, everything for ``None``.

The *piece* shard ``s`` owes tp rank ``t`` is its block's rows that ``t`` wants, cut to ``t``'s
columns. Blocks are consecutive rows, so the pieces from ``s = 0 .. S-1`` stacked along dim 0 are
``t``'s slice exactly, uneven shapes included, and every rank receives only rows and columns of its
own slice: about 1/tp of the model, less what its own block already holds.

Per bucket the plan lays out three flat buffers of one dtype:
* the *cast* buffer: this rank's block of every parameter in the output dtype; for dim-1
  parameters the columns are packed per tp rank (part ``t`` contiguous), so every piece is one
  contiguous range of it;
* the *send* buffer: for each other shard rank ``r`` in order, the pieces owed to tp rank
  ``r % tp`` (one ``all_to_all_single`` split per rank; nothing to oneself);
* the *receive* buffer: for each other shard rank ``s`` in order, the pieces it owes this rank.
A parameter's slice is then its pieces in shard order, from the receive buffer or (its own piece)
the cast buffer. Plans are pure functions of shapes, cached, and the same on every rank where they
must agree (bucket boundaries and split sizes).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

Range = tuple[int, int]  # [start, stop) in a flat buffer
Source = tuple[bool, int, int]  # (from the receive buffer, else the cast buffer; start, stop)


@dataclass(frozen=True)
class Layout:
    """FSDP shard count ``S``, tensor-parallel size and this rank's FSDP shard index ``m``."""

    shards: int
    tp: int
    rank: int

    def __post_init__(self) -> None:
        assert self.shards % self.tp == 0 and 0 <= self.rank < self.shards, self

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp


class ParamSpec(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dim: int | None  # tensor-parallel shard dim: None (whole), 0 (rows) or 1 (columns)
    dtype: torch.dtype  # the output (and wire) dtype


def chunk_range(size: int, parts: int, index: int) -> Range:
    """``[start, stop)`` of torch.chunk's chunk ``index`` of ``parts`` (empty past the last)."""
    step = -(-size // parts)
    start = min(size, index * step)
    return start, min(size, start + step)


def target_rows(spec: ParamSpec, tp: int, t: int) -> Range:
    return chunk_range(spec.shape[0], tp, t) if spec.dim == 0 else (0, spec.shape[0])


def row_numel(spec: ParamSpec, tp: int, t: int) -> int:
    """Elements per row of tp rank ``t``'s slice."""
    rest = spec.shape[1:]
    if spec.dim == 1:
        lo, hi = chunk_range(rest[0], tp, t)
        return (hi - lo) * math.prod(rest[1:])
    return math.prod(rest)


def slice_shape(spec: ParamSpec, tp: int, t: int) -> tuple[int, ...]:
    """Shape of tp rank ``t``'s slice (torch.chunk semantics)."""
    if spec.dim is None:
        return spec.shape
    lo, hi = chunk_range(spec.shape[spec.dim], tp, t)
    return spec.shape[: spec.dim] + (hi - lo,) + spec.shape[spec.dim + 1 :]


def block_rows(spec: ParamSpec, layout: Layout, s: int) -> Range:
    return chunk_range(spec.shape[0], layout.shards, s)


def piece_rows(spec: ParamSpec, layout: Layout, s: int, t: int) -> Range:
    """Global rows shard ``s`` owes tp rank ``t`` (``lo == hi``: nothing)."""
    (b_lo, b_hi), (t_lo, t_hi) = block_rows(spec, layout, s), target_rows(spec, layout.tp, t)
    lo = max(b_lo, t_lo)
    return lo, max(lo, min(b_hi, t_hi))


def piece_numel(spec: ParamSpec, layout: Layout, s: int, t: int) -> int:
    lo, hi = piece_rows(spec, layout, s, t)
    return (hi - lo) * row_numel(spec, layout.tp, t)


def packed(spec: ParamSpec, tp: int) -> bool:
    """Dim-1 parameters keep their columns grouped per tp rank in the cast buffer."""
    return spec.dim == 1 and tp > 1


def part_range(spec: ParamSpec, layout: Layout, t: int) -> Range:
    """Where this rank's piece for tp rank ``t`` lies in the parameter's cast region."""
    b_lo, b_hi = block_rows(spec, layout, layout.rank)
    if packed(spec, layout.tp):
        start = (b_hi - b_lo) * sum(row_numel(spec, layout.tp, u) for u in range(t))
        return start, start + (b_hi - b_lo) * row_numel(spec, layout.tp, t)
    lo, hi = piece_rows(spec, layout, layout.rank, t)
    per_row = row_numel(spec, layout.tp, t)
    return (lo - b_lo) * per_row, (hi - b_lo) * per_row


def local_shape(spec: ParamSpec, layout: Layout) -> tuple[int, ...]:
    lo, hi = block_rows(spec, layout, layout.rank)
    return (hi - lo,) + spec.shape[1:]


def _append(ranges: list, item: tuple) -> None:
    """Append a range, merging it into the previous one when they are adjacent in one buffer."""
    if item[-1] == item[-2]:
        return
    if ranges and ranges[-1][:-2] == item[:-2] and ranges[-1][-1] == item[-2]:
        ranges[-1] = ranges[-1][:-1] + (item[-1],)
    else:
        ranges.append(item)


@dataclass(frozen=True)
class BucketPlan:
    """One bucket's collective, for this rank. Split sizes are per shard rank (0 for itself).
    Templates are meta tensors: their shapes cut a flat buffer into views in one call."""

    specs: tuple[ParamSpec, ...]
    layout: Layout
    local_shapes: tuple[tuple[int, ...], ...]  # this rank's FSDP block of each parameter
    cast_numel: int
    cast_templates: tuple[torch.Tensor, ...]  # each block's region of the cast buffer
    dense: tuple[int, ...]  # non-empty blocks copied as they are
    columns: tuple[int, ...]  # non-empty dim-1 blocks packed by one strided copy (even columns)
    uneven_columns: tuple[int, ...]  # non-empty dim-1 blocks packed one part at a time
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    send_ranges: tuple[Range, ...]  # cast-buffer ranges, concatenated in this order
    out_ranges: tuple[Source, ...]  # every slice's pieces, by parameter then shard, concatenated
    out_templates: tuple[torch.Tensor, ...]  # this rank's slice of each parameter
    moves: bool  # some rank of the group receives something (the same on every rank)

    @property
    def dtype(self) -> torch.dtype:
        return self.specs[0].dtype


def _cast_template(spec: ParamSpec, layout: Layout, shape: tuple[int, ...]) -> tuple[str, torch.Tensor]:
    """How a block is copied into its cast region, and the region's shape."""
    if not packed(spec, layout.tp):
        return "dense", torch.empty(shape, device="meta")
    rows, cols, *rest = shape
    if cols % layout.tp == 0:  # (tp, rows, cols / tp, ...): part t is tp rank t's columns
        return "columns", torch.empty((layout.tp, rows, cols // layout.tp, *rest), device="meta")
    return "uneven_columns", torch.empty((math.prod(shape),), device="meta")


def _send_side(specs, layout: Layout, offsets) -> tuple[tuple[int, ...], tuple[Range, ...]]:
    splits, ranges = [0] * layout.shards, []
    for r in range(layout.shards):
        if r == layout.rank:
            continue
        for spec, offset in zip(specs, offsets):
            lo, hi = part_range(spec, layout, r % layout.tp)
            splits[r] += hi - lo
            _append(ranges, (offset + lo, offset + hi))
    return tuple(splits), tuple(ranges)


def _receive_side(specs, layout: Layout, offsets) -> tuple[tuple[int, ...], tuple[Source, ...]]:
    t, splits = layout.tp_rank, [0] * layout.shards
    sources: list[list[Source]] = [[] for _ in specs]
    cursor = 0
    for s in range(layout.shards):
        for index, spec in enumerate(specs):
            if s == layout.rank:
                lo, hi = part_range(spec, layout, t)
                sources[index].append((False, offsets[index] + lo, offsets[index] + hi))
                continue
            numel = piece_numel(spec, layout, s, t)
            sources[index].append((True, cursor, cursor + numel))
            cursor += numel
            splits[s] += numel
    for spec, pieces in zip(specs, sources):
        tiled = sum(hi - lo for _, lo, hi in pieces)
        assert tiled == math.prod(slice_shape(spec, layout.tp, t)), (spec, "pieces tile the slice")
    ranges: list[Source] = []
    for piece in (piece for pieces in sources for piece in pieces):
        _append(ranges, piece)
    return tuple(splits), tuple(ranges)


def plan_bucket(specs: tuple[ParamSpec, ...], layout: Layout) -> BucketPlan:
    for spec in specs:
        assert spec.dim in (None, 0, 1) and (spec.dim is None or spec.dim < len(spec.shape)), spec
        assert spec.dtype == specs[0].dtype, "one dtype per bucket"
    local_shapes = tuple(local_shape(spec, layout) for spec in specs)
    sizes = [math.prod(shape) for shape in local_shapes]
    offsets = tuple(sum(sizes[:i]) for i in range(len(specs) + 1))
    kinds, templates = zip(*(_cast_template(s, layout, shape) for s, shape in zip(specs, local_shapes)))
    by_kind = {k: tuple(i for i, kind in enumerate(kinds) if kind == k and sizes[i]) for k in set(kinds)}
    send_splits, send_ranges = _send_side(specs, layout, offsets)
    recv_splits, out_ranges = _receive_side(specs, layout, offsets)
    outputs = tuple(torch.empty(slice_shape(s, layout.tp, layout.tp_rank), device="meta") for s in specs)
    # blocks are exactly the tp chunks when dp_shard == tp and every tensor splits rows
    moves = layout.shards > 1 and not (layout.shards == layout.tp and all(s.dim == 0 for s in specs))
    assert moves or sum(send_splits) + sum(recv_splits) == 0, "nothing may move in a bucket that skips its collective"
    return BucketPlan(
        specs, layout, local_shapes, offsets[-1], templates, by_kind.get("dense", ()), by_kind.get("columns", ()),
        by_kind.get("uneven_columns", ()), send_splits, recv_splits, send_ranges, out_ranges, outputs, moves,
    )


def bucket_groups(specs: tuple[ParamSpec, ...], tp: int, bucket_bytes: int) -> list[tuple[ParamSpec, ...]]:
    """Consecutive groups of at least ``bucket_bytes`` of output (the last may be smaller), one
    dtype each. Sized by tp rank 0's slice, the largest, so every rank draws the same lines."""
    groups: list[tuple[ParamSpec, ...]] = []
    group: list[ParamSpec] = []
    size = 0
    for spec in specs:
        if group and spec.dtype != group[0].dtype:
            groups.append(tuple(group))
            group, size = [], 0
        group.append(spec)
        size += math.prod(slice_shape(spec, tp, 0)) * spec.dtype.itemsize
        if size >= bucket_bytes:
            groups.append(tuple(group))
            group, size = [], 0
    if group:
        groups.append(tuple(group))
    return groups


@functools.lru_cache(maxsize=8)
def plan_buckets(specs: tuple[ParamSpec, ...], layout: Layout, bucket_bytes: int) -> tuple[BucketPlan, ...]:
    """Every bucket's plan; cached, since a model syncs the same shapes every step."""
    return tuple(plan_bucket(group, layout) for group in bucket_groups(specs, layout.tp, bucket_bytes))
