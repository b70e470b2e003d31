"""What a run prints under torchrun (2 ranks, the embedded default, a short warm start): rank 0's
progress bar labelled with the algorithm, its messages once, no ``nan`` in the held-out table when
the last evaluation is off, a checkpoint at the end with ``trainer.save_every=0``, the verdict of
``trainer.resume=auto`` (fresh, then resumed with the bar continuing), ``console.log`` in the run
directory, and a configuration error as one line with no worker traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from spmd_rlhf.trainer.checkpoint_files import step_folder_name
from tests.integration.jobs import Job, assert_clean_exit

SHORT = ["trainer.sft.steps=20", "data.arithmetic.num_val=32", "trainer.batch_size=8", "trainer.mini_batch_size=8",
         "trainer.resume=auto"]
JOB_TIMEOUT = 300  # a hang guard: several times what these jobs take on a loaded 2-core machine


def run_job(args: list[str], log: Path) -> str:
    job = Job(args, 2, log)
    rc = job.wait(JOB_TIMEOUT)
    out = job.output()
    assert rc == 0, f"exit {rc}\n{out[-6000:]}"
    assert_clean_exit(job)
    return out


def bar_states(out: str) -> list[str]:
    """The progress bar's renderings (tqdm redraws the line with carriage returns)."""
    return [part.strip() for line in out.split("\n") for part in line.split("\r") if part.strip().startswith("grpo:")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, str, str]:
    """A fresh run of 2 steps without the final evaluation, then its resume to step 3."""
    tmp = tmp_path_factory.mktemp("console")
    run_dir = tmp / "run"
    common = [*SHORT, f"hydra.run.dir={run_dir}"]
    fresh = run_job([*common, "trainer.total_steps=2", "trainer.eval_after=false"], tmp / "fresh.log")
    resumed = run_job([*common, "trainer.total_steps=3", "trainer.eval_before=false"], tmp / "resumed.log")
    return run_dir, fresh, resumed


def test_one_bar_labelled_with_the_algorithm_showing_reward_kl_and_throughput(runs) -> None:
    _, fresh, _ = runs
    states = bar_states(fresh)
    assert states, fresh[-3000:]
    last = states[-1]
    assert last.startswith("grpo: 100%") and "2/2" in last, last
    for shown in ("reward=", "kl=", "tok/s/gpu="):
        assert shown in last, last
    assert not re.search(r"^step \d+: reward=", fresh, re.M), "with the bar, no step line is printed as well"


def test_messages_printed_once_and_no_nan(runs) -> None:
    _, fresh, _ = runs
    assert fresh.count("spmd_rlhf: world 2") == 1, fresh[-3000:]
    assert fresh.count("trainer.resume=auto found no checkpoint") == 1
    assert "nan" not in fresh.lower()
    table = fresh[re.search(r"^held-out ", fresh, re.M).start():].splitlines()
    assert table[0].split() == ["held-out", "before"], "the last evaluation is off: no after column"
    assert re.fullmatch(r"eval/accuracy\s+\d\.\d{3}", table[1].strip()), table[:3]


def test_a_checkpoint_at_the_end_without_save_every(runs) -> None:
    run_dir, fresh, _ = runs
    manifest = json.loads((run_dir / "checkpoints" / step_folder_name(2) / "manifest.json").read_text())
    assert "reference" in manifest["components"], "the embedded model's reference (its warm start) is kept"
    assert f"step 2: checkpoint {run_dir / 'checkpoints' / step_folder_name(2)}" in fresh


def test_resume_auto_says_where_it_resumed_and_the_bar_continues(runs) -> None:
    run_dir, _, resumed = runs
    assert f"resumed from {run_dir / 'checkpoints' / step_folder_name(2)} (step 2" in resumed
    states = bar_states(resumed)
    assert states and all(re.search(r"\b[23]/3\b", s) for s in states), states[:3]
    assert "3/3" in states[-1]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(3) >= 1 and max(steps) == 3


def test_the_run_directory_keeps_rank_zeros_console(runs) -> None:
    run_dir, fresh, resumed = runs
    kept = (run_dir / "console.log").read_text()
    assert kept.count("spmd_rlhf: world 2") == 2, "one line per run, both runs appended"
    for step in (1, 2, 3):
        assert re.search(rf"^step {step}: reward=\S+ kl=\S+ tok/s/gpu=", kept, re.M), kept
    assert "held-out" in kept and "resumed from" in kept
    assert "\r" not in kept, "no bar renderings in the kept log"


def test_a_configuration_error_is_one_line_without_a_worker_traceback(tmp_path) -> None:
    job = Job(["+trainer.total_step=3", f"hydra.run.dir={tmp_path / 'run'}"], 2, tmp_path / "error.log")
    assert job.wait(JOB_TIMEOUT) != 0
    out = job.output()
    assert out.count("spmd_rlhf: configuration error: trainer.total_step is not a configuration key") == 1, out
    # torchrun reports a failed worker itself (its ChildFailedError); the workers print no traceback
    assert "spmd_rlhf/train.py" not in out and "spmd_rlhf/config" not in out, out
