"""Run under torchrun: FSDP2-shard uneven parameters, reshard to tp slices, compare exactly, and
count the collectives and the bytes they bring.

For every (dp_replicate, tp) layout the world allows: for each shard dim (None, 0, 1; None where
a tensor lacks the dim) all parameters go through ``reshard_stream`` in ONE bucket and every slice
is compared with ``torch.chunk`` of the full tensor kept before sharding (once more with a dtype
cast); then a stream of small buckets with mixed dims is checked for its byte bound and coverage.
While the reshard runs every torch.distributed collective is wrapped with a counter (and
CommDebugMode, which also sees functional collectives, must agree): per bucket at most one call,
an ``all_to_all_single``, whatever the number of parameters, and the bytes it brings this rank are
exactly its slices less the part its own FSDP block holds. Writes the passed layouts and their
figures to ``argv[1]``.rank<r>.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode

from spmd_rlhf.distributed.reshard import reshard_stream
from spmd_rlhf.distributed.topology import Topology, init_distributed, shutdown

SHAPES = [(7, 5), (13, 3), (5,), (3, 9), (2, 4), (11,), (8, 4), (4, 8), (16,), (12, 6), (1, 3)]
BUCKET_BYTES = 200
ONE_BUCKET = 1 << 30
COLLECTIVES = (
    "all_to_all_single", "all_to_all", "all_gather_into_tensor", "all_gather", "all_gather_object",
    "broadcast", "all_reduce", "reduce_scatter_tensor", "reduce_scatter", "reduce", "gather", "scatter",
    "send", "recv", "isend", "irecv", "batch_isend_irecv", "barrier",
)


def expected_slice(full: torch.Tensor, dim: int | None, tp: int, tp_rank: int) -> torch.Tensor:
    """torch.chunk semantics; ranks past the last chunk get an empty slice."""
    if dim is None:
        return full
    chunks = torch.chunk(full, tp, dim)
    if tp_rank < len(chunks):
        return chunks[tp_rank]
    return full.narrow(dim, full.shape[dim], 0)


def received_bytes(name: str, args: tuple, kwargs: dict) -> int:
    """Bytes a collective call brings this rank from other ranks (all_to_all_single only; any
    other call fails the test by being there)."""
    if name != "all_to_all_single":
        return 0
    output, group = args[0], kwargs["group"]
    splits = kwargs["output_split_sizes"] if "output_split_sizes" in kwargs else args[2]
    own = splits[dist.get_group_rank(group, dist.get_rank())]
    return (output.numel() - own) * output.element_size()


@contextlib.contextmanager
def counted_collectives():
    """Yield a list that gets ``(name, group size, received bytes)`` for every collective call."""
    calls: list[tuple[str, int, int]] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name, original):
        def call(*args, **kwargs):
            size = dist.get_world_size(kwargs.get("group"))
            calls.append((name, size, received_bytes(name, args, kwargs)))
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(dist, name, counting(name, original))
    try:
        with CommDebugMode() as comm:
            yield calls
        assert comm.get_total_counts() == len(calls), (comm.get_comm_counts(), calls)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def own_share(full: torch.Tensor, dim: int | None, topo: Topology) -> int:
    """Elements of this rank's slice that its own FSDP block already holds."""
    want = expected_slice(full, dim, topo.tp, topo.tp_rank)
    if want.numel() == 0:
        return 0
    rows = torch.arange(full.shape[0])
    blocks = torch.chunk(rows, topo.train_mesh["dp_shard"].size())
    shard_rank = topo.train_mesh["dp_shard"].get_local_rank()
    owned = blocks[shard_rank] if shard_rank < len(blocks) else rows[:0]
    wanted = expected_slice(rows, 0, topo.tp, topo.tp_rank) if dim == 0 else rows
    return int(torch.isin(owned, wanted).sum()) * (want.numel() // want.shape[0])


def run_stream(topo, module, full, dims, bucket_bytes, dtype=None) -> dict:
    """Reshard, compare every slice, and return the stream's figures."""
    seen, out_bytes, buckets = [], 0, 0
    with counted_collectives() as calls:
        for bucket in reshard_stream(module.named_parameters(), dims, topo.reshard_mesh, bucket_bytes, dtype):
            assert bucket, "empty bucket"
            buckets += 1
            sizes = [t.numel() * t.element_size() for _, t in bucket]
            assert sum(sizes[:-1]) < bucket_bytes, sizes  # only the last tensor may overflow the bound
            for name, tensor in bucket:
                want = expected_slice(full[name], dims[name], topo.tp, topo.tp_rank)
                want = want if dtype is None else want.to(dtype)
                assert tensor.dtype == want.dtype and torch.equal(tensor, want), (name, dims[name])
                seen.append(name)
            out_bytes += sum(sizes)
    assert seen == list(full), seen
    itemsize = (dtype or torch.float32).itemsize
    expected = out_bytes - itemsize * sum(own_share(full[n], dims[n], topo) for n in full)
    dp_shard = topo.train_mesh["dp_shard"].size()
    assert {(name, size) for name, size, _ in calls} <= {("all_to_all_single", dp_shard)}, calls
    return {"buckets": buckets, "collectives": len(calls), "received": sum(b for *_, b in calls),
            "expected": expected, "slices": out_bytes}


def sharded_params(topo: Topology) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    module = nn.Module()
    full = {}
    for index, shape in enumerate(SHAPES):
        tensor = torch.randn(shape)
        full[f"p{index}"] = tensor.clone()
        module.register_parameter(f"p{index}", nn.Parameter(tensor))
    fully_shard(module, mesh=topo.fsdp_mesh)
    return module, full


def check_layout(topo: Topology) -> dict:
    module, full = sharded_params(topo)
    one_bucket = []
    for dim in (None, 0, 1):  # every parameter in one bucket, one dim (None where it lacks it)
        dims = {name: dim if dim is None or dim < t.dim() else None for name, t in full.items()}
        one_bucket.append(run_stream(topo, module, full, dims, ONE_BUCKET))
    dims0 = {name: 0 for name in full}
    one_bucket.append(run_stream(topo, module, full, dims0, ONE_BUCKET, dtype=torch.float64))
    # a mix of plans in small buckets: cycle through None, 0, 1 where the tensor has that dim
    mixed = {}
    for index, (name, tensor) in enumerate(full.items()):
        dim = [None, 0, 1][index % 3]
        mixed[name] = dim if dim is None or dim < tensor.dim() else None
    return {"one_bucket": one_bucket, "small_buckets": run_stream(topo, module, full, mixed, BUCKET_BYTES)}


def layouts(world: int) -> list[tuple[int, int]]:
    out = []
    for dp_replicate in (1, 2):
        for tp in (1, 2, 4):
            if world % dp_replicate == 0 and (world // dp_replicate) % tp == 0:
                out.append((dp_replicate, tp))
    return out


def main() -> None:
    out_path = sys.argv[1]
    passed, figures = [], []
    for dp_replicate, tp in layouts(int(os.environ["WORLD_SIZE"])):
        topo = init_distributed(dp_replicate, tp, 60)
        figures.append(check_layout(topo))
        passed.append([dp_replicate, tp])
    with open(f"{out_path}.rank{dist.get_rank()}.json", "w") as f:
        json.dump({"world": dist.get_world_size(), "layouts": passed, "figures": figures}, f)
    shutdown()


if __name__ == "__main__":
    main()
