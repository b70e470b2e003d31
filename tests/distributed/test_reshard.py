"""FSDP2 -> tensor-parallel reshard equals torch.chunk of the full tensor, exactly, in one
collective per bucket that brings each rank only its own slice.

The worker runs every (dp_replicate, tp) layout the world size allows (HSDP included) in one
job, on parameters with uneven shapes, for shard dims None/0/1, checks bucket bounds, and counts
the torch.distributed collectives and the bytes they deliver (see the worker's docstring).
Larger shard groups than the test machine can launch (dp_shard up to 8, gen_in_shard > 1 with
tp 4) are checked in one process: every rank's plan, cast and assembly run for real, and the
one collective is replaced by its definition (rank s's split r becomes rank r's part s).
"""

from __future__ import annotations

import json

import pytest
import torch

from spmd_rlhf.distributed.reshard import _assemble, _cast, tp_chunk
from spmd_rlhf.distributed.reshard_plan import Layout, ParamSpec, bucket_groups, plan_buckets
from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "reshard_worker.py"
SHAPES = [(7, 5), (13, 3), (5,), (3, 9), (2, 4), (11,), (8, 4), (4, 8), (16,), (12, 6), (1, 3), (10, 7, 2), (9, 8)]


def block(full: torch.Tensor, shards: int, rank: int) -> torch.Tensor:
    """FSDP2's block: torch.chunk along dim 0, empty past the last chunk."""
    chunks = torch.chunk(full, shards)
    return chunks[rank] if rank < len(chunks) else full[:0]


def all_to_all(sends: list[list[torch.Tensor]], plans) -> list[torch.Tensor]:
    """all_to_all_single by definition: rank r receives split r of every other rank, in rank order."""
    recvs = []
    for r, plan in enumerate(plans):
        parts = [sends[s][r] for s in range(len(plans)) if s != r]
        assert [p.numel() for p in parts] == [n for s, n in enumerate(plan.recv_splits) if s != r]
        recvs.append(torch.cat(parts) if parts else torch.empty(0, dtype=plan.dtype))
    return recvs


def simulate(full: dict[str, torch.Tensor], dims: dict, shards: int, tp: int, dtype: torch.dtype, bucket_bytes: int):
    specs = tuple(ParamSpec(n, tuple(t.shape), dims[n], dtype) for n, t in full.items())
    per_rank = [plan_buckets(specs, Layout(shards, tp, m), bucket_bytes) for m in range(shards)]
    assert len({tuple(len(p.specs) for p in plans) for plans in per_rank}) == 1, "ranks agree on buckets"
    for plans in zip(*per_rank):
        casts = [_cast(p, [block(full[s.name], shards, m) for s in p.specs]) for m, p in enumerate(plans)]
        sends = []
        for cast, plan in zip(casts, plans):
            send = torch.cat([cast[a:b] for a, b in plan.send_ranges] + [cast[:0]])
            sends.append(torch.split_with_sizes(send, list(plan.send_splits)))
        recvs = all_to_all(sends, plans) if plans[0].moves else [c[:0] for c in casts]
        for m, (plan, cast, recv) in enumerate(zip(plans, casts, recvs)):
            for spec, got in zip(plan.specs, _assemble(plan, cast, recv)):
                want = full[spec.name].to(dtype)
                want = want if spec.dim is None else tp_chunk(want, spec.dim, tp, m % tp)
                assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), (spec, m)


@pytest.mark.parametrize("shards, tp", [(1, 1), (2, 1), (2, 2), (3, 3), (4, 2), (6, 2), (6, 3), (8, 4), (8, 8)])
def test_plan_tiles_slices_in_one_process(shards, tp):
    torch.manual_seed(0)
    full = {f"p{i}": torch.randn(shape) for i, shape in enumerate(SHAPES)}
    for dim in (None, 0, 1):
        dims = {n: dim if dim is None or dim < t.dim() else None for n, t in full.items()}
        simulate(full, dims, shards, tp, torch.float32, 1 << 30)
        simulate(full, dims, shards, tp, torch.bfloat16, 64)


def test_buckets_hold_one_dtype_and_their_bound():
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float64, torch.float64]
    specs = tuple(ParamSpec(f"p{i}", (6, 4), 0, d) for i, d in enumerate(dtypes))
    groups = bucket_groups(specs, 2, 100)  # tp rank 0 slice: 3 x 4 elements
    assert [[s.name for s in g] for g in groups] == [["p0", "p1"], ["p2"], ["p3"], ["p4", "p5"]]
    for group in groups:
        assert len({s.dtype for s in group}) == 1
        assert sum(12 * s.dtype.itemsize for s in group[:-1]) < 100


def check_figures(figures: dict, dp_shard: int, tp: int) -> None:
    """One collective per bucket at most, whatever its number of parameters: exactly one where
    data moves in a one-bucket stream (none where dp_shard == tp and every tensor splits rows:
    FSDP's blocks are the tp slices). The bytes received are exactly the slices less the rank's
    own share."""
    for dim, one in zip([None, 0, 1, 0], figures["one_bucket"]):  # the worker's order
        moves = dp_shard > 1 and not (dp_shard == tp and dim == 0)
        assert one["buckets"] == 1 and one["collectives"] == int(moves), (dim, one)
        assert one["received"] == one["expected"] <= one["slices"], one
    small = figures["small_buckets"]
    assert small["buckets"] > 3 and small["collectives"] <= small["buckets"], small
    assert small["received"] == small["expected"] <= small["slices"], small


@pytest.mark.slow
@pytest.mark.parametrize(
    "nproc, layouts",
    [
        (2, [[1, 1], [1, 2], [2, 1]]),
        (4, [[1, 1], [1, 2], [1, 4], [2, 1], [2, 2]]),
    ],
    ids=["world2", "world4"],
)
def test_reshard_matches_chunk(tmp_path, nproc, layouts):
    out = tmp_path / "result"
    torchrun([str(WORKER), str(out)], nproc, timeout=120)
    for rank in range(nproc):
        result = json.loads((tmp_path / f"result.rank{rank}.json").read_text())
        assert result["world"] == nproc and result["layouts"] == layouts
        for (dp_replicate, tp), figures in zip(layouts, result["figures"]):
            check_figures(figures, nproc // dp_replicate, tp)
