"""Run under torchrun: FSDP2-shard uneven parameters, reshard to tp slices, compare exactly.

For every (dp_replicate, tp) layout the world allows, each parameter is resharded with every
shard dim it has (None, 0, 1) and compared with ``torch.chunk`` of the full tensor kept before
sharding; ``reshard_stream`` buckets are checked for their byte bound and coverage. Writes the
passed layouts to ``argv[1]``.rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import fully_shard

from spmd_rlhf.distributed.reshard import reshard_param, reshard_stream
from spmd_rlhf.distributed.topology import Topology, init_distributed, shutdown

SHAPES = [(7, 5), (13, 3), (5,), (3, 9), (2, 4), (11,), (8, 4), (4, 8), (16,), (12, 6), (1, 3)]
BUCKET_BYTES = 200


def expected_slice(full: torch.Tensor, dim: int | None, tp: int, tp_rank: int) -> torch.Tensor:
    """torch.chunk semantics; ranks past the last chunk get an empty slice."""
    if dim is None:
        return full
    chunks = torch.chunk(full, tp, dim)
    if tp_rank < len(chunks):
        return chunks[tp_rank]
    return full.narrow(dim, full.shape[dim], 0)


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


def check_params(topo: Topology, module: nn.Module, full: dict[str, torch.Tensor]) -> None:
    for name, param in module.named_parameters():
        for dim in [None, *range(param.dim())]:
            got = reshard_param(param, dim, topo.reshard_mesh)
            want = expected_slice(full[name], dim, topo.tp, topo.tp_rank)
            assert got.shape == want.shape and torch.equal(got, want), (name, dim, got.shape, want.shape)
        got64 = reshard_param(param, 0, topo.reshard_mesh, dtype=torch.float64)
        assert torch.equal(got64, expected_slice(full[name], 0, topo.tp, topo.tp_rank).double()), name


def check_stream(topo: Topology, module: nn.Module, full: dict[str, torch.Tensor]) -> None:
    # a mix of plans: cycle through None, 0, 1 where the tensor has that dim
    options = [None, 0, 1]
    dims = {}
    for index, (name, tensor) in enumerate(full.items()):
        dim = options[index % 3]
        dims[name] = dim if dim is None or dim < tensor.dim() else None
    seen = []
    for bucket in reshard_stream(module.named_parameters(), dims, topo.reshard_mesh, BUCKET_BYTES):
        assert bucket, "empty bucket"
        sizes = [t.numel() * t.element_size() for _, t in bucket]
        assert sum(sizes[:-1]) < BUCKET_BYTES, sizes  # only the last tensor may overflow the bound
        for name, tensor in bucket:
            assert torch.equal(tensor, expected_slice(full[name], dims[name], topo.tp, topo.tp_rank)), name
            seen.append(name)
    assert seen == list(full), seen


def layouts(world: int) -> list[tuple[int, int]]:
    out = []
    for dp_replicate in (1, 2):
        for tp in (1, 2, 4):
            if world % dp_replicate == 0 and (world // dp_replicate) % tp == 0:
                out.append((dp_replicate, tp))
    return out


def main() -> None:
    out_path = sys.argv[1]
    passed = []
    for dp_replicate, tp in layouts(int(os.environ["WORLD_SIZE"])):
        topo = init_distributed(dp_replicate, tp, 60)
        module, full = sharded_params(topo)
        check_params(topo, module, full)
        check_stream(topo, module, full)
        passed.append([dp_replicate, tp])
    with open(f"{out_path}.rank{dist.get_rank()}.json", "w") as f:
        json.dump({"world": dist.get_world_size(), "layouts": passed}, f)
    shutdown()


if __name__ == "__main__":
    main()
