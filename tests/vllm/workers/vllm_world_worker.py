"""Run under torchrun with 3 ranks (gloo): ``VLLMWorld`` on the last rank of a split topology,
doing what vLLM does in it (no vLLM needed).

Inside ``entered`` the generation rank sees a world of one (rank 0) and creates groups among the
generation ranks alone; outside, the job's world is back and its group counter untouched, so a
job-wide ``new_group`` afterwards agrees on every rank. In ``closing`` vLLM's teardown ("destroy
the default group") leaves the job's groups alone. The training ranks never wait on any of it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from spmd_rlhf.distributed.topology import init_distributed, shutdown
from spmd_rlhf.rollout.vllm_world import VLLMWorld


def as_vllm_does(world: VLLMWorld) -> None:
    with world.entered():
        assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
        group = dist.new_group([0])  # vLLM's groups, in its own numbering
        total = torch.ones(1)
        dist.all_reduce(total, group=group)
        assert total.item() == 1.0
    with world.closing():
        dist.destroy_process_group(group)
        if dist.is_initialized():  # vLLM's teardown: skipped, there is no default group inside
            dist.destroy_process_group()


def main() -> None:
    topo = init_distributed(1, 1, 60, generation_ranks=1)
    count = c10d._world.group_count
    if topo.is_generating:
        world = VLLMWorld(topo.gen_mesh, topo.device, timeout_s=60)
        assert world.own and world.ranks == [2] and world.rank == 0 and world.leader
        as_vllm_does(world)
        assert c10d._world.group_count == count, "vLLM's groups did not advance the job's counter"
    else:
        total = torch.ones(1)
        dist.all_reduce(total, group=topo.train_group)
        assert total.item() == 2.0
    late = dist.new_group([0, 1, 2])
    ranks = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(ranks, group=late)
    assert ranks.item() == 3.0
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
