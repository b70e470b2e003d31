"""Run under torchrun: weights cross from FSDP2 training ranks to tensor-parallel generation ranks.

argv: output prefix, then layouts ``G,dp_replicate,tp`` (e.g. ``2,1,2``). For each layout, tiny
Llama (biases everywhere) and Qwen2 (vocab 37, uneven under tp 2; tied embeddings) models are built
with the same seed on every rank; training ranks shard theirs with ``parallelize`` (FSDP2, HSDP
where dp_replicate > 1) and ``send``, generation ranks ``receive``. Every received slice is compared
with ``torch.chunk`` of the full tensor kept on the generation rank. Twice per model: fp32 in one
bucket, and cast to bf16 in small buckets. While it runs every point-to-point and collective call
of torch.distributed is counted. Writes ``<prefix>.rank<r>.json`` with the figures of each run.
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch
import torch.distributed as dist

from spmd_rlhf.distributed.cross_reshard import CrossReshard, param_specs
from spmd_rlhf.distributed.topology import Topology, init_distributed, shutdown
from spmd_rlhf.distributed.tp_plan import param_shard_dims
from spmd_rlhf.models.parallelize import parallelize
from tests.distributed.workers.tiny import ARCHS, tiny_config, tiny_model

CALLS = ("send", "recv", "isend", "irecv", "batch_isend_irecv", "all_gather_single", "all_gather_into_tensor",
         "all_gather", "all_to_all_single", "broadcast", "all_reduce", "reduce_scatter_tensor", "gather", "scatter",
         "barrier")
RUNS = [(None, 1 << 30), (torch.bfloat16, 4096)]  # (wire dtype, bucket bytes)


@contextlib.contextmanager
def counted_calls():
    """Yield a list that gets the name of every torch.distributed call made in the block."""
    calls: list[str] = []
    originals = {name: getattr(dist, name) for name in CALLS}

    def counting(name, original):
        def call(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(dist, name, counting(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def expected_slice(full: torch.Tensor, dim: int | None, tp: int, tp_rank: int) -> torch.Tensor:
    if dim is None:
        return full
    chunks = torch.chunk(full, tp, dim)
    return chunks[tp_rank] if tp_rank < len(chunks) else full.narrow(dim, full.shape[dim], 0)


def receive_and_check(cross: CrossReshard, topo: Topology, full: dict, dims: dict, dtype) -> dict:
    seen, expected_bytes, buckets = [], 0, 0
    with counted_calls() as calls:
        for bucket in cross.receive():
            buckets += 1
            for name, got in bucket:
                want = expected_slice(full[name], dims[name], topo.tp, topo.tp_rank)
                want = want if dtype is None else want.to(dtype)
                assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name
                expected_bytes += want.numel() * want.element_size()
                seen.append(name)
    assert seen == list(full), seen
    bounds = [[s.dtype.itemsize * torch.Size(s.shape).numel() for s in b] for b in cross.buckets]
    return {"buckets": buckets, "calls": calls, "received_bytes": cross.received_bytes,
            "expected_bytes": expected_bytes, "bucket_sizes": bounds}


def run_model(topo: Topology, arch: str, vocab: int, tied: bool) -> list[dict]:
    model = tiny_model(tiny_config(arch, vocab, tied), seed=1)
    full = {name: param.detach().clone() for name, param in model.named_parameters()}
    dims = param_shard_dims(model)
    if topo.is_training:
        parallelize(model, topo.fsdp_mesh, torch.device("cpu"))
    figures = []
    for dtype, bucket_bytes in RUNS:
        if topo.is_training:
            specs = param_specs(model.named_parameters(), dims, dtype)
            cross = CrossReshard(topo, specs, bucket_bytes)
            with counted_calls() as calls:
                sent = cross.send(model.named_parameters())
            figures.append({"sent_bytes": sent, "calls": calls, "buckets": len(cross.buckets)})
        else:
            cross = CrossReshard(topo, None, bucket_bytes)
            figures.append(receive_and_check(cross, topo, full, dims, dtype))
    return figures


def main() -> None:
    prefix, layouts = sys.argv[1], [tuple(int(x) for x in arg.split(",")) for arg in sys.argv[2:]]
    results = []
    for generation_ranks, dp_replicate, tp in layouts:
        topo = init_distributed(dp_replicate, tp, 60, generation_ranks=generation_ranks)
        runs = [run for arch, vocab, tied in ARCHS if arch != "qwen3" for run in run_model(topo, arch, vocab, tied)]
        results.append({"layout": [generation_ranks, dp_replicate, tp], "training": topo.is_training,
                        "tp_rank": topo.tp_rank if topo.is_generating else None, "runs": runs})
    with open(f"{prefix}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(results, f)
    shutdown()


if __name__ == "__main__":
    main()
