"""Run under torchrun (4 ranks): build every split layout the test names, report what each rank
sees, pass objects between training and generation ranks, and time a receive that never comes.

argv: output prefix. For each ``(generation_ranks, dp_replicate, tp)`` of ``LAYOUTS`` the rank
records its Topology fields and the sums of one all-reduce over the training group and over its
generation tp group (sizes, as every rank adds 1). Then rank 0 sends each generation rank an object
(``send_object``) that names it, and each generation rank answers with ``isend_object``; a large
object checks lengths beyond one small buffer. Last, under a topology built with a 2 s timeout,
rank 0 waits on a training-group receive that rank 1 never sends; the seconds until it fails are
recorded, and after ``shutdown`` the process-group threads still alive. Writes ``<prefix>.rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist

from spmd_rlhf.distributed.comm import isend_object, recv_object, send_object
from spmd_rlhf.distributed.topology import Topology, init_distributed, process_group_threads, shutdown

LAYOUTS = [(2, 1, 2), (1, 1, 1), (2, 2, 1), (0, 1, 2)]
SHORT_TIMEOUT_S = 2
BIG = bytes(range(256)) * 1000


def group_size(group) -> int:
    ones = torch.ones(1)
    dist.all_reduce(ones, group=group)
    return int(ones.item())


def describe(topo: Topology) -> dict:
    fields = {
        "placement": topo.placement, "train_ranks": topo.train_ranks, "gen_ranks": topo.gen_ranks,
        "is_training": topo.is_training, "is_generating": topo.is_generating, "dp_size": topo.dp_size,
        "tp": topo.tp, "gen_dp": topo.gen_dp,
        "train_mesh": None if topo.train_mesh is None else list(topo.train_mesh.shape),
        "fsdp_mesh": None if topo.fsdp_mesh is None else list(topo.fsdp_mesh.shape),
        "gen_mesh": None if topo.gen_mesh is None else list(topo.gen_mesh.shape),
        "reshard_mesh": topo.reshard_mesh is not None,
    }
    if topo.is_training:
        fields["train_group_size"] = group_size(topo.train_group)
    if topo.is_generating:
        fields.update(tp_rank=topo.tp_rank, gen_dp_rank=topo.gen_dp_rank,
                      tp_group_size=group_size(topo.gen_mesh.get_group("tp")))
    return fields


def exchange_objects(topo: Topology) -> dict:
    """Rank 0 -> each generation rank (blocking), and back (non-blocking)."""
    if topo.rank == 0:
        for dst in topo.gen_ranks:
            send_object({"to": dst, "ids": list(range(dst)), "big": BIG}, dst)
        return {"answers": [recv_object(src) for src in topo.gen_ranks]}
    if topo.rank in topo.gen_ranks:
        got = recv_object(0)
        handle = isend_object({"from": topo.rank, "heard": got["to"], "ids": got["ids"], "big": got["big"] == BIG}, 0)
        handle.wait()
        return {"got_to": got["to"]}
    return {}


def time_a_lost_receive(topo: Topology) -> float | None:
    """Seconds until rank 0's receive from rank 1 (which never sends) fails on the training group."""
    elapsed = None
    if topo.rank == 0:
        start = time.monotonic()
        try:
            recv_object(1, group=topo.train_group)
        except RuntimeError:
            elapsed = time.monotonic() - start
        assert elapsed is not None, "a receive nobody answers must fail"
    dist.barrier()  # on the world group (long timeout): rank 1 stays until rank 0 gave up
    return elapsed


def main() -> None:
    prefix = sys.argv[1]
    result = {"layouts": [], "objects": None, "lost_receive_s": None}
    for generation_ranks, dp_replicate, tp in LAYOUTS:
        topo = init_distributed(dp_replicate, tp, 30, generation_ranks=generation_ranks)
        result["layouts"].append(describe(topo))
        if generation_ranks == 2 and tp == 2:
            result["objects"] = exchange_objects(topo)
    topo = init_distributed(1, 1, SHORT_TIMEOUT_S, generation_ranks=2)
    result["lost_receive_s"] = time_a_lost_receive(topo)
    rank = dist.get_rank()
    shutdown()
    result["threads_after_shutdown"] = process_group_threads()
    with open(f"{prefix}.rank{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
