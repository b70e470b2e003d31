"""What a short real run leaves in its run directory: the dashboard of its metrics.jsonl, and with
``logging.wandb=true`` but no key, an offline wandb run holding the same metrics."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from spmd_rlhf import plot
from tests.launch import REPO_ROOT, child_env, run_reaped

WANDB_HEADER = 7  # ":W&B", a 2-byte magic and a version byte
LOG_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) records


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The embedded default, 2 steps, 1 rank, a short warm start; wandb on, offline by default."""
    run_dir = tmp_path_factory.mktemp("run") / "r"
    env = {k: v for k, v in child_env().items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env["HOME"] = str(run_dir.parent)  # no ~/.netrc or wandb settings of the machine's user
    proc = run_reaped([sys.executable, "-m", "spmd_rlhf.train",
                       f"hydra.run.dir={run_dir}", "trainer.total_steps=2", "trainer.sft.steps=20",
                       "data.arithmetic.num_val=32", "logging.wandb=true", "logging.progress_bar=false"],
                      timeout=400, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return run_dir


def test_dashboard_of_a_real_run(run_dir: Path) -> None:
    path, titles = plot.write_dashboard(str(run_dir))
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (round(plot.FIGSIZE[0] * plot.DPI), round(plot.FIGSIZE[1] * plot.DPI))
    logged = [t for t in titles if not t.endswith(plot.NOT_LOGGED)]
    assert logged == ["reward", "held-out accuracy", "KL to the reference", "entropy", "response length",
                      "clip fraction", "gradient norm", "step time by phase", "tokens/s per GPU"]
    assert titles[-1] == "MFU" + plot.NOT_LOGGED, "a CPU has no known peak: MFU is not logged"


def wandb_records(path: Path):
    """The protobuf records of a .wandb file (full, first, middle and last fragments joined)."""
    data, pos, pending = path.read_bytes(), WANDB_HEADER, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if LOG_BLOCK - pos % LOG_BLOCK < 7:  # a block's tail too short for a header is padding
            pos += LOG_BLOCK - pos % LOG_BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def test_wandb_without_a_key_writes_an_offline_run_with_the_metrics(run_dir: Path) -> None:
    from wandb.proto import wandb_internal_pb2

    runs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "one offline run, nothing sent"
    history: dict[int, dict[str, float]] = {}
    for raw in wandb_records(runs[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
    logged: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        logged.setdefault(record.pop("step"), {}).update(record)
    assert sorted(history) == sorted(logged) == [0, 1, 2]
    for step, metrics in logged.items():
        metrics.pop("time")
        assert metrics, step
        for key, value in metrics.items():
            assert history[step][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (step, key)
    assert "reward/mean" in history[2] and "eval/accuracy" in history[2]
