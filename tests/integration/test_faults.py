"""Faults of the real trainer under torchrun (gloo): a rank that raises ends the job with its
message; a preemption signal to one rank makes every rank save the same step and exit 0; a job
killed in the middle of a save leaves the previous checkpoint in charge; a damaged checkpoint given
as ``trainer.resume`` is refused with one message naming the file."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spmd_rlhf.trainer.checkpoint import load_model_weights
from spmd_rlhf.trainer.checkpoint_files import is_complete, newest_checkpoint, step_folder_name
from tests.integration import reward_raises_on_rank1
from tests.integration.jobs import (
    Job,
    assert_clean_exit,
    eval_records,
    latest_name,
    logged_steps,
    records,
    torchrun_cmd,
)
from tests.launch import REPO_ROOT, child_env, run_reaped

SHORT = ["trainer.sft.steps=100", "data.arithmetic.num_val=32", "logging.progress_bar=false"]
# Hang guards, not speed checks: several times what a job here takes on a loaded 2-core machine.
JOB_TIMEOUT = 300
# The collective timeout of jobs that must end on their own, far sooner: a job that waited for it
# instead would take at least this long, so "sooner" means under half of it, however loaded the
# machine (no fixed wall-clock budget).
COLLECTIVE_TIMEOUT_S = 600
SAVING_RE = re.compile(r"^step_(\d{8})\.tmp-[0-9a-f]{8}$")  # a save in progress (not -delete/-replaced)


@pytest.mark.slow
def test_a_rank_that_raises_stops_every_rank_with_its_message(tmp_path):
    """Rank 1's reward function (run in the reward sandbox, the default) raises an error the scorer
    does not catch, in step 3; rank 0 is then waiting in a collective. The job must end long before
    the collective timeout, with rank 1's message in the output once."""
    run_dir = tmp_path / "run"
    reward = f"{Path(reward_raises_on_rank1.__file__)}:reward"
    job = Job([*SHORT, f"hydra.run.dir={run_dir}", "trainer.total_steps=20", f"reward.custom_function={reward}",
               f"distributed.timeout_s={COLLECTIVE_TIMEOUT_S}"], 2, tmp_path / "job.log",
              env={reward_raises_on_rank1.CALLS_DIR_VAR: str(tmp_path)})  # in the sandbox workers (the default)
    rc = job.wait(JOB_TIMEOUT)
    ended = time.time()
    out = job.output()
    assert rc != 0, out[-6000:]
    assert logged_steps(run_dir) == [1, 2], "rank 1 raises in step 3 (its 300th reward call)"
    since_last_step = ended - records(run_dir)[-1]["time"]
    assert since_last_step < COLLECTIVE_TIMEOUT_S / 2, \
        f"the job took {since_last_step:.0f} s after the last step to end (collective timeout {COLLECTIVE_TIMEOUT_S} s)"
    assert out.count(reward_raises_on_rank1.MESSAGE) == 1, out[-6000:]
    line = next(ln for ln in out.splitlines() if reward_raises_on_rank1.MESSAGE in ln)
    assert "RewardCrash" in line, line
    assert_clean_exit(job, ranks=[1])  # the failed rank, too, ends its groups before exiting


def rank_file_names(checkpoint: Path) -> list[str]:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    return sorted(f for f in manifest["files"] if f.startswith("rng/"))


@pytest.mark.slow
def test_preemption_signal_to_one_rank_saves_every_rank_and_a_relaunch_finishes(tmp_path):
    total, run_dir = 12, tmp_path / "run"
    args = [*SHORT, f"hydra.run.dir={run_dir}", f"trainer.total_steps={total}", "trainer.save_every=0"]
    job = Job(args, 2, tmp_path / "job.log")
    job.wait_until(lambda: max(logged_steps(run_dir), default=0) >= 2, JOB_TIMEOUT, "two training steps")
    os.kill(job.worker_with_rank(1), signal.SIGUSR1)  # SLURM's warning signal, to rank 1 only
    rc = job.wait(JOB_TIMEOUT)
    out = job.output()
    assert rc == 0, out[-6000:]
    assert_clean_exit(job)
    stopped = max(logged_steps(run_dir))
    assert 2 <= stopped < total, f"stopped at step {stopped}"
    assert out.count("preemption signal received; saving and stopping") == 1, out[-6000:]
    ckpt = run_dir / "checkpoints"
    assert latest_name(ckpt) == step_folder_name(stopped), "one checkpoint, of the step every rank stopped at"
    assert sorted(os.listdir(ckpt)) == ["latest", step_folder_name(stopped)]
    assert rank_file_names(ckpt / step_folder_name(stopped)) == ["rng/rank_00000.pt", "rng/rank_00001.pt"]
    assert [r["step"] for r in eval_records(run_dir)] == [0], "no final evaluation after a preemption"

    again = Job([*args, "trainer.resume=auto"], 2, tmp_path / "again.log")
    rc = again.wait(JOB_TIMEOUT)
    assert rc == 0, again.output()[-6000:]
    assert_clean_exit(again)
    assert f"(step {stopped}, saved by 2 ranks)" in again.output()
    assert logged_steps(run_dir) == list(range(1, total + 1))
    assert [r["step"] for r in eval_records(run_dir)] == [0, total]


def save_in_progress(ckpt: Path) -> Path | None:
    """A ``.tmp-`` folder of a step after the one ``latest`` names, if there is one."""
    try:
        names = os.listdir(ckpt)
        latest = (ckpt / "latest").read_text().strip()
    except OSError:
        return None
    saving = [n for n in names if SAVING_RE.match(n) and n.split(".")[0] > latest]
    return ckpt / saving[0] if saving else None


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoint_in_charge(tmp_path):
    """A save takes 0.1-0.4 s here (fsyncs); polling every millisecond catches it in its ``.tmp-``
    folder. If the kill lands just after the rename (rare), the next attempt resumes and tries again."""
    total, run_dir, ckpt = 12, tmp_path / "run", tmp_path / "ckpt"
    args = [*SHORT, f"hydra.run.dir={run_dir}", f"trainer.checkpoint_dir={ckpt}", f"trainer.total_steps={total}",
            "trainer.save_every=1", "trainer.resume=auto"]
    for attempt in range(3):
        job = Job(args, 2, tmp_path / f"attempt{attempt}.log")
        job.wait_until(lambda: (ckpt / "latest").is_file() and len(job.workers()) == 2, JOB_TIMEOUT,
                       "a first checkpoint")
        workers = job.workers()
        tmp = job.wait_until(lambda: save_in_progress(ckpt), JOB_TIMEOUT, "a save in progress", poll_s=0.001)
        job.kill(workers)
        if tmp.is_dir() and not is_complete(str(ckpt / tmp.name.split(".")[0])):
            break
    else:
        pytest.fail("three kills in a row landed after the save had finished")

    previous = ckpt / latest_name(ckpt)
    assert previous.name < tmp.name, "latest still names the checkpoint before the interrupted save"
    assert newest_checkpoint(str(ckpt)) == str(previous)
    weights = load_model_weights(str(previous))
    assert weights and all(t.numel() > 0 for t in weights.values())

    final = Job(args, 2, tmp_path / "final.log")
    rc = final.wait(JOB_TIMEOUT)
    assert rc == 0, final.output()[-6000:]
    assert_clean_exit(final)
    assert f"resumed from {previous} " in final.output()
    assert not [n for n in os.listdir(ckpt) if ".tmp-" in n], "the next save removed the interrupted one"
    assert latest_name(ckpt) == step_folder_name(total)


@pytest.fixture(scope="module")
def one_rank_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of the embedded default after one step, from a world of one."""
    root = tmp_path_factory.mktemp("one_rank")
    proc = subprocess.run(
        [sys.executable, "-m", "spmd_rlhf.train", f"hydra.run.dir={root}", "trainer.sft.steps=0",
         "data.arithmetic.num_val=8", "trainer.total_steps=1", "trainer.save_every=1", "trainer.eval_before=false",
         "trainer.eval_after=false", "logging.progress_bar=false"],
        env=child_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return root / "checkpoints" / step_folder_name(1)


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["__0_0.distcp", ".metadata"])
def test_damaged_checkpoint_as_resume_path_is_refused_naming_the_file(one_rank_checkpoint, tmp_path, damaged):
    checkpoint = tmp_path / "ckpt" / step_folder_name(1)
    shutil.copytree(one_rank_checkpoint, checkpoint)
    file = checkpoint / damaged
    data = bytearray(file.read_bytes())
    data[8:72] = bytes(range(64))  # same size: only the checksum (or unpickling) can tell
    file.write_bytes(bytes(data))

    cmd = torchrun_cmd(["-m", "spmd_rlhf.train", f"hydra.run.dir={tmp_path / 'run'}", "data.arithmetic.num_val=8",
                        "trainer.total_steps=2", "logging.progress_bar=false", f"trainer.resume={checkpoint}"], 2)
    proc = run_reaped(cmd, JOB_TIMEOUT, env=child_env(), cwd=REPO_ROOT)
    out = f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode != 0, out  # torchrun exits 1; rank 0 exits 2, like for a configuration error
    assert proc.stderr.count(f"{file}") == 1, out  # one message, from rank 0
    assert f"spmd_rlhf: checkpoint error: {file}" in proc.stderr, out
    assert "trainer.resume=" in proc.stderr, out  # what to do instead
    assert 'spmd_rlhf/train.py", line' not in proc.stderr, out  # no traceback: neither the entry's
    assert not re.search(r'checkpoint(_\w+)?\.py", line', proc.stderr), out  # nor the checkpoint code's
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not logged_steps(tmp_path / "run")
