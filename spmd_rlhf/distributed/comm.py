"""Small messages between ranks: a few floats reduced over ranks, and picklable objects sent point to point.

NCCL moves only CUDA tensors and gloo CPU ones, so every tensor goes where the group's backend
needs it. Reduced values travel as float64, so integer counts stay exact. An object travels as two
messages: its pickled length (one int64), then the pickled bytes (uint8). Ranks are global ranks,
as everywhere in torch.distributed; every call waits at most the group's collective timeout.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed as dist


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where ``group``'s (default: the world's) collectives run: this rank's GPU under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# The ranks the training collectives span: the world colocated, the training ranks under split
# placement (set once by ``use_training_group`` before anything is built).
_TRAINING_GROUP: dist.ProcessGroup | None = None


def use_training_group(group: dist.ProcessGroup | None) -> None:
    """Make ``all_reduce_floats`` reduce over ``group`` (None: the world)."""
    global _TRAINING_GROUP
    _TRAINING_GROUP = group


def all_reduce_floats(values: list[float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
    """``values`` reduced element-wise over every training rank (one collective); unchanged without a group."""
    if not values or not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device(_TRAINING_GROUP))
    dist.all_reduce(tensor, op=op, group=_TRAINING_GROUP)
    return tensor.tolist()


def _message(obj: Any, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The length and the pickled bytes of ``obj``, on the group's device."""
    device = collective_device(group)
    payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
    length = torch.tensor([payload.numel()], dtype=torch.int64)
    return length.to(device), payload.to(device)


def send_object(obj: Any, dst: int, group: dist.ProcessGroup | None = None) -> None:
    """Send a picklable object to global rank ``dst``; returns once it has been handed over."""
    length, payload = _message(obj, group)
    dist.send(length, dst, group=group)
    dist.send(payload, dst, group=group)


class ObjectSend:
    """A send in flight (``isend_object``): keeps its buffers alive until ``wait`` returns."""

    def __init__(self, works: list[dist.Work], buffers: tuple[torch.Tensor, ...]) -> None:
        self._works = works
        self._buffers: tuple[torch.Tensor, ...] | None = buffers

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works, self._buffers = [], None


def isend_object(obj: Any, dst: int, group: dist.ProcessGroup | None = None) -> ObjectSend:
    """Start sending a picklable object to global rank ``dst``; ``.wait()`` on the result before
    relying on its delivery (the object is pickled at once: later changes to it do not travel)."""
    length, payload = _message(obj, group)
    works = [dist.isend(length, dst, group=group), dist.isend(payload, dst, group=group)]
    return ObjectSend(works, (length, payload))


def recv_object(src: int, group: dist.ProcessGroup | None = None) -> Any:
    """Receive the next object global rank ``src`` sends this rank (``send_object``/``isend_object``)."""
    device = collective_device(group)
    length = torch.empty(1, dtype=torch.int64, device=device)
    dist.recv(length, src, group=group)
    payload = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    dist.recv(payload, src, group=group)
    return pickle.loads(payload.cpu().numpy().tobytes())
