"""The process group an in-process vLLM takes as its world (``distributed_executor_backend="external_launcher"``).

vLLM builds its groups from ``torch.distributed``'s world: tp groups of consecutive ranks and
world/tp replicas ("external DP") that generate independently. It reads its rank from the
launcher's environment (``RANK``, ``LOCAL_RANK``; srun sets only ``SLURM_*``), and in-process it
seeds the global RNGs at construction (``preserved_rng`` undoes that).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from transformers import PretrainedConfig


class VLLMWorld:
    """The generation mesh as vLLM sees it: this rank's replica, tp rank and world."""

    def __init__(self, gen_mesh: DeviceMesh, device: torch.device) -> None:
        assert dist.is_initialized(), "build the vLLM engine after the process group exists"
        self.tp_mesh = gen_mesh["tp"]
        self.tp = self.tp_mesh.size()
        self.tp_rank = self.tp_mesh.get_local_rank()
        self.gen_dp_rank = gen_mesh["gen_dp"].get_local_rank()
        self.local_rank = torch.cuda.current_device() if device.type == "cuda" else 0
        self._check_grouping()
        # external_launcher reads the rank from the environment (srun sets SLURM_* only)
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        os.environ.setdefault("LOCAL_RANK", str(self.local_rank))

    @property
    def leader(self) -> bool:
        """Whether this rank logs the engine's warnings."""
        return dist.get_rank() == 0

    def _check_grouping(self) -> None:
        """vLLM forms tp groups of consecutive global ranks; the generation mesh must agree."""
        ranks = dist.get_process_group_ranks(self.tp_mesh.get_group()) if self.tp > 1 else [dist.get_rank()]
        first = dist.get_rank() - self.tp_rank
        if ranks != list(range(first, first + self.tp)):
            raise ValueError(f"vLLM needs tp groups of consecutive ranks; this rank's generation tp group is {ranks}")

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Around every call into vLLM."""
        yield


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global RNG states on exit."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def write_config(hf_config: PretrainedConfig) -> str:
    """A private model directory holding only config.json (the weights come by sync)."""
    path = tempfile.mkdtemp(prefix="spmd_rlhf_vllm_")
    hf_config.save_pretrained(path)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
