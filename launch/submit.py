"""Submit spmd_rlhf with submitit: to SLURM, or here with ``--local``; one job per point of a sweep.

    python launch/submit.py --nodes 2 --gpus-per-node 8 --partition gpu recipe=grpo_gsm8k model.path=...
    python launch/submit.py --gpus-per-node 8 -m trainer.lr=1e-6,3e-6 algorithm.kl_coef=0.001   # two jobs
    python launch/submit.py --local --gpus-per-node 2 trainer.total_steps=2        # two CPU ranks, here

Overrides are Hydra's; with ``-m`` comma lists (and ``range()``, ``choice()``) expand into one job
per combination and plain overrides apply to every job, as ``python -m spmd_rlhf.train -m`` would.
Each job runs one task per GPU (tasks per node = ``--gpus-per-node``; on a machine without GPUs,
``--local`` runs that many CPU ranks). Every task turns submitit's ``JobEnvironment`` into
torch.distributed's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR = the first host,
MASTER_PORT from the job id, as ``topology.read_launch_env`` derives it under srun), composes the
config from ``configs/`` and ``recipes/`` as the ``spmd_rlhf.train`` entry point does, and calls
``spmd_rlhf.train.run`` in the task's own process.

Restarts: a job's run directory is fixed at submission (``OUTPUT_DIR/NAME[/POINT]``) and jobs start
with ``trainer.resume=auto`` (an override given here wins). The task is ``Checkpointable``: when
SLURM signals the time limit or a preemption, submitit requeues it with ``trainer.resume=auto`` and
the same run directory, so it continues from the newest checkpoint written there.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import submitit

REPO_ROOT = Path(__file__).resolve().parents[1]
RESUME_AUTO = "trainer.resume=auto"
RUN_DIR_KEY = "hydra.run.dir="


# --- sweeps -------------------------------------------------------------------------------------


def expand_sweep(overrides: list[str], multirun: bool) -> list[tuple[str, list[str]]]:
    """``(point name, overrides)`` for every job: one without ``-m``, the sweep's product with it.

    The name is made of the swept values only (``0_trainer.lr=0.0001``); "" for a single job.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    if not multirun:
        if swept:
            raise SystemExit(f"submit.py: {sorted(swept)} sweep over several values; add -m to submit one job per point")
        return [("", list(overrides))]
    points = [point for batch in BasicSweeper.split_arguments(parsed, None) for point in batch]
    named = []
    for i, point in enumerate(points):
        varying = [o for o in point if o.split("=", 1)[0].lstrip("+~") in swept]
        named.append((re.sub(r"[^A-Za-z0-9._=+-]+", "_", "_".join([str(i), *varying]))[:120], point))
    return named


def with_resume_auto(overrides: list[str]) -> list[str]:
    """The overrides of a requeued job: the same, with ``trainer.resume=auto`` last (so it wins)."""
    return [o for o in overrides if not o.startswith("trainer.resume=")] + [RESUME_AUTO]


# --- inside a job -------------------------------------------------------------------------------


def master_port(job_id: str) -> int:
    """The rendezvous port of a job: ``20000 + id % 20000`` (array jobs ``123_4``: the digits)."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def distributed_env(job_env) -> dict[str, str]:
    """torch.distributed's variables for this task of a submitit job."""
    local = job_env.cluster in ("local", "debug")
    return {
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(job_env.num_tasks // job_env.num_nodes),
        "MASTER_ADDR": "127.0.0.1" if local else job_env.hostnames[0],
        "MASTER_PORT": str(master_port(job_env.job_id)),
    }


def compose_config(overrides: list[str]):
    """``(Config, plain dict, DictConfig)`` as ``python -m spmd_rlhf.train OVERRIDES`` would compose them."""
    from spmd_rlhf.check import compose_config as compose

    return compose(overrides)


class Train(submitit.helpers.Checkpointable):
    """One task of a training job; submitit pickles it, runs it on every task, and requeues it."""

    def __init__(self, overrides: list[str], run_dir: str):
        self.overrides = list(overrides)
        self.run_dir = run_dir

    def __call__(self) -> dict:
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        job_env = submitit.JobEnvironment()
        os.environ.update(distributed_env(job_env))
        cfg, config_dict, dcfg = compose_config(self.overrides)
        if job_env.global_rank == 0:
            write_hydra_files(self.run_dir, dcfg, self.overrides)
        from spmd_rlhf.train import run

        results = run(cfg, self.run_dir, config_dict)
        return {"rank": job_env.global_rank, "run_dir": self.run_dir, "results": results}

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(Train(with_resume_auto(self.overrides), self.run_dir))


def write_hydra_files(run_dir: str, dcfg, overrides: list[str]) -> None:
    """``.hydra/config.yaml`` and ``overrides.yaml``, where the Hydra entry point puts them."""
    from omegaconf import OmegaConf

    os.makedirs(os.path.join(run_dir, ".hydra"), exist_ok=True)
    OmegaConf.save(dcfg, os.path.join(run_dir, ".hydra", "config.yaml"))
    OmegaConf.save(OmegaConf.create(list(overrides)), os.path.join(run_dir, ".hydra", "overrides.yaml"))


# --- submission ---------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="also the number of tasks (ranks) per node")
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--timeout-min", type=int, default=24 * 60)
    parser.add_argument("--name", default="spmd_rlhf", help="job name; the run directories go under OUTPUT_DIR/NAME")
    parser.add_argument("--output-dir", default="outputs/submitit")
    parser.add_argument("--local", action="store_true", help="run here with submitit's LocalExecutor and wait")
    parser.add_argument("-m", "--multirun", action="store_true", help="one job per point of the sweep")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unknown options {unknown}; Hydra overrides are key=value")
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error("--nodes and --gpus-per-node must be >= 1")
    if args.local and args.nodes != 1:
        parser.error("--local runs on this machine: --nodes 1")
    return args, overrides


def make_executor(args: argparse.Namespace, folder: Path) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if args.local else "slurm")
    cuda = args.local and _cuda_count() >= args.gpus_per_node
    executor.update_parameters(
        name=args.name, nodes=args.nodes, tasks_per_node=args.gpus_per_node, timeout_min=args.timeout_min,
        gpus_per_node=args.gpus_per_node if (cuda or not args.local) else 0, cpus_per_task=args.cpus_per_task,
        slurm_signal_delay_s=120, slurm_additional_parameters={"requeue": True},
    )
    if args.partition:
        executor.update_parameters(slurm_partition=args.partition)
    return executor


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def run_dirs(args: argparse.Namespace, points: list[tuple[str, list[str]]]) -> list[str]:
    """Each job's run directory: ``hydra.run.dir`` if given (single job only), else OUTPUT_DIR/NAME[/POINT]."""
    base = Path(args.output_dir).resolve() / args.name
    dirs = []
    for name, overrides in points:
        given = [o[len(RUN_DIR_KEY):] for o in overrides if o.startswith(RUN_DIR_KEY)]
        if given and len(points) > 1:
            raise SystemExit("submit.py: hydra.run.dir with -m would put every job in one directory; use --output-dir")
        dirs.append(str(Path(given[-1]).resolve()) if given else str(base / name if name else base))
    return dirs


def main(argv: list[str] | None = None) -> int:
    from spmd_rlhf.config import ConfigError

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    points = expand_sweep([RESUME_AUTO, *overrides], args.multirun)
    for _, point in points:  # unknown keys and bad values fail here, not in a queued job
        try:
            compose_config(point)
        except ConfigError as err:
            print(f"submit.py: configuration error: {err}", file=sys.stderr)
            return 2
    dirs = run_dirs(args, points)
    executor = make_executor(args, Path(args.output_dir).resolve() / args.name / "submitit")
    jobs = [executor.submit(Train(point, run_dir)) for (_, point), run_dir in zip(points, dirs, strict=True)]
    for job, run_dir in zip(jobs, dirs, strict=True):
        print(f"job {job.job_id}: {run_dir}", flush=True)
    if not args.local:
        return 0
    failed = 0
    for job, run_dir in zip(jobs, dirs, strict=True):
        try:
            results = job.results()
            print(f"job {job.job_id} done on {len(results)} tasks: {run_dir}", flush=True)
        except Exception as err:  # submitit re-raises the task's failure with its log
            failed += 1
            print(f"job {job.job_id} failed: {err}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
