"""Metrics: reduced across ranks, then written by rank 0 to metrics.jsonl, the console and wandb.

Reduction by key: ``timing/*`` and ``*/max`` take the max over ranks (the slowest rank sets the
pace), ``*/min`` the min, counters (``*/count``, ``*errors``, ``*timeouts``, ``*/dropped*``) the
sum, everything else the mean. Token-weighted statistics (clip fractions, entropy, value and
advantage means) are made exact before that by ``global_means``: the same value on every rank.
Every rank must call ``log`` at the same steps (it is a collective).
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

from ..distributed.comm import all_reduce_floats

_SUM_MARKERS = ("/count", "errors", "timeouts", "/dropped", "/num_")


def _reduce_one(key: str, values: list[float]) -> float:
    if key.startswith("timing/") or key.endswith("/max"):
        return max(values)
    if key.endswith("/min"):
        return min(values)
    if any(marker in key for marker in _SUM_MARKERS):
        return sum(values)
    return sum(values) / len(values)


def memory_metrics(device: torch.device) -> dict[str, float]:
    """CUDA memory of this step (none on CPU): the PyTorch allocator's peak since the last call
    (the trainer's tensors; vLLM's weights and KV cache live in its own pool) and the device's
    memory in use now, whoever holds it (the sleeping engine included). Both reduce by max."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    return {"memory/torch_peak_gib/max": peak, "memory/device_used_gib/max": (total - free) / 2**30}


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


def global_means(sums_and_counts: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Exact means over every training rank (one collective): each key's (sum, count) of this rank,
    summed over ranks, divided once (a count of 0 everywhere gives 0). Every training rank calls it
    with the same keys; the result is the same on all of them, so ``reduce_metrics``' mean keeps it."""
    keys = sorted(sums_and_counts)
    flat = all_reduce_floats([float(x) for k in keys for x in sums_and_counts[k]])
    return {k: flat[2 * i] / flat[2 * i + 1] if flat[2 * i + 1] else 0.0 for i, k in enumerate(keys)}


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
    ranks that log (the training ranks; every rank when colocated).

    Rank 0's console: one progress bar labelled ``label`` (the algorithm) with reward, KL and
    tokens/s per GPU, or, without the bar, a line per step; messages (``write``) above it. Every
    line it prints, and a line per step, also goes to ``console.log`` in the run directory."""

    def __init__(self, run_dir: str, is_main: bool, total_steps: int, wandb_cfg=None, config_dict=None,
                 console: bool = True, progress_bar: bool = True, group: dist.ProcessGroup | None = None,
                 label: str = "grpo"):
        self.is_main = is_main
        self.group = group
        self.console = console and is_main
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a") if is_main else None
        self._console_log = open(os.path.join(run_dir, CONSOLE_LOG), "a") if is_main else None
        self._bar = None
        self._bar_args = dict(total=total_steps, desc=label, dynamic_ncols=True, leave=True)
        self._bar_pending = is_main and progress_bar
        self._wandb = None
        if is_main and wandb_cfg is not None and wandb_cfg.wandb:
            self._wandb = _start_wandb(run_dir, wandb_cfg, config_dict)

    def start(self, step: int) -> None:
        """Show the bar, from ``step`` (a resumed run's); the first ``log`` shows it from 0 otherwise."""
        if self._bar_pending:
            from tqdm import tqdm

            self._bar_pending = False
            self._bar = tqdm(initial=step, **self._bar_args)

    def log(self, step: int, metrics: dict[str, float], advance: bool = True) -> dict[str, float]:
        reduced = reduce_metrics(metrics, self.group)
        if not self.is_main:
            return reduced
        record = {"step": step, "time": round(time.time(), 3), **reduced}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(reduced, step=step)
        self.start(0)
        short = _short(reduced)
        line = f"step {step}: " + " ".join(f"{k}={_fmt(v)}" for k, v in short.items())
        if self._bar is not None and advance:
            self._bar.set_postfix(short, refresh=False)
            self._bar.update(step - self._bar.n)
        if self._bar is None or not advance:  # the bar shows a step's figures; other records get their line
            if self.console:
                self._print(line)
        self._keep(line)
        return reduced

    def write(self, text: str) -> None:
        """A message of rank 0 (other ranks: nothing), on the console and in ``console.log``."""
        if not self.is_main:
            return
        if self.console:
            self._print(text)
        self._keep(text)

    def _print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def _keep(self, text: str) -> None:
        if self._console_log is not None:
            self._console_log.write(text + "\n")
            self._console_log.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for f in (self._file, self._console_log):
            if f is not None:
                f.close()
        self._file = self._console_log = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


CONSOLE_LOG = "console.log"
# Console names of the metrics a step line and the bar show, the first key present of each name.
_SHORT_KEYS = {
    "reward": ("reward/mean", "rollout/reward"),
    "kl": ("actor/kl_to_ref", "actor/kl_loss"),
    "tok/s/gpu": ("perf/tokens_per_s_per_gpu",),
    "len": ("rollout/response_length",),
    "step_s": ("timing/step",),
    "eval_acc": ("eval/accuracy",),
    "sft_loss": ("sft/loss_last",),
    "sft_s": ("timing/sft",),
}


def _short(metrics: dict[str, float]) -> dict[str, float]:
    out = {}
    for short, keys in _SHORT_KEYS.items():
        present = [k for k in keys if k in metrics]
        if present:
            out[short] = metrics[present[0]]
    return out


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _start_wandb(run_dir: str, logging_cfg, config_dict):
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(project=logging_cfg.project, name=logging_cfg.run_name, dir=run_dir, mode=mode,
                      config=config_dict)
