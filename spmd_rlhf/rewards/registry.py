"""Reward functions by data source, user reward functions by path, and a fault-tolerant scorer.

A reward function has the verl signature::

    fn(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None) -> float | dict

and is called with keyword arguments. A dict result must contain ``"score"``; its other numeric
entries are reported as metrics ``reward/extra/<key>`` (averaged over the responses that gave them).

Sandboxed rewards (code execution, math-verify) are planned instead: ``plan(solution_str, ground_truth,
extra_info, ctx) -> RewardPlan`` lists sandbox jobs and how their outcomes become the reward. The
scorer runs the jobs of a whole batch together on its sandbox pools; ``get_reward_fn`` still returns a
function with the signature above (it starts a short-lived pool per call: slow, for ad-hoc use).
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib
import importlib.util
import logging
import math
import numbers
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..sandbox import SandboxLimits
from .sandboxed import (CODE_SCORES, PlanFn, RewardContext, RewardPlan, RewardTimedOut, SandboxRunner,
                        plan_custom, portable_path, run_plan)

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Any]
_REGISTRY: dict[str, RewardFn] = {}
_BUILTIN_MODULES = ("spmd_rlhf.rewards.math", "spmd_rlhf.rewards.math_equiv", "spmd_rlhf.rewards.code")
_CUSTOM_KEY = "reward.custom_function"
_SANDBOXED: dict[str, PlanFn] = {}
def register_sandboxed_reward(*data_sources: str) -> Callable[[PlanFn], PlanFn]:
    """Register ``plan(solution_str, ground_truth, extra_info, ctx) -> RewardPlan`` for ``data_sources``.

    The registry also gets a plain reward function (the verl signature) that runs the plan with the
    default RewardContext on a short-lived pool.
    """
    if not data_sources:
        raise ValueError("register_sandboxed_reward needs at least one data source name")

    def decorator(plan: PlanFn) -> PlanFn:
        def adapter(
            data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None
        ) -> Any:
            del data_source
            return run_plan(plan(solution_str, ground_truth, extra_info, RewardContext()))

        adapter.__name__ = adapter.__qualname__ = f"{plan.__name__}_reward"
        adapter.__doc__ = plan.__doc__
        for source in data_sources:
            _REGISTRY[source] = adapter
            _SANDBOXED[source] = plan
        return plan

    return decorator


def register_reward(*data_sources: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(solution_str, ground_truth, extra_info)`` as the reward for ``data_sources``.

    The registry stores an adapter with the full reward signature; the decorated function itself is
    returned unchanged.
    """
    if not data_sources:
        raise ValueError("register_reward needs at least one data source name")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        def adapter(
            data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None
        ) -> Any:
            del data_source
            return fn(solution_str, ground_truth, extra_info)

        adapter.__name__ = adapter.__qualname__ = f"{fn.__name__}_reward"
        adapter.__doc__ = fn.__doc__
        for source in data_sources:
            _REGISTRY[source] = adapter
        return fn

    return decorator


def _load_builtins() -> None:
    """Import the modules whose decorators fill the registry."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def known_sources() -> list[str]:
    """Names of every data source with a built-in reward."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_reward_fn(data_source: str) -> RewardFn:
    """The built-in reward function for ``data_source``."""
    _load_builtins()
    if data_source not in _REGISTRY:
        raise ValueError(
            f"no built-in reward for data_source {data_source!r}; known sources: "
            f"{', '.join(sorted(_REGISTRY))}. Set {_CUSTOM_KEY}='package.module:function' "
            f"(or '/path/to/file.py:function') to score it with your own function."
        )
    return _REGISTRY[data_source]


def _import_file(file_path: str) -> Any:
    """Import a Python file as a uniquely named module."""
    if not os.path.isfile(file_path):
        raise FileNotFoundError(
            f"{_CUSTOM_KEY}: file {file_path!r} does not exist; give an existing .py file"
        )
    name = f"_spmd_rlhf_custom_reward_{abs(hash(os.path.abspath(file_path)))}"
    spec = importlib.util.spec_from_file_location(name, file_path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{_CUSTOM_KEY}: cannot import {file_path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_function(path: str) -> Callable[..., Any]:
    """Load ``"package.module:function"`` or ``"/path/to/file.py:function"``."""
    target, sep, attr = path.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(
            f"{_CUSTOM_KEY}={path!r} must look like 'package.module:function' "
            f"or '/path/to/file.py:function'"
        )
    if target.endswith(".py") or os.sep in target or "/" in target:
        module = _import_file(target)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(
                f"{_CUSTOM_KEY}={path!r}: cannot import module {target!r} ({exc}); "
                f"check the module is on PYTHONPATH or give a file path"
            ) from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"{_CUSTOM_KEY}={path!r}: {target!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"{_CUSTOM_KEY}={path!r}: {attr!r} is not callable")
    return fn


class _RewardTimeout(BaseException):
    """Raised inside a reward function on timeout; a BaseException so that a broad
    ``except Exception`` in user code does not swallow it."""


def _raise_timeout(signum: int, frame: Any) -> None:
    raise _RewardTimeout()


class _BadValue(Exception):
    """A reward function returned something that is not a finite number (or a dict with one)."""


def _as_finite(value: Any, what: str) -> float:
    """``value`` as a finite float, or _BadValue."""
    if not isinstance(value, numbers.Real):
        raise _BadValue(f"{what} is {type(value).__name__} {value!r}, expected a number")
    result = float(value)
    if not math.isfinite(result):
        raise _BadValue(f"{what} is {result}, expected a finite number")
    return result


def _interpret(result: Any) -> tuple[float, dict[str, float]]:
    """Split a reward result into the score and its extra numeric metrics."""
    if not isinstance(result, dict):
        return _as_finite(result, "reward"), {}
    if "score" not in result:
        raise _BadValue(f"reward dict has no 'score' key (keys: {sorted(result)})")
    extras = {
        str(key): float(value)
        for key, value in result.items()
        if key != "score"
        and isinstance(value, numbers.Real)
        and math.isfinite(float(value))
    }
    return _as_finite(result["score"], "reward dict 'score'"), extras


class RewardScorer:
    """Scores responses with per-source built-ins or one custom function, never raising for a bad call.

    Code and math sources are scored in sandbox pools (started on first use; ``close()`` ends them):
    ``sandbox_limits`` bound each test program, ``sandbox_workers`` is the size of each pool,
    ``code_score`` is "fraction" or "all_pass", ``math_timeout_s`` bounds one math-verify check.
    With ``sandbox_custom`` (the default) the custom function runs in sandbox workers too (a batch in
    parallel, killed with every process it started at ``timeout_s``, under ``sandbox_limits.memory_mb``
    of address space; its result must be a number or a dict of them). An Exception it raises scores
    0.0 (logged with its message); a BaseException that is no Exception stops the run (RewardAborted),
    as it does when the function runs in this process (``sandbox_custom=False``).

    A call that raises, returns a non-finite or non-numeric value, or runs past ``timeout_s`` scores
    0.0 and is counted in ``reward/errors`` or ``reward/timeouts``.

    Timeouts use SIGALRM on the main thread, which interrupts Python code (not a long-running C
    call, which is interrupted once it returns). Off the main thread the function runs in a worker
    thread and is abandoned after ``timeout_s``: a stuck thread cannot be killed and keeps running
    in the background (the worker pool is replaced so later calls are not queued behind it).
    """

    def __init__(
        self, custom_function: str | None, timeout_s: float, default_source: str | None = None, *,
        sandbox_limits: SandboxLimits | None = None, sandbox_workers: int | None = None,
        code_score: str = "fraction", math_timeout_s: float = 5.0, sandbox_custom: bool = True,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"reward.timeout_s={timeout_s} must be > 0 seconds")
        self.timeout_s = float(timeout_s)
        self.custom_fn = load_function(custom_function) if custom_function else None
        self.custom_function = portable_path(custom_function) if custom_function else None
        self.sandbox_custom = sandbox_custom  # the custom function runs in the sandbox, not in this process
        if default_source is not None:
            try:
                get_reward_fn(default_source)
            except ValueError as exc:
                raise ValueError(f"reward.default_source: {exc}") from exc
        self.default_source = default_source
        self._logged: set[str] = set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        if code_score not in CODE_SCORES:
            raise ValueError(f"reward.code_score must be one of {', '.join(CODE_SCORES)}, not {code_score!r}")
        if not math_timeout_s > 0:
            raise ValueError(f"reward.math_timeout_s must be > 0 seconds, not {math_timeout_s}")
        limits = sandbox_limits or SandboxLimits()
        limits.validate("reward.sandbox")
        self.sandbox_workers = sandbox_workers or min(4, os.cpu_count() or 1)
        if self.sandbox_workers < 1:
            raise ValueError(f"reward.sandbox.workers must be >= 1, not {sandbox_workers}")
        self.context = RewardContext(limits, code_score, float(math_timeout_s))
        self.sandbox = SandboxRunner(self.sandbox_workers, limits)  # pools start on the first sandboxed row

    def resolve(self, data_source: str) -> RewardFn:
        """The function that scores ``data_source`` (raises ValueError for an unknown source)."""
        if self.custom_fn is not None:
            return self.custom_fn
        if data_source not in known_sources() and self.default_source is not None:
            return get_reward_fn(self.default_source)
        return get_reward_fn(data_source)

    def _plan_fn(self, data_source: str) -> PlanFn | None:
        """The sandboxed plan that scores ``data_source``, or None when a plain function does."""
        if self.custom_function is not None and self.sandbox_custom:
            return functools.partial(plan_custom, self.custom_function, self.timeout_s, data_source)
        if self.custom_fn is not None:
            return None
        _load_builtins()
        if data_source not in _REGISTRY and self.default_source is not None:
            data_source = self.default_source
        return _SANDBOXED.get(data_source)

    def _failure(self, source: str, exc: BaseException) -> tuple[float, dict[str, float], str]:
        """Score 0 for a failed call, logged once per kind: (0.0, {}, "timeout" or "error")."""
        if isinstance(exc, (_RewardTimeout, RewardTimedOut)):
            self._log_once("timeout", f"reward for data_source {source!r} exceeded its time limit "
                           f"({exc or f'reward.timeout_s={self.timeout_s}'}); scored 0.0")
            return 0.0, {}, "timeout"
        if isinstance(exc, _BadValue):
            self._log_once("bad value", f"reward for data_source {source!r}: {exc}; scored 0.0")
        else:
            self._log_once("exception", f"reward for data_source {source!r} raised "
                           f"{type(exc).__name__}: {exc}; scored 0.0")
        return 0.0, {}, "error"

    def score_sandboxed(self, rows: list[dict[str, Any]]) -> list[tuple[float, dict[str, float], str | None]]:
        """Score rows whose data source has a sandboxed reward: plan each, run every job of the batch
        on the pools together, finish each. Results as ``score_one``'s."""
        results: list[tuple[float, dict[str, float], str | None] | None] = [None] * len(rows)
        plans: dict[int, RewardPlan] = {}
        for i, row in enumerate(rows):
            plan_fn = self._plan_fn(row["data_source"])
            assert plan_fn is not None
            try:
                plans[i] = plan_fn(row["solution_str"], row["ground_truth"], row["extra_info"], self.context)
            except Exception as exc:  # a malformed ground truth must not crash the run
                results[i] = self._failure(row["data_source"], exc)
        jobs = [job for plan in plans.values() for job in plan.jobs]
        outcomes = iter(self.sandbox.run(jobs) if jobs else [])
        for i, plan in plans.items():
            mine = [next(outcomes) for _ in plan.jobs]
            try:
                results[i] = (*_interpret(plan.finish(mine)), None)
            except Exception as exc:
                results[i] = self._failure(rows[i]["data_source"], exc)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """End the sandbox pools (every worker process and what it started). Call at the end of a run;
        a later ``score`` starts them again."""
        self.sandbox.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _call_with_alarm(self, fn: RewardFn, kwargs: dict[str, Any]) -> Any:
        """Run ``fn`` on the main thread under a SIGALRM timer; restores the previous handler/timer."""
        old_handler = signal.signal(signal.SIGALRM, _raise_timeout)
        old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
        start = time.monotonic()
        try:
            return fn(**kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
            if old_delay > 0:
                remaining = max(old_delay - (time.monotonic() - start), 1e-6)
                signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)

    def _call_in_thread(self, fn: RewardFn, kwargs: dict[str, Any]) -> Any:
        """Run ``fn`` in a worker thread and give up on it after ``timeout_s``."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="reward"
            )
        future = self._executor.submit(fn, **kwargs)
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError as exc:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            raise _RewardTimeout() from exc

    def _call(self, fn: RewardFn, kwargs: dict[str, Any]) -> Any:
        on_main = threading.current_thread() is threading.main_thread()
        if on_main and hasattr(signal, "SIGALRM"):
            return self._call_with_alarm(fn, kwargs)
        return self._call_in_thread(fn, kwargs)

    def _log_once(self, kind: str, message: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            logger.warning("%s (only the first reward %s is logged)", message, kind)

    def score_one(self, kwargs: dict[str, Any]) -> tuple[float, dict[str, float], str | None]:
        """Score one response: (score, extra metrics, failure kind or None)."""
        fn = self.resolve(kwargs["data_source"])
        try:
            return (*_interpret(self._call(fn, kwargs)), None)
        except (_RewardTimeout, Exception) as exc:  # a user reward function may raise anything
            return self._failure(kwargs["data_source"], exc)

    def score(
        self,
        data_sources: list[str],
        responses: list[str],
        ground_truths: list[str],
        extra_infos: list[dict | None],
    ) -> tuple[list[float], dict[str, float]]:
        """Scores for each response and metrics: ``reward/mean``, ``reward/errors``,
        ``reward/timeouts`` (counts in this call) and ``reward/extra/<key>`` means."""
        lengths = {len(data_sources), len(responses), len(ground_truths), len(extra_infos)}
        if len(lengths) != 1:
            raise ValueError(f"RewardScorer.score: argument lists differ in length ({lengths})")
        rows = [
            dict(data_source=source, solution_str=response, ground_truth=truth, extra_info=extra)
            for source, response, truth, extra in zip(data_sources, responses, ground_truths, extra_infos)
        ]
        for row in rows:
            self.resolve(row["data_source"])  # an unknown source raises before anything runs
        sandboxed = [i for i, row in enumerate(rows) if self._plan_fn(row["data_source"]) is not None]
        results = dict(zip(sandboxed, self.score_sandboxed([rows[i] for i in sandboxed])))
        scores: list[float] = []
        counts = {"error": 0, "timeout": 0}
        extra_sums: dict[str, list[float]] = {}
        for i, row in enumerate(rows):
            value, extras, failure = results[i] if i in results else self.score_one(row)
            scores.append(value)
            if failure is not None:
                counts[failure] += 1
            for key, extra_value in extras.items():
                extra_sums.setdefault(key, []).append(extra_value)
        metrics = {
            "reward/mean": sum(scores) / len(scores) if scores else 0.0,
            "reward/errors": float(counts["error"]),
            "reward/timeouts": float(counts["timeout"]),
        }
        for key, values in extra_sums.items():
            metrics[f"reward/extra/{key}"] = sum(values) / len(values)
        return scores, metrics
