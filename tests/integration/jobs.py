"""Training jobs that a test starts, watches and kills: torchrun as the leader of its own process
group, its metrics records and checkpoints. torchrun puts every worker in a process group of its
own (setsid), so killing the job means the agent's process group and each worker's. Every rank
runs the trainer under ``exit_census``, which records the threads still alive when its interpreter
starts to finalise (see ``assert_clean_exit``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spmd_rlhf.trainer.checkpoint_files import LATEST, is_complete, step_folder_name
from tests.integration.exit_census import CENSUS_DIR_VAR
from tests.launch import REPO_ROOT, child_env, children, free_port

# Keys that legitimately differ between two runs of the same computation: wall time and speed.
TIMING_PREFIXES = ("timing/", "perf/", "memory/")
# Threads of a gloo process group (torch's workers, gloo's transport loop). One alive when the
# interpreter finalises can abort a finished run ("terminate called without an active exception").
PROCESS_GROUP_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


def torchrun_cmd(args: list[str], nproc: int, max_restarts: int = 0, c10d: bool = False) -> list[str]:
    """``torchrun`` on this host: static rendezvous, or c10d; ``--max-restarts`` if given."""
    if c10d:
        rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    else:
        rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    restarts = ["--max-restarts", str(max_restarts)] if max_restarts else []
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *rendezvous, *restarts,
            *args]


class Job:
    """``torchrun ... -m spmd_rlhf.train OVERRIDES`` as a new process-group leader, output to ``log``.

    ``max_restarts > 0``: torchrun restarts failed workers. Its agent shares its rendezvous store
    with the workers by default, and a restarted process group then reads the previous attempt's
    addresses from it and hangs (torch 2.13; pytorch/pytorch#135712), so restarts use the c10d
    rendezvous with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: a fresh store for every attempt;
    ``shared_store=True`` keeps torchrun's default (static rendezvous) instead.
    """

    def __init__(self, overrides: list[str], nproc: int, log: Path, max_restarts: int = 0,
                 shared_store: bool = False, env: dict[str, str] | None = None):
        self.log = log
        self.nproc = nproc
        self.census_dir = log.with_suffix(".census")
        self._out = open(log, "w")
        fresh_store = max_restarts > 0 and not shared_store
        cmd = torchrun_cmd(["-m", "tests.integration.exit_census", *overrides], nproc, max_restarts,
                           c10d=fresh_store)
        env = {**({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if fresh_store else {}),
               CENSUS_DIR_VAR: str(self.census_dir), **(env or {})}
        self.proc = subprocess.Popen(cmd, env=child_env(env), cwd=REPO_ROOT, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        """The exit status; on timeout the whole job is killed and the test fails."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the job did not end within {timeout} s\n{self.output()[-6000:]}") from None
        finally:
            self._out.close()

    def kill(self, workers: list[int] | None = None) -> None:
        """SIGKILL to each worker's process group, then to the agent's; wait until all are gone.
        ``workers``: their ids if already known (finding them takes a few milliseconds)."""
        workers = self.workers() if workers is None else workers  # before the agent dies and they are re-parented
        for group in [*workers, self.proc.pid]:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self._out.close()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in workers):
            assert time.monotonic() < deadline, f"workers {workers} still alive 30 s after SIGKILL"
            time.sleep(0.01)

    def wait_until(self, predicate: Callable[[], Any], timeout: float, what: str, poll_s: float = 0.02) -> Any:
        """Poll ``predicate`` until it returns something true, and return that; fail if the job
        exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if self.proc.poll() is not None:
                raise AssertionError(f"the job exited ({self.proc.returncode}) before {what}\n{self.output()[-6000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {what} within {timeout} s\n{self.output()[-6000:]}")
            time.sleep(poll_s)
        return value

    def workers(self) -> list[int]:
        """Process ids of the torchrun agent's children (the ranks)."""
        return children(self.proc.pid)

    def worker_with_rank(self, rank: int) -> int:
        """The process id of the worker whose environment has ``RANK=rank``."""
        for pid in self.workers():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return pid
        raise AssertionError(f"no worker with RANK={rank} among {self.workers()}")

    def exit_census(self) -> dict[int, dict]:
        """What each rank that reached interpreter exit left alive (by rank; see exit_census)."""
        found = {}
        for path in sorted(self.census_dir.glob("rank*.json")):
            census = json.loads(path.read_text())
            found[census["rank"]] = census
        return found


def assert_clean_exit(job: Job, ranks: list[int] | None = None) -> None:
    """Each of ``ranks`` (default: all) reached interpreter exit with no process-group thread left,
    so finalisation could not abort on one, and no rank aborted. After an error, torchrun may end
    the other ranks with SIGTERM before they get there: name the rank that failed."""
    ranks = list(range(job.nproc)) if ranks is None else ranks
    out = job.output()
    assert "terminate called" not in out, out[-6000:]
    census = job.exit_census()
    assert set(ranks) <= set(census), f"ranks that reached exit: {sorted(census)}, expected {ranks}\n{out[-3000:]}"
    alive = {rank: [t for t in census[rank]["threads"] if t in PROCESS_GROUP_THREADS] for rank in ranks}
    assert not any(alive.values()), f"process-group threads alive at interpreter exit: {alive}"


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]  # a line being written is skipped


def train_records(run_dir: Path) -> dict[int, dict]:
    """The LAST training record of every step (steps re-run after a resume appear twice)."""
    return {r["step"]: r for r in records(run_dir) if "reward/mean" in r}


def eval_records(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "eval/accuracy" in r]


def logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir) if "reward/mean" in r]


def training_metrics(record: dict) -> dict:
    """Everything but the time stamp and the timing/speed keys."""
    return {k: v for k, v in record.items() if k != "time" and not k.startswith(TIMING_PREFIXES)}


def checkpoint_done(checkpoint_dir: Path, step: int) -> bool:
    """The step folder is published and ``latest`` names it (or a later step)."""
    latest = checkpoint_dir / LATEST
    if not (is_complete(str(checkpoint_dir / step_folder_name(step))) and latest.is_file()):
        return False
    try:
        return latest.read_text().strip() >= step_folder_name(step)
    except OSError:
        return False


def latest_name(checkpoint_dir: Path) -> str:
    return (checkpoint_dir / LATEST).read_text().strip()
