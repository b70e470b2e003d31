"""``spmd_rlhf.plot``: the dashboard PNG of a run's metrics.jsonl, checked from the file itself."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from spmd_rlhf import plot
from tests.launch import child_env

pytest.importorskip("matplotlib")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOGGED = ["reward", "held-out accuracy", "KL to the reference", "response length", "clip fraction", "gradient norm",
          "step time by phase", "tokens/s per GPU"]
NOT_LOGGED = ["entropy", "MFU"]  # the synthetic run below logs neither


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def step_record(step: int) -> dict:
    return {"step": step, "time": 1.0 + step, "reward/mean": 0.1 * step, "actor/kl_loss": 0.01 * step,
            "rollout/response_length": 10.0 + step, "rollout/response_length/max": 20.0 + step,
            "actor/pg_clipfrac": 0.02, "actor/grad_norm": 1.0 + step % 3, "timing/generate": 1.0,
            "timing/update": 0.5, "timing/reshard": 0.1, "timing/step": 2.0, "perf/tokens_per_s_per_gpu": 100.0 * step}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run of 6 steps that evaluated before and after, resumed once (steps 4-5 logged twice), and
    still writing its last line."""
    records = [{"step": 0, "time": 0.5, "eval/accuracy": 0.3, "eval/gsm8k/accuracy": 0.3, "timing/eval": 3.0}]
    records += [step_record(s) for s in range(1, 6)]
    records += [{**step_record(s), "reward/mean": -1.0} for s in (4, 5)]  # the resumed run's values win
    records += [step_record(6), {"step": 6, "time": 9.0, "eval/accuracy": 0.5, "eval/gsm8k/accuracy": 0.5}]
    lines = [json.dumps(r) for r in records] + ['{"step": 7, "reward/me']  # partly written
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    return tmp_path


def test_series_skip_the_partial_line_and_keep_the_last_value_of_a_step(run_dir: Path) -> None:
    series = plot.collect_series(plot.read_metrics(str(run_dir / "metrics.jsonl")))
    assert series["reward/mean"] == [(1, 0.1), (2, 0.2), (3, pytest.approx(0.3)), (4, -1.0), (5, -1.0),
                                     (6, pytest.approx(0.6))]
    assert [s for s, _ in series["eval/accuracy"]] == [0, 6]
    keys = plot.panel_keys(plot.PANELS[1], series)
    assert keys == ["eval/gsm8k/accuracy"], "eval/accuracy equals the one source's accuracy: drawn once"
    assert plot.panel_keys(plot.PANELS[7], series) == ["timing/generate", "timing/reshard", "timing/update"]


def panel_has_colour(pixels, row: int, col: int) -> bool:
    """Whether the inner part of grid cell (row, col) holds saturated (line or bar) pixels."""
    rows, cols = plot.GRID
    height, width = pixels.shape[:2]
    top, left = height * row // rows, width * col // cols
    cell = pixels[top + height // rows // 5: top + height // rows * 4 // 5, left + width // cols // 5:
                  left + width // cols * 4 // 5, :3].astype(int)
    saturation = cell.max(axis=2) - cell.min(axis=2)
    return int((saturation > 60).sum()) > 30


def test_dashboard_is_a_png_with_the_panels_it_claims(run_dir: Path) -> None:
    import numpy as np
    from PIL import Image

    path, titles = plot.write_dashboard(str(run_dir))
    assert Path(path) == run_dir / "dashboard.png"
    assert png_size(Path(path)) == (round(plot.FIGSIZE[0] * plot.DPI), round(plot.FIGSIZE[1] * plot.DPI))
    assert titles[: len(plot.PANELS)] == [p.title + (plot.NOT_LOGGED if p.title in NOT_LOGGED else "")
                                         for p in plot.PANELS]
    assert set(LOGGED + NOT_LOGGED) == {p.title for p in plot.PANELS}
    pixels = np.asarray(Image.open(path).convert("RGB"))
    for index, title in enumerate(titles):
        drawn = panel_has_colour(pixels, *divmod(index, plot.GRID[1]))
        assert drawn == (not title.endswith(plot.NOT_LOGGED)), f"panel {title!r} at grid cell {index}"


def test_cli_writes_the_dashboard_and_names_what_was_not_logged(run_dir: Path, tmp_path_factory) -> None:
    proc = subprocess.run([sys.executable, "-m", "spmd_rlhf.plot", str(run_dir)], env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "not logged: entropy, MFU" in proc.stdout
    assert png_size(run_dir / "dashboard.png")[0] > 0
    empty = tmp_path_factory.mktemp("not_a_run")
    proc = subprocess.run([sys.executable, "-m", "spmd_rlhf.plot", str(empty)], env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "metrics.jsonl" in proc.stderr and "Traceback" not in proc.stderr
