"""Metrics: reduced across ranks, then written by rank 0 to metrics.jsonl, the console and wandb.

Reduction by key: ``timing/*`` and ``*/max`` take the max over ranks (the slowest rank sets the
pace), ``*/min`` the min, counters (``*/count``, ``*errors``, ``*timeouts``, ``*/dropped*``) the
sum, everything else the mean. Every rank must call ``log`` at the same steps (it is a
collective).
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

_SUM_MARKERS = ("/count", "errors", "timeouts", "/dropped", "/num_")


def _reduce_one(key: str, values: list[float]) -> float:
    if key.startswith("timing/") or key.endswith("/max"):
        return max(values)
    if key.endswith("/min"):
        return min(values)
    if any(marker in key for marker in _SUM_MARKERS):
        return sum(values)
    return sum(values) / len(values)


def reduce_metrics(metrics: dict[str, float], group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Combine the metrics of every rank of ``group`` (the world by default; same keys on every rank)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return dict(metrics)
    gathered: list[dict[str, float]] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
    dist.all_gather_object(gathered, metrics, group=group)
    keys = sorted(metrics)
    for rank, other in enumerate(gathered):
        assert sorted(other) == keys, f"rank {rank} logged different metric keys: {sorted(set(other) ^ set(keys))}"
    return {key: _reduce_one(key, [float(m[key]) for m in gathered]) for key in keys}


def rollout_metrics(token_ids: list[list[int]], finish_reasons: list[str], rewards_GN: torch.Tensor,
                    sequence_tokens: float, timings: dict[str, float]) -> dict[str, float]:
    """``rollout/*`` of this rank's groups and the throughput figures of its step
    (``perf/tokens_per_s``: prompt + response tokens of this rank's batch over the step time)."""
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.float32)
    stopped = sum(1 for f in finish_reasons if f == "stop")
    tokens_per_s = sequence_tokens / max(timings["timing/step"], 1e-9)
    return {
        "rollout/response_length": float(lengths.mean()),
        "rollout/response_length/max": float(lengths.max()),
        "rollout/stop_fraction": stopped / len(lengths),
        "rollout/reward": float(rewards_GN.mean()),
        "rollout/solve_all_groups": float((rewards_GN.min(dim=1).values >= 1.0).float().mean()),
        "rollout/solve_none_groups": float((rewards_GN.max(dim=1).values <= 0.0).float().mean()),
        "perf/tokens_per_s": tokens_per_s,  # this rank's, i.e. per GPU (the older name)
        "perf/tokens_per_s_per_gpu": tokens_per_s,
    }


class MetricsLogger:
    """Writes reduced metrics; only rank 0 touches files, the console and wandb. ``group``: the
    ranks that log (the training ranks; every rank when colocated)."""

    def __init__(self, run_dir: str, is_main: bool, total_steps: int, wandb_cfg=None, config_dict=None,
                 console: bool = True, progress_bar: bool = True, group: dist.ProcessGroup | None = None):
        self.is_main = is_main
        self.group = group
        self.console = console and is_main
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a") if is_main else None
        self._bar = None
        self._wandb = None
        if is_main and progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="grpo", dynamic_ncols=True, leave=True)
        if is_main and wandb_cfg is not None and wandb_cfg.wandb:
            self._wandb = _start_wandb(run_dir, wandb_cfg, config_dict)

    def log(self, step: int, metrics: dict[str, float], advance: bool = True) -> dict[str, float]:
        reduced = reduce_metrics(metrics, self.group)
        if not self.is_main:
            return reduced
        record = {"step": step, "time": round(time.time(), 3), **reduced}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(reduced, step=step)
        if self._bar is not None and advance:
            self._bar.update(1)
            self._bar.set_postfix(_short(reduced), refresh=False)
        if self.console:
            self.write(f"step {step}: " + " ".join(f"{k}={_fmt(v)}" for k, v in _short(reduced).items()))
        return reduced

    def write(self, text: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


_SHORT_KEYS = {
    "reward/mean": "reward",
    "actor/kl_loss": "kl",
    "rollout/response_length": "len",
    "timing/step": "step_s",
    "eval/accuracy": "eval_acc",
    "sft/loss_last": "sft_loss",
    "timing/sft": "sft_s",
}


def _short(metrics: dict[str, float]) -> dict[str, float]:
    return {short: metrics[key] for key, short in _SHORT_KEYS.items() if key in metrics}


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _start_wandb(run_dir: str, logging_cfg, config_dict):
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(project=logging_cfg.project, name=logging_cfg.run_name, dir=run_dir, mode=mode,
                      config=config_dict)
