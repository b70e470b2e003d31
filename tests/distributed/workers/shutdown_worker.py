"""Run under torchrun (2 ranks): hold process groups the way the trainer does, end with the
trainer's last collective, shut down, and report the threads left.

argv: ``together`` (both ranks shut down at once) or ``gone`` (rank 1 exits first; rank 0 shuts
down only once rank 1's process has ended).

Like the trainer, the worker starts the groups and meshes with ``init_distributed``, shards a model
with FSDP2 (whose state keeps its own references to the groups), trains one step and ends with
``all_gather_object`` (the metrics reduction), whose tensors have Python objects: the gloo worker
thread that ran it must take the GIL to free them. Their threads are starved of CPU for that last
collective (SCHED_IDLE where Linux allows it), as on a loaded machine, so that a worker still holds
those tensors when the process exits unless ``shutdown`` has ended the groups; at interpreter exit
that aborts the process ("terminate called without an active exception"). Each rank prints
``rank R: process-group threads after shutdown: [...]``; the test wants an empty list and exit 0.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from spmd_rlhf.distributed.topology import init_distributed, shutdown
from tests.integration.exit_census import native_thread_names

PROCESS_GROUP_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")
PEER_EXIT_TIMEOUT_S = 60


def starve_process_group_threads() -> None:
    """Lowest CPU priority for the groups' threads (SCHED_IDLE: they run when a core is free)."""
    if not hasattr(os, "SCHED_IDLE"):
        return
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                if comm.read().strip() in PROCESS_GROUP_THREADS:
                    os.sched_setscheduler(int(task), os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # ended meanwhile, or not permitted
            continue


def train_one_step(mesh) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(torch.randn(8, 16)).square().mean()
    loss.backward()
    loss = loss.detach()
    optimizer.step()
    return loss.item()


def wait_until_gone(pid: int) -> None:
    deadline = time.monotonic() + PEER_EXIT_TIMEOUT_S
    while os.path.exists(f"/proc/{pid}"):
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped
                return
        assert time.monotonic() < deadline, f"rank 1 (pid {pid}) still running after {PEER_EXIT_TIMEOUT_S} s"
        time.sleep(0.01)


def main(mode: str) -> None:
    topo = init_distributed(1, 1, 60)
    loss = train_one_step(topo.fsdp_mesh)
    pids: list[int] = [None] * topo.world_size  # type: ignore[list-item]
    dist.all_gather_object(pids, os.getpid())
    starve_process_group_threads()
    metrics: list[dict] = [None] * topo.world_size  # type: ignore[list-item]
    dist.all_gather_object(metrics, {"loss": loss})  # the last collective, as in the trainer
    if mode == "gone" and topo.rank == 0:
        wait_until_gone(pids[1])
    del topo
    shutdown()
    left = [name for name in native_thread_names() if name in PROCESS_GROUP_THREADS]
    # one write: both ranks share torchrun's stdout, and print() may split a line in two writes
    os.write(1, f"rank {os.environ['RANK']}: process-group threads after shutdown: {left}\n".encode())


if __name__ == "__main__":
    main(sys.argv[1])
