"""The process group an in-process vLLM takes as its world (``distributed_executor_backend="external_launcher"``).

vLLM builds its groups from ``torch.distributed``'s default group, which it takes as its world:
tp groups of consecutive ranks and world/tp replicas ("external DP") that generate
independently; it creates them with ``new_group`` on every rank of that world, and reads its
rank from the launcher's environment (``RANK``, ``LOCAL_RANK``; srun sets only ``SLURM_*``).

Colocated (the generation mesh spans the world) that world is the trainer's own. In split
placement only the last ranks generate, so vLLM gets a world of its own: one process group over
the generation ranks, made the default group (and ``RANK``/``WORLD_SIZE`` its own numbering) for
the duration of every call into vLLM (``entered``), and the trainer's world again outside.
Inside, vLLM numbers the generation ranks from 0 and creates its groups among them alone; their
names are drawn from a counter of their own, so the trainer's group counter stays the same on
every rank of the job (a later job-wide ``new_group`` still agrees). At ``close`` vLLM destroys
its groups; its final "destroy the default group" is skipped (no default group inside), so the
trainer's groups outlive the engine.

In-process vLLM also seeds the global RNGs at construction; ``preserved_rng`` undoes that.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.distributed.device_mesh import DeviceMesh
from transformers import PretrainedConfig

# vLLM's own groups are named from here (torch names groups by a per-process counter)
_VLLM_GROUP_NAMES_FROM = 1_000_000


class VLLMWorld:
    """The generation mesh as vLLM sees it: this rank's replica, tp rank and world."""

    def __init__(self, gen_mesh: DeviceMesh, device: torch.device, timeout_s: float | None = None) -> None:
        assert dist.is_initialized(), "build the vLLM engine after the process group exists"
        self.tp_mesh = gen_mesh["tp"]
        self.tp = self.tp_mesh.size()
        self.tp_rank = self.tp_mesh.get_local_rank()
        self.gen_dp_rank = gen_mesh["gen_dp"].get_local_rank()
        self.local_rank = torch.cuda.current_device() if device.type == "cuda" else 0
        self.ranks = sorted(int(r) for r in gen_mesh.mesh.flatten().tolist())  # the trainer's numbering
        self.rank = self.ranks.index(dist.get_rank())  # vLLM's numbering
        self.own = len(self.ranks) < dist.get_world_size()
        self._check_grouping()
        self._group: dist.ProcessGroup | None = None
        self._group_count = _VLLM_GROUP_NAMES_FROM
        if not self.own:
            # external_launcher reads the rank from the environment (srun sets SLURM_* only)
            os.environ.setdefault("RANK", str(dist.get_rank()))
            os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
            os.environ.setdefault("LOCAL_RANK", str(self.local_rank))
            return
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        with self._counted_apart():
            self._group = dist.new_group(self.ranks, timeout=timeout)

    @property
    def leader(self) -> bool:
        """Whether this rank logs the engine's warnings (rank 0 of vLLM's world)."""
        return self.rank == 0

    def _check_grouping(self) -> None:
        """vLLM forms tp groups of consecutive ranks of its world; the generation mesh must agree."""
        ranks = dist.get_process_group_ranks(self.tp_mesh.get_group()) if self.tp > 1 else [dist.get_rank()]
        first = self.rank - self.tp_rank
        if ranks != self.ranks[first:first + self.tp]:
            raise ValueError(f"vLLM needs tp groups of consecutive generation ranks {self.ranks}; "
                             f"this rank's generation tp group is {ranks}")

    @contextlib.contextmanager
    def _counted_apart(self) -> Iterator[None]:
        """Groups created inside are named from vLLM's own counter, not the trainer's."""
        trainer_count = c10d._world.group_count
        c10d._world.group_count = self._group_count
        try:
            yield
        finally:
            self._group_count = c10d._world.group_count
            c10d._world.group_count = trainer_count

    @contextlib.contextmanager
    def _default_group(self, group: dist.ProcessGroup | None) -> Iterator[None]:
        trainer_world = c10d._get_default_group()
        c10d._update_default_pg(group)
        try:
            yield
        finally:
            c10d._update_default_pg(trainer_world)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Around every call into vLLM: its own world as the default group, when it has one."""
        if not self.own:
            yield
            return
        with self._counted_apart(), self._default_group(self._group):
            yield

    @contextlib.contextmanager
    def launched(self) -> Iterator[None]:
        """Around vLLM's construction: the launcher environment in vLLM's numbering."""
        if not self.own:
            yield
            return
        env = {"RANK": str(self.rank), "WORLD_SIZE": str(len(self.ranks)), "LOCAL_RANK": str(self.local_rank)}
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            with self.entered():
                yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    @contextlib.contextmanager
    def closing(self) -> Iterator[None]:
        """Around vLLM's teardown, which destroys its groups and then the default group: colocated
        that is the trainer's world (as ever); with a world of its own, no default group is set
        inside, so only vLLM's groups go, and its world follows."""
        if not self.own:
            yield
            return
        with self._counted_apart(), self._default_group(None):
            yield
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None


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
