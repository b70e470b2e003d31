"""Process group and device meshes: the one place that knows how ranks are laid out.

Every rank runs the same program. This module reads the launcher's environment (torchrun or
SLURM's srun; plain ``python`` is a world of one), starts the default process group (NCCL on
CUDA, gloo on CPU) with a collective timeout, and builds three named views over the same ranks
(colocated placement):

* training mesh ``(dp_replicate, dp_shard)``: FSDP2 shards over ``dp_shard`` and replicates
  (HSDP) over ``dp_replicate``;
* generation mesh ``(gen_dp, tp)``: each ``tp`` group of consecutive ranks hosts one engine
  replica (the grouping vLLM's ``external_launcher`` uses), ``gen_dp`` replicas split prompts;
* reshard mesh ``(dp_replicate, gen_in_shard, tp)``: the training mesh with ``dp_shard`` split
  into ``gen_in_shard * tp``; FSDP's ``Shard(0)`` over ``dp_shard`` is
  ``[Replicate(), Shard(0), Shard(0)]`` here, and the rollout wants
  ``[Replicate(), Replicate(), Shard(d)]`` (see ``reshard.py``).

All three are flattenings of one root mesh, so rank ``r`` has the same coordinates in each.

Split placement (``generation_ranks = G > 0``): the first ``T = world - G`` ranks only train, the
last ``G`` only generate. The training mesh ``(dp_replicate, dp_shard)`` then spans the training
ranks, the generation mesh ``(gen_dp, tp)`` the generation ranks, and there is no reshard mesh
(weights cross between the two sets by ``cross_reshard``). Creating a group is collective over the
world, so every rank builds both meshes; a rank outside one gets ``None`` for it.

Sequence parallel (``sp`` > 1, either placement): a mesh ``(sp_dp, sp)`` over the training ranks,
groups of ``sp`` consecutive training ranks; its ``sp`` group is the process's sequence-parallel
group (``ulysses.use_sp_group``). With ``sp`` = 1 nothing is built.

Every group built here has the collective timeout (torch gives sub-groups 30 minutes otherwise).
"""

from __future__ import annotations

import copy
import datetime
import gc
import logging
import os
import re
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend as C10dBackend
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .ulysses import use_sp_group

log = logging.getLogger(__name__)
# Names torch and gloo give the threads of a process group (Linux shows them in /proc).
PROCESS_GROUP_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")
# Root meshes built by init_distributed, released by shutdown (see there).
_ROOT_MESHES: list[DeviceMesh] = []


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[012-015,020],cpu7`` -> ``gpu012``."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    assert match, f"unparseable SLURM_NODELIST {nodelist!r}"
    prefix, bracket = match.group(1), match.group(3)
    if bracket is None:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return prefix + first


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Read torchrun's or srun's variables; without either, a world of one."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_NODELIST", "127.0.0.1")),
            master_port=int(env.get("MASTER_PORT", str(20000 + job_id % 20000))),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", "0") or 0), "single")


@dataclass
class Topology:
    """The started process group and the meshes every other module uses."""

    env: LaunchEnv
    device: torch.device
    backend: str
    train_mesh: DeviceMesh | None  # (dp_replicate, dp_shard); None on generation-only ranks
    gen_mesh: DeviceMesh | None  # (gen_dp, tp); None on training-only ranks
    reshard_mesh: DeviceMesh | None  # (dp_replicate, gen_in_shard, tp); colocated only
    tp: int
    placement: str  # "colocate" | "split"
    train_ranks: list[int]
    gen_ranks: list[int]
    train_flat_mesh: DeviceMesh | None = None  # split: 1-D over the training ranks (their group)
    sp_mesh: DeviceMesh | None = None  # (sp_dp, sp) over the training ranks; None without sequence parallel

    @property
    def sp(self) -> int:
        """Ranks each packed sequence row of the training passes is split over."""
        return 1 if self.sp_mesh is None else self.sp_mesh["sp"].size()

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        """This training rank's sequence-parallel group (None: sp = 1, or a generation-only rank)."""
        if self.sp_mesh is None or not self.is_training:
            return None
        return self.sp_mesh["sp"].get_group()

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def is_training(self) -> bool:
        return self.env.rank in self.train_ranks

    @property
    def is_generating(self) -> bool:
        return self.env.rank in self.gen_ranks

    @property
    def train_group(self) -> dist.ProcessGroup | None:
        """The training ranks' group: the world colocated; None on a generation-only rank."""
        if self.placement == "colocate":
            return dist.group.WORLD
        return self.train_flat_mesh.get_group() if self.is_training else None

    @property
    def dp_size(self) -> int:
        """Number of training ranks."""
        return len(self.train_ranks)

    @property
    def gen_dp(self) -> int:
        """Number of engine replicas."""
        return len(self.gen_ranks) // self.tp

    @property
    def tp_rank(self) -> int:
        assert self.gen_mesh is not None, "tp_rank exists on generating ranks only"
        return self.gen_mesh["tp"].get_local_rank()

    @property
    def gen_dp_rank(self) -> int:
        assert self.gen_mesh is not None, "gen_dp_rank exists on generating ranks only"
        return self.gen_mesh["gen_dp"].get_local_rank()

    @property
    def fsdp_mesh(self) -> DeviceMesh | None:
        """The mesh handed to ``fully_shard``: 1-D over dp_shard, or 2-D for HSDP (None off the training ranks)."""
        if self.train_mesh is None:
            return None
        if self.train_mesh["dp_replicate"].size() == 1:
            return self.train_mesh["dp_shard"]
        return self.train_mesh


def _pick_device(local_rank: int) -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device()), "nccl"
    return torch.device("cpu"), "gloo"


def init_distributed(dp_replicate: int, tp: int, timeout_s: float, env: LaunchEnv | None = None,
                     generation_ranks: int = 0, sp: int = 1) -> Topology:
    """Start the default process group and build the meshes (``generation_ranks`` 0: colocated;
    ``sp`` > 1: also the sequence-parallel mesh over the training ranks).

    Sizes must already be validated (``config.validate``): colocated, world = dp_replicate *
    dp_shard and tp divides dp_shard; split, dp_replicate divides the training ranks and tp the
    generation ranks; sp divides the training ranks.
    """
    topo = _init_meshes(dp_replicate, tp, timeout_s, env, generation_ranks)
    if sp > 1:
        topo.sp_mesh = _sp_mesh(topo, sp, datetime.timedelta(seconds=timeout_s))
        use_sp_group(topo.sp_group)
    return topo


def _sp_mesh(topo: Topology, sp: int, timeout: datetime.timedelta) -> DeviceMesh:
    """``(sp_dp, sp)`` over the training ranks (every rank of the world calls this)."""
    trainers = len(topo.train_ranks)
    assert topo.train_ranks == list(range(trainers)) and trainers % sp == 0, "validated earlier"
    mesh = _mesh(topo.device, range(0, trainers), {"sp_dp": trainers // sp, "sp": sp}, topo.world_size, timeout)
    _ROOT_MESHES.append(mesh)
    return mesh


def _init_meshes(dp_replicate: int, tp: int, timeout_s: float, env: LaunchEnv | None,
                 generation_ranks: int) -> Topology:
    """The process group, then the training, generation and reshard meshes."""
    env = env or read_launch_env()
    device, backend = _pick_device(env.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        if env.launcher == "single" and not env.master_port:
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        else:
            os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
            device_id=device if backend == "nccl" else None,
        )
    world = dist.get_world_size()
    if generation_ranks:
        return _split(env, device, backend, world, dp_replicate, tp, generation_ranks, timeout)
    assert world % dp_replicate == 0, "validated earlier"
    dp_shard = world // dp_replicate
    assert dp_shard % tp == 0, "validated earlier"
    shape = {"dp_replicate": dp_replicate, "gen_in_shard": dp_shard // tp, "tp": tp}
    root = init_device_mesh(device.type, tuple(shape.values()), mesh_dim_names=tuple(shape),
                            backend_override=_overrides(shape, world, timeout))
    root["gen_in_shard", "tp"]._flatten("dp_shard", _override(dp_shard, world, timeout))
    root["dp_replicate", "gen_in_shard"]._flatten("gen_dp", _override(dp_replicate * dp_shard // tp, world, timeout))
    with warnings.catch_warnings():
        # Slicing flattened dims from the root keeps all three meshes views of one root, which
        # is what makes rank coordinates agree; torch warns that this will change.
        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
        train_mesh = root["dp_replicate", "dp_shard"]
        gen_mesh = root["gen_dp", "tp"]
    _ROOT_MESHES.append(root)
    ranks = list(range(world))
    return Topology(env=env, device=device, backend=backend, train_mesh=train_mesh, gen_mesh=gen_mesh,
                    reshard_mesh=root, tp=tp, placement="colocate", train_ranks=ranks, gen_ranks=ranks)


def _split(env: LaunchEnv, device: torch.device, backend: str, world: int, dp_replicate: int, tp: int,
           generation_ranks: int, timeout: datetime.timedelta) -> Topology:
    """Training mesh over the first ``world - G`` ranks, generation mesh over the last ``G``;
    built on every rank (group creation is collective), kept only where the rank belongs."""
    trainers = world - generation_ranks
    assert trainers >= 1 and trainers % dp_replicate == 0 and generation_ranks % tp == 0, "validated earlier"
    train_shape = {"dp_replicate": dp_replicate, "dp_shard": trainers // dp_replicate}
    gen_shape = {"gen_dp": generation_ranks // tp, "tp": tp}
    train_root = _mesh(device, range(0, trainers), train_shape, world, timeout)
    gen_root = _mesh(device, range(trainers, world), gen_shape, world, timeout)
    flat = train_root["dp_shard"] if dp_replicate == 1 else train_root._flatten("train", _options(timeout))
    train_ranks, gen_ranks = list(range(trainers)), list(range(trainers, world))
    _ROOT_MESHES.extend([train_root, gen_root])
    training, generating = env.rank in train_ranks, env.rank in gen_ranks
    return Topology(env=env, device=device, backend=backend, train_mesh=train_root if training else None,
                    gen_mesh=gen_root if generating else None, reshard_mesh=None, tp=tp, placement="split",
                    train_ranks=train_ranks, gen_ranks=gen_ranks, train_flat_mesh=flat if training else None)


def _mesh(device: torch.device, ranks: range, shape: dict[str, int], world: int,
          timeout: datetime.timedelta) -> DeviceMesh:
    """A mesh over ``ranks`` (every rank of the world must call this)."""
    mesh = torch.arange(ranks.start, ranks.stop).view(*shape.values())
    overrides = _overrides(shape, world, timeout)
    return DeviceMesh(device.type, mesh, mesh_dim_names=tuple(shape),
                      backend_override=tuple(overrides.get(name, (None, None)) for name in shape))


def _options(timeout: datetime.timedelta):
    """Fresh backend options carrying the collective timeout, for one sub-group creation (torch may
    write into the options it is given, so no two creations share them). NCCL starts from the world
    group's own options, as torch does when given none."""
    world = dist.group.WORLD
    if dist.get_backend(world) == "nccl":
        options = copy.deepcopy(world._get_backend(torch.device("cuda")).options)
    else:
        options = C10dBackend.Options(dist.get_backend(world), timeout)
    options._timeout = timeout
    return options


def _override(size: int, world: int, timeout: datetime.timedelta):
    """A dim of the whole world reuses the default group (which has the timeout); smaller ones get it."""
    return None if size == world else (None, _options(timeout))


def _overrides(shape: dict[str, int], world: int, timeout: datetime.timedelta) -> dict[str, tuple]:
    return {name: (None, _options(timeout)) for name, size in shape.items() if size != world}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shutdown() -> None:
    """End every process group, and the threads it runs, now: while the interpreter is fully alive.

    ``destroy_process_group`` only unregisters the groups. Each gloo group's C++ object, with its
    worker threads, lives until the last Python reference to it goes, and references outlive the
    run: the device meshes keep their groups in a registry (and torch's DTensor caches keep the
    meshes), FSDP's state keeps its groups. Left to interpreter exit, a worker thread that still
    holds its last collective's tensors needs the GIL to free them; Python ends a thread that asks
    for the GIL during finalisation (``pthread_exit``), and unwinding through the C++ destructor
    calls ``std::terminate``: "terminate called without an active exception", SIGABRT, and a run
    that finished exits -6. Under CPU contention the worker is late often enough to matter.

    So, in this order: destroy the groups; drop the meshes' references to them; collect the
    reference cycles (modules, hooks) that hold the rest, which destroys the groups and joins their
    threads here (pybind releases the GIL for that, so a worker can still free its tensors). The
    caller drops its own references (models, engines) first. Nothing here is a collective: it
    cannot wait on a rank that has already exited.
    """
    use_sp_group(None)
    if dist.is_initialized():
        dist.destroy_process_group()
    while _ROOT_MESHES:
        _release_groups(_ROOT_MESHES.pop())
    gc.collect()
    leftover = process_group_threads()
    if leftover:
        log.warning("%d process-group threads (%s) outlived shutdown: something still holds a process group, and "
                    "the interpreter's exit may abort", len(leftover), ", ".join(sorted(set(leftover))))


def _release_groups(root: DeviceMesh) -> None:
    """Drop the root mesh's references to its groups (its sub-meshes share the registry)."""
    registry = getattr(root, "_pg_registry", None)  # torch's private name -> group map
    if isinstance(registry, dict):
        registry.clear()


def process_group_threads() -> list[str]:
    """Names of this process's live process-group threads (empty where /proc is absent)."""
    names = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return names
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                name = comm.read().strip()
        except OSError:  # ended meanwhile
            continue
        if name in PROCESS_GROUP_THREADS:
            names.append(name)
    return names
