"""Small collectives over the default process group: a few floats, summed (or min/max) over ranks.

NCCL reduces only CUDA tensors and gloo reduces CPU ones, so the tensor goes where the backend
needs it. Values travel as float64, so integer counts stay exact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def collective_device() -> torch.device:
    """Where the default group's collectives run: this rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_floats(values: list[float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
    """``values`` reduced element-wise over every rank (one collective); unchanged without a group."""
    if not values or not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()
