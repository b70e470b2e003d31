"""Sandboxed rewards: plans of sandbox jobs, their context, and the pools that run them."""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..sandbox import Call, Outcome, Program, SandboxLimits, SandboxPool, Status

CUSTOM_TARGET = "spmd_rlhf.rewards.sandboxed:call_custom"
LOAD_TARGET = "spmd_rlhf.rewards.sandboxed:load_custom"
_custom_functions: dict[str, Callable[..., Any]] = {}

CODE_SCORES = ("fraction", "all_pass")


@dataclass(frozen=True)
class RewardContext:
    """What sandboxed rewards take from the configuration."""

    limits: SandboxLimits = field(default_factory=SandboxLimits)  # each code test program
    code_score: str = "fraction"  # fraction of tests passed | all_pass (1.0 only when every test passes)
    math_timeout_s: float = 5.0  # one math-verify check


@dataclass
class RewardPlan:
    """Sandbox jobs for one response and ``finish(outcomes) -> reward`` (a float, or a dict with "score")."""

    jobs: list[Program | Call]
    finish: Callable[[list[Outcome]], Any]


PlanFn = Callable[[str, str, "dict | None", RewardContext], RewardPlan]


class RewardAborted(BaseException):
    """A sandboxed user reward raised a BaseException that is no Exception: the run stops with its
    message, as it would had the function run in the trainer's process."""


def portable_path(path: str) -> str:
    """``reward.custom_function`` as a sandbox worker (another working directory) finds it: a file
    path made absolute; a module path as it is."""
    target, _, attr = path.rpartition(":")
    if target.endswith(".py") or "/" in target or os.sep in target:
        return f"{os.path.abspath(target)}:{attr}"
    return path


class RewardTimedOut(Exception):
    """Raised by a RewardPlan's finish when its sandbox job ran out of time (scored 0, counted as a timeout)."""


def _preload(jobs: list[Program | Call]) -> tuple[str, ...]:
    calls = [job for job in jobs if isinstance(job, Call)]
    return tuple(sorted({job.target.partition(":")[0] for job in calls} | {m for job in calls for m in job.preload}))


def _init(jobs: list[Program | Call]) -> list[tuple[str, dict]]:
    """The user reward files a Call pool's workers load before their memory limit."""
    paths = sorted({job.kwargs["path"] for job in jobs if isinstance(job, Call) and job.target == CUSTOM_TARGET})
    return [(LOAD_TARGET, {"path": path}) for path in paths]


def _plain(value: Any) -> Any:
    """A reward result as JSON carries it: numbers (numpy scalars too) as floats, dicts of them."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def _jsonable(value: Any) -> Any:
    """What json.dumps cannot write, as it best can (arrays as lists, the rest as text)."""
    tolist = getattr(value, "tolist", None)  # numpy/pyarrow values in a row's extra_info
    return tolist() if callable(tolist) else str(value)


def load_custom(path: str) -> None:
    """Inside a sandbox worker, before its memory limit: load the user's reward function at ``path``
    (its module's imports happen here, not within a call's address-space allowance)."""
    from .registry import load_function

    if path not in _custom_functions:
        _custom_functions[path] = load_function(path)


def call_custom(path: str, kwargs: dict[str, Any]) -> Any:
    """Inside a sandbox worker: the user's reward function at ``path`` called with ``kwargs``."""
    load_custom(path)
    return _plain(_custom_functions[path](**kwargs))


def plan_custom(path: str, timeout_s: float, data_source: str, solution_str: str, ground_truth: str,
                extra_info: dict | None, ctx: RewardContext | None = None) -> RewardPlan:
    """The user's reward function as one sandboxed call (killed with whatever it started at ``timeout_s``)."""
    del ctx  # the custom function gets the row only
    row = dict(data_source=data_source, solution_str=solution_str, ground_truth=ground_truth, extra_info=extra_info)
    kwargs = json.loads(json.dumps(row, default=_jsonable))
    job = Call(CUSTOM_TARGET, {"path": path, "kwargs": kwargs}, timeout_s)

    def finish(outcomes: list[Outcome]) -> Any:
        (outcome,) = outcomes
        if outcome.status is Status.TIMEOUT:
            raise RewardTimedOut(f"reward.timeout_s={timeout_s}")
        if outcome.status is Status.ABORTED:
            raise RewardAborted(f"in the reward sandbox:\n{outcome.stderr[-2000:]}")
        if not outcome.ok:  # the traceback's last line is the user's exception and its message
            raise RuntimeError(f"{outcome.status.value} in the reward sandbox:\n{outcome.stderr[-1000:]}")
        return outcome.value

    return RewardPlan([job], finish)


def run_plan(plan: RewardPlan, runner: SandboxRunner | None = None) -> Any:
    """Run ``plan``'s jobs (on ``runner``'s pools, else on short-lived ones) and finish it."""
    if runner is not None:
        return plan.finish(runner.run(plan.jobs) if plan.jobs else [])
    with SandboxRunner(workers=1, limits=SandboxLimits()) as own:
        return plan.finish(own.run(plan.jobs) if plan.jobs else [])


class SandboxRunner:
    """Two sandbox pools started on first use: one for Programs, one for Calls (its workers import the
    calls' modules up front)."""

    def __init__(self, workers: int, limits: SandboxLimits) -> None:
        self.workers = workers
        self.limits = limits
        self._pools: dict[type, SandboxPool] = {}

    def _pool(self, kind: type, jobs: list[Program | Call]) -> SandboxPool:
        if kind not in self._pools:
            memory = self.limits.memory_mb if kind is Call else None  # a Call runs in the worker itself
            self._pools[kind] = SandboxPool(self.workers, self.limits, preload=_preload(jobs), call_memory_mb=memory,
                                            init=_init(jobs))
        return self._pools[kind]

    def run(self, jobs: list[Program | Call]) -> list[Outcome]:
        """Outcomes of ``jobs``, in order; programs and calls each run in parallel on their pool."""
        outcomes: list[Outcome | None] = [None] * len(jobs)
        for kind in (Program, Call):
            picked = [i for i, job in enumerate(jobs) if isinstance(job, kind)]
            if picked:
                batch = [jobs[i] for i in picked]
                for i, outcome in zip(picked, self._pool(kind, batch).run_many(batch)):
                    outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]

    def close(self) -> None:
        """End both pools (every worker and every process they started)."""
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()

    def __enter__(self) -> SandboxRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
