"""Small collectives run where the backend can reduce: CUDA tensors under NCCL, CPU under gloo."""

from __future__ import annotations

import torch
import torch.distributed as dist

from spmd_rlhf.distributed import comm


def test_nccl_reduces_on_this_ranks_gpu(monkeypatch) -> None:
    # NCCL rejects CPU tensors: the tensor must go to the current CUDA device (seen missing in
    # the KL, whitening and dynamic-sampling reductions, which only run with 2+ ranks)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert comm.collective_device() == torch.device("cuda", 1)


def test_gloo_reduces_on_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert comm.collective_device() == torch.device("cpu")


def test_without_a_process_group_values_come_back_unchanged() -> None:
    assert not dist.is_initialized()
    assert comm.all_reduce_floats([1.5, 2.0]) == [1.5, 2.0]


def test_a_groups_own_backend_decides_where_its_messages_live(monkeypatch) -> None:
    # split placement sends objects over groups other than the world; each group's backend decides
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl" if group == "cuda-group" else "gloo")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert comm.collective_device("cuda-group") == torch.device("cuda", 0)
    assert comm.collective_device() == torch.device("cpu")
