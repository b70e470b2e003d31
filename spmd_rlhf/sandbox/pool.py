"""SandboxPool: worker processes, started once and reused, that run Programs and Calls under limits."""

from __future__ import annotations

import enum
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .isolation import kill_tree
from .protocol import encode, recv, write_all
from .types import Call, Outcome, Program, SandboxLimits, Status

_PROGRAM_GRACE_S = 5.0  # the worker enforces a program's timeout; the pool steps in this much later
_START_TIMEOUT_S = 60.0
_MAX_START_FAILURES = 3
_MAX_RETRIES = 2  # times a job goes to a fresh worker after its worker died before accepting it


class _State(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"  # killed by close()


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen
    request_fd: int
    result_fd: int
    log_path: str
    state: _State = _State.STARTING
    deadline: float = 0.0
    job: int = -1
    accepted: bool = False  # the worker read its job (one lost before that never started and is retried)
    network_isolated: bool = False


@dataclass
class _Batch:
    """One ``run_many`` call: its jobs, their outcomes so far, the jobs not yet handed out."""

    jobs: Sequence[Program | Call]
    results: list[Outcome | None]
    pending: deque[int]
    retries: dict[int, int]


def _close_fd(worker: _Worker, attr: str) -> None:
    fd = getattr(worker, attr)
    if fd >= 0:
        setattr(worker, attr, -1)
        os.close(fd)


def _kill(worker: _Worker, owner_pid: int, graceful_s: float) -> None:
    """End ``worker`` and everything under it (EOF first, SIGKILL of the tree after ``graceful_s``).

    Only the process that made the pool kills (a forked copy of the pool only closes its pipes).
    """
    _close_fd(worker, "request_fd")
    if os.getpid() != owner_pid:
        return
    try:
        worker.proc.wait(timeout=graceful_s)
    except subprocess.TimeoutExpired:
        pass
    kill_tree(worker.proc.pid, include_root=worker.proc.poll() is None)
    worker.proc.wait()


def _shutdown(workers: list[_Worker], base: str, owner_pid: int, release: bool = True) -> None:
    """End every worker (all get EOF, then a second in all to exit before SIGKILL); with ``release``,
    close the result pipes and remove the pool's directory too."""
    for worker in workers:
        _close_fd(worker, "request_fd")
    deadline = time.monotonic() + 1.0
    for worker in workers:
        _kill(worker, owner_pid, max(0.0, deadline - time.monotonic()))
        if release:
            _close_fd(worker, "result_fd")
    if release and os.getpid() == owner_pid:
        shutil.rmtree(base, ignore_errors=True)


_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class SandboxPool:
    """Runs untrusted Programs and fallible Calls in ``workers`` reusable processes.

    Each worker lives in a new network namespace (``network_isolated`` says whether that worked),
    reaps the orphans of what it runs, and forks one limited child per Program. A worker that
    crashes or overruns is killed with its process tree and replaced. ``close()`` (or leaving a
    ``with`` block, or garbage collection, or interpreter exit) ends every process of the pool.
    Methods may be called from several threads; calls are served one batch at a time.
    """

    def __init__(self, workers: int = 4, limits: SandboxLimits | None = None, *, preload: Sequence[str] = (),
                 network: bool = False, call_memory_mb: int | None = None, uid_base: int = 65533,
                 init: Sequence[tuple[str, dict]] = ()) -> None:
        if workers < 1:
            raise ValueError(f"sandbox workers={workers} must be >= 1")
        self.limits = limits or SandboxLimits()
        self.limits.validate()
        self._settings = {"network": network, "preload": list(preload), "call_memory_mb": call_memory_mb,
                          "init": [[target, dict(kwargs)] for target, kwargs in init]}
        self._uid_base = uid_base if os.geteuid() == 0 else None
        self._base = tempfile.mkdtemp(prefix="spmd_sandbox_")
        os.chmod(self._base, 0o711)
        self._lock = threading.Lock()  # one batch at a time
        self._spawn_lock = threading.Lock()  # close() against starting a replacement
        self._closed = False
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._base, os.getpid())
        try:
            self._workers.extend(self._spawn(i) for i in range(workers))
            self._await_start()
        except BaseException:
            self._finalizer()  # no half-started pool lingers
            raise
        self.network_isolated = all(w.network_isolated for w in self._workers)

    # -- processes -------------------------------------------------------------------------------

    def _spawn(self, index: int) -> _Worker:
        request_r, request_w = os.pipe()
        result_r, result_w = os.pipe()
        workdir = os.path.join(self._base, f"w{index}")
        os.makedirs(workdir, mode=0o711, exist_ok=True)
        uid = None if self._uid_base is None else self._uid_base - index
        settings = json.dumps({**self._settings, "uid": uid})
        path = [p or os.getcwd() for p in sys.path]  # "" (the caller's directory) too: workers run elsewhere
        # one BLAS/OpenMP thread per worker, as for programs: per-core buffers of a 100-core node would
        # take gigabytes of address space in every worker
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), **_ONE_THREAD}
        log_path = os.path.join(self._base, f"w{index}.log")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "spmd_rlhf.sandbox.worker", str(request_r), str(result_w), settings],
                pass_fds=(request_r, result_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=log, cwd=workdir, env=env, start_new_session=True)
        os.close(request_r)
        os.close(result_w)
        deadline = time.monotonic() + _START_TIMEOUT_S
        return _Worker(index, proc, request_w, result_r, log_path, deadline=deadline)

    def _log_tail(self, worker: _Worker) -> str:
        try:
            with open(worker.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def _replace(self, worker: _Worker) -> None:
        """Kill ``worker`` (tree and all) and start a new one in its slot (none once closed)."""
        with self._spawn_lock:
            _kill(worker, os.getpid(), 0.0)
            if self._closed:
                worker.state = _State.DEAD
                return
            _close_fd(worker, "result_fd")
            self._workers[worker.index] = self._spawn(worker.index)

    def _on_hello(self, worker: _Worker, message: dict | None, failures: list[str]) -> None:
        if message is not None and message.get("hello"):
            worker.state = _State.IDLE
            worker.network_isolated = bool(message["network_isolated"])
            return
        reason = (message or {}).get("stderr") or f"exit code {worker.proc.poll()}: {self._log_tail(worker)}"
        failures.append(reason)
        if len(failures) >= _MAX_START_FAILURES:
            raise RuntimeError(f"sandbox workers fail to start: {reason}")
        self._replace(worker)

    def _await_start(self) -> None:
        failures: list[str] = []
        while any(w.state is _State.STARTING for w in self._workers):
            self._serve(_Batch([], [], deque(), {}), failures)

    # -- dispatch --------------------------------------------------------------------------------

    def _request(self, job: Program | Call) -> dict:
        if isinstance(job, Call):
            return {"kind": "call", "target": job.target, "kwargs": job.kwargs}
        limits = job.limits or self.limits
        return {"kind": "program", "code": job.code, "stdin": job.stdin,
                "limits": {**asdict(limits), "cpu_s": limits.cpu_seconds}}

    @staticmethod
    def _budget(job: Program | Call, limits: SandboxLimits) -> float:
        if isinstance(job, Call):
            return job.timeout_s
        return (job.limits or limits).timeout_s + _PROGRAM_GRACE_S

    def _assign(self, batch: _Batch) -> None:
        for worker in list(self._workers):
            if worker.state is not _State.IDLE or not batch.pending:
                continue
            index = batch.pending.popleft()
            try:
                payload = encode(self._request(batch.jobs[index]))
            except (TypeError, ValueError) as exc:  # arguments JSON cannot carry
                batch.results[index] = Outcome(Status.SANDBOX_ERROR, stderr=f"cannot send the job: {exc}")
                continue
            try:
                write_all(worker.request_fd, payload)
            except OSError:  # it died while idle: start another, retry the job
                batch.pending.appendleft(index)
                self._replace(worker)
                continue
            worker.state, worker.job, worker.accepted = _State.BUSY, index, False
            worker.deadline = time.monotonic() + self._budget(batch.jobs[index], self.limits)

    def _lost(self, worker: _Worker, index: int, batch: _Batch) -> None:
        """``worker`` died during job ``index``: retry a job it never read, else report the death."""
        if not worker.accepted and batch.retries.get(index, 0) < _MAX_RETRIES:
            batch.retries[index] = batch.retries.get(index, 0) + 1
            batch.pending.appendleft(index)  # it died while idle, before the pool saw it: not the job's doing
        else:
            reason = f"sandbox worker died (exit code {worker.proc.wait()}): {self._log_tail(worker)}"
            batch.results[index] = Outcome(Status.SANDBOX_ERROR, stderr=reason)
        self._replace(worker)

    def _finish(self, worker: _Worker, message: dict | None, batch: _Batch) -> None:
        if message is not None and message.get("accepted"):
            worker.accepted = True
            return
        index = worker.job
        worker.state, worker.job = _State.IDLE, -1
        if message is None:
            self._lost(worker, index, batch)
            return
        batch.results[index] = Outcome(
            Status(message["status"]), stdout=message.get("stdout", ""), stderr=message.get("stderr", ""),
            duration_s=float(message.get("duration_s", 0.0)), exit_code=message.get("exit_code"),
            value=message.get("value"))

    def _expire(self, worker: _Worker, batch: _Batch) -> None:
        now = time.monotonic()
        if worker.state is _State.BUSY and now >= worker.deadline:
            budget = self._budget(batch.jobs[worker.job], self.limits)
            batch.results[worker.job] = Outcome(Status.TIMEOUT, stderr=f"killed after {budget:.3g} s", duration_s=budget)
            worker.state = _State.IDLE
            self._replace(worker)
        elif worker.state is _State.STARTING and now >= worker.deadline:
            raise RuntimeError(f"a sandbox worker did not start in {_START_TIMEOUT_S} s: {self._log_tail(worker)}")

    def _serve(self, batch: _Batch, failures: list[str]) -> None:
        """Wait for one round of messages or deadlines and handle them."""
        waiting = {w.result_fd: w for w in self._workers if w.state in (_State.STARTING, _State.BUSY)}
        if not waiting:
            return
        timeout = max(0.0, min(w.deadline for w in waiting.values()) - time.monotonic())
        poller = select.poll()  # not select.select: a trainer's descriptors are often past 1024
        for fd in waiting:
            poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(timeout * 1000):
            worker = waiting[fd]
            message = recv(fd)
            if worker.state is _State.STARTING:
                self._on_hello(worker, message, failures)
            else:
                self._finish(worker, message, batch)
        for worker in list(self._workers):
            self._expire(worker, batch)

    def run_many(self, jobs: Sequence[Program | Call]) -> list[Outcome]:
        """Run ``jobs`` on the workers in parallel; one Outcome per job, in order. Never raises for a job."""
        with self._lock:
            if self._closed:
                raise RuntimeError("SandboxPool is closed")
            batch = _Batch(jobs, [None] * len(jobs), deque(range(len(jobs))), {})
            failures: list[str] = []
            while batch.pending or any(w.state is not _State.IDLE for w in self._workers):
                if self._closed:  # closed from another thread: what did not finish gets no result
                    gone = Outcome(Status.SANDBOX_ERROR, stderr="SandboxPool closed during the call")
                    return [gone if r is None else r for r in batch.results]
                self._assign(batch)
                self._serve(batch, failures)
            return batch.results  # type: ignore[return-value]

    def run(self, code: str, stdin: str = "", limits: SandboxLimits | None = None) -> Outcome:
        """Run one program (see Program)."""
        return self.run_many([Program(code, stdin, limits)])[0]

    def call(self, target: str, kwargs: dict | None = None, timeout_s: float = 5.0) -> Outcome:
        """Call ``module:function(**kwargs)`` in a worker (see Call); the value is ``Outcome.value``."""
        return self.run_many([Call(target, kwargs or {}, timeout_s)])[0]

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [w.proc.pid for w in self._workers]

    def close(self) -> None:
        """End every worker and every process they started; remove the pool's directory. Idempotent.

        A batch running in another thread ends at once, its unfinished jobs with SANDBOX_ERROR.
        """
        with self._spawn_lock:
            if self._closed:
                return
            self._closed = True
            _shutdown(self._workers, self._base, os.getpid(), release=False)  # wakes a waiting batch
        with self._lock:
            self._finalizer()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
