"""A PNG dashboard of a run, drawn from its ``metrics.jsonl``: ``python -m spmd_rlhf.plot RUN_DIR``.

Writes ``RUN_DIR/dashboard.png``: one panel each for the reward, held-out accuracy, KL, entropy,
response length, clip fraction, gradient norm, step time stacked by phase (``timing/*``),
tokens/s per GPU and MFU. For people without wandb, and for a run still going (a partly written
last line is skipped). A panel whose metrics the run never logged says so instead of vanishing.
A resumed run appends to the same file; the last value logged for a step wins.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import sys
from dataclasses import dataclass

METRICS_FILE = "metrics.jsonl"
DASHBOARD_FILE = "dashboard.png"
GRID = (4, 3)  # rows, columns of panels
FIGSIZE = (13.0, 12.0)  # inches
DPI = 64
NOT_LOGGED = " (not logged)"
# timing/* keys that are not a phase of the RL step: the step itself, evaluations, the warm start
_NOT_PHASES = ("timing/step", "timing/eval", "timing/sft")
_MAX_BARS = 40  # steps up to which the phases are drawn as stacked bars
_PNG_COLORS = 128  # the written PNG is palette-quantized to this many colours (a few times smaller)

Series = dict[str, list[tuple[int, float]]]


@dataclass(frozen=True)
class Panel:
    """One plot: its title and the metric names (fnmatch patterns) it draws, one line each."""

    title: str
    patterns: tuple[str, ...]
    ylabel: str = ""
    stacked: bool = False  # the matched metrics are phases of one step: stacked bars
    hint: str = ""  # why a run may not log it, shown when it did not


PANELS = (
    Panel("reward", ("reward/mean",), "mean reward"),
    Panel("held-out accuracy", ("eval/*/accuracy", "eval/accuracy"), "accuracy"),
    Panel("KL to the reference", ("actor/kl_loss", "actor/kl_to_ref", "actor/kl_in_reward"), "KL per token"),
    Panel("entropy", ("actor/entropy",), "nats per token"),
    Panel("response length", ("rollout/response_length", "rollout/response_length/max"), "tokens"),
    Panel("clip fraction", ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "critic/vf_clipfrac"),
          "fraction of tokens"),
    Panel("gradient norm", ("actor/grad_norm", "critic/grad_norm"), "norm before clipping"),
    Panel("step time by phase", ("timing/*",), "seconds", stacked=True),
    Panel("tokens/s per GPU", ("perf/tokens_per_s_per_gpu",), "tokens/s"),
    Panel("MFU", ("perf/mfu/*",), "fraction of peak", hint="needs the device's peak FLOPs:\nknown GPUs, or set "
          "trainer.peak_tflops"),
)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl; lines that are not a whole JSON object (a run still
    writing its last line) are skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def collect_series(records: list[dict]) -> Series:
    """``{metric: [(step, value), ...]}`` sorted by step, finite numbers only; the last record of a
    step wins (a resumed run logs its steps again)."""
    by_key: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                by_key.setdefault(key, {})[record["step"]] = float(value)
    return {key: sorted(points.items()) for key, points in by_key.items()}


def panel_keys(panel: Panel, series: Series) -> list[str]:
    """The metrics a panel draws, in pattern order; a metric identical to one already drawn is
    left out (``eval/accuracy`` with a single data source)."""
    keys: list[str] = []
    for pattern in panel.patterns:
        for key in sorted(k for k in series if fnmatch.fnmatchcase(k, pattern)):
            if panel.stacked and key in _NOT_PHASES:
                continue
            if key not in keys and all(series[key] != series[k] for k in keys):
                keys.append(key)
    return keys


def _draw_lines(ax, keys: list[str], series: Series) -> None:
    for key in keys:
        steps, values = zip(*series[key])
        ax.plot(steps, values, label=key, marker="o" if len(steps) <= 20 else None, markersize=4)


def _draw_stack(ax, keys: list[str], series: Series) -> None:
    """Bars per step, one segment per phase, and what the phases leave of ``timing/step``."""
    steps = sorted({s for k in keys for s, _ in series[k]} & {s for s, _ in series.get("timing/step", [])}
                   or {s for k in keys for s, _ in series[k]})
    phases = {k: dict(series[k]) for k in keys}
    total = dict(series.get("timing/step", []))
    layers = {key.removeprefix("timing/"): [values.get(s, 0.0) for s in steps] for key, values in phases.items()}
    if total:
        done = [sum(column) for column in zip(*layers.values())]
        layers["other"] = [max(total.get(s, d) - d, 0.0) for s, d in zip(steps, done)]
    if len(steps) > _MAX_BARS:  # areas: bars this thin would only be noise
        ax.stackplot(steps, *layers.values(), labels=list(layers), linewidth=0)
        return
    bottom = [0.0] * len(steps)
    width = 0.8 if len(steps) < 2 else 0.8 * min(b - a for a, b in zip(steps, steps[1:]))
    for label, heights in layers.items():
        ax.bar(steps, heights, bottom=bottom, width=width, label=label, linewidth=0)
        bottom = [b + h for b, h in zip(bottom, heights)]


def _draw_panel(ax, panel: Panel, series: Series) -> str:
    """Draw one panel; returns its title (marked when the run logged none of its metrics)."""
    keys = panel_keys(panel, series)
    if not keys:
        title = panel.title + NOT_LOGGED
        text = "not logged in this run:\n" + "\n".join(panel.patterns) + (f"\n\n{panel.hint}" if panel.hint else "")
        ax.text(0.5, 0.5, text, ha="center", va="center",
                transform=ax.transAxes, color="0.4")
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        title = panel.title
        (_draw_stack if panel.stacked else _draw_lines)(ax, keys, series)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    ax.set_title(title)
    return title


def write_dashboard(run_dir: str) -> tuple[str, list[str]]:
    """Draw ``run_dir/metrics.jsonl`` into ``run_dir/dashboard.png``; returns the path and the
    panel titles in drawing order (row by row; a panel without data ends in " (not logged)")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = collect_series(read_metrics(os.path.join(run_dir, METRICS_FILE)))
    rows, cols = GRID
    fig, axes = plt.subplots(rows, cols, figsize=FIGSIZE, dpi=DPI, layout="constrained")
    flat = list(axes.flat)
    titles = [_draw_panel(ax, panel, series) for ax, panel in zip(flat, PANELS)]
    for ax in flat[len(PANELS):]:
        ax.set_visible(False)
    steps = [s for points in series.values() for s, _ in points]
    span = f"steps {min(steps)}-{max(steps)}" if steps else "no metrics yet"
    fig.suptitle(f"{os.path.basename(os.path.abspath(run_dir))}: {span}")
    path = os.path.join(run_dir, DASHBOARD_FILE)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    _quantize(path)
    return path, titles


def _quantize(path: str) -> None:
    """Rewrite the PNG with a palette of ``_PNG_COLORS`` colours (Pillow comes with matplotlib)."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=_PNG_COLORS)
    small.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(f"usage: python -m spmd_rlhf.plot RUN_DIR\n\n{__doc__.splitlines()[0]}", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    run_dir = args[0]
    if not os.path.isfile(os.path.join(run_dir, METRICS_FILE)):
        print(f"spmd_rlhf.plot: {run_dir} holds no {METRICS_FILE}; pass a run directory "
              "(the hydra.run.dir of a run)", file=sys.stderr)
        return 2
    path, titles = write_dashboard(run_dir)
    missing = [t.removesuffix(NOT_LOGGED) for t in titles if t.endswith(NOT_LOGGED)]
    print(f"wrote {path}" + (f" (not logged: {', '.join(missing)})" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
