"""Launchers: torchrun.sh and slurm.sbatch (commands built from the environment, SLURM's time-limit
signal turned into checkpoint-stop-requeue, with fake srun/scancel/scontrol), and submit.py
(sweep expansion, the task's distributed environment, requeue with resume=auto; a real two-job
sweep with two ranks each through submitit's LocalExecutor)."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from spmd_rlhf.distributed.topology import read_launch_env
from tests.launch import REPO_ROOT, child_env

TORCHRUN_SH = REPO_ROOT / "launch" / "torchrun.sh"
SBATCH = REPO_ROOT / "launch" / "slurm.sbatch"
SUBMIT = REPO_ROOT / "launch" / "submit.py"
SHORT_RUN = ["trainer.total_steps=2", "trainer.sft.steps=5", "data.arithmetic.num_val=16", "trainer.batch_size=8",
             "trainer.mini_batch_size=8", "logging.progress_bar=false"]


def load_submit():
    spec = importlib.util.spec_from_file_location("submit", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bash(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("script", [TORCHRUN_SH, SBATCH])
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- torchrun.sh --------------------------------------------------------------------------------


@pytest.mark.parametrize("env, expected", [
    ({}, "--nproc-per-node 3 --standalone -m spmd_rlhf.train a=1 b=x"),
    ({"NNODES": "2", "RDZV_ENDPOINT": "node0:29400"},
     "--nproc-per-node 3 --nnodes 2 --rdzv-backend c10d --rdzv-endpoint node0:29400 --rdzv-id spmd_rlhf -m "
     "spmd_rlhf.train a=1 b=x"),
    ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "1234"},
     "--nproc-per-node 3 --nnodes 2 --node-rank 1 --master-addr node0 --master-port 1234 -m spmd_rlhf.train a=1 b=x"),
])
def test_torchrun_sh_builds_the_command(env, expected):
    clean = {k: "" for k in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ENDPOINT")}
    env = {**clean, "NNODES": "1", "NPROC": "3", "DRY_RUN": "1", "PYTHON": "python3", **env}
    proc = bash(TORCHRUN_SH, "a=1", "b=x", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"python3 -m torch.distributed.run {expected}"


def test_torchrun_sh_uses_the_checkouts_environment_without_activation():
    venv_python = REPO_ROOT / ".venv" / "bin" / "python"
    proc = bash(TORCHRUN_SH, "a=1", env={"PYTHON": "", "NNODES": "1", "NPROC": "1", "DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    expected = str(venv_python) if venv_python.exists() else "python3"
    assert proc.stdout.split()[0] == expected, proc.stdout


@pytest.mark.parametrize("override, key", [
    ("+trainer.total_step=5", "trainer.total_steps"),  # a typo: the nearest key is named
    ("distributed.tp=3", "distributed.tp"),  # needs the job's world size (NPROC) to fail
])
def test_torchrun_sh_config_error_is_one_line_before_any_rank(override, key):
    """A configuration error is found once, in one process, before torchrun starts: one line, exit 2,
    no traceback of torchrun's and no rank started."""
    env = {**child_env(), "PYTHON": sys.executable, "NNODES": "1", "NPROC": "2", "RDZV_ENDPOINT": ""}
    proc = subprocess.run(["bash", str(TORCHRUN_SH), override], env=env, capture_output=True, text=True,
                          timeout=180)
    output = f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, output
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("spmd_rlhf: configuration error:") and key in lines[0], output
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, output
    assert "spmd_rlhf: world" not in proc.stdout, output


def test_torchrun_sh_multinode_without_an_address_says_what_to_set():
    proc = bash(TORCHRUN_SH, env={"NNODES": "2", "NPROC": "1", "DRY_RUN": "1", "RDZV_ENDPOINT": "", "MASTER_ADDR": ""})
    assert proc.returncode == 2
    assert "RDZV_ENDPOINT" in proc.stderr and "NODE_RANK" in proc.stderr


# --- slurm.sbatch -------------------------------------------------------------------------------

FAKE_SLURM = {
    "scontrol": """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a01\\ngpu-a02\\n'; fi
""",
    "scancel": """#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE_LOG"
kill -USR1 "$(cat "$FAKE_DIR/srun.pid")"
""",
    # stands for the tasks: stops at once on USR1, like the trainer after its checkpoint
    "srun": """#!/usr/bin/env bash
trap 'echo "srun got USR1" >> "$FAKE_LOG"; exit 0' USR1
echo "srun $*" >> "$FAKE_LOG"
echo $$ > "$FAKE_DIR/srun.pid.tmp" && mv "$FAKE_DIR/srun.pid.tmp" "$FAKE_DIR/srun.pid"  # never read half-written
for _ in $(seq "${FAKE_SRUN_TICKS:-600}"); do sleep 0.1; done
exit "${FAKE_SRUN_EXIT:-0}"
""",
}


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log), "FAKE_DIR": str(tmp_path),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "exp1", "SLURM_JOB_NODELIST": "gpu-a[01-02]",
           "SLURM_NTASKS": "16", "RUN_ROOT": str(tmp_path / "runs"), "MASTER_ADDR": "", "MASTER_PORT": "",
           "RUN_DIR": "", "PYTHON": ""}
    return SimpleNamespace(env=env, log=log, dir=tmp_path)


def test_sbatch_header_asks_for_one_task_per_gpu_the_warning_signal_and_requeue():
    header = [line.split()[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    opts = dict(h.lstrip("-").split("=", 1) if "=" in h else (h.lstrip("-"), True) for h in header)
    assert opts["ntasks-per-node"] == opts["gpus-per-node"]
    assert opts["signal"] == "B:USR1@120" and opts["requeue"] is True


def test_sbatch_environment_dry_run(fake_slurm):
    env = {k: v for k, v in {**fake_slurm.env, "DRY_RUN": "1"}.items() if v != ""}
    proc = subprocess.run(["bash", str(SBATCH), "trainer.lr=1e-5"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    run_dir = fake_slurm.dir / "runs" / "exp1"  # RUN_ROOT/<job name>: the same after a requeue
    assert lines[:3] == ["MASTER_ADDR=gpu-a01", "MASTER_PORT=24242", f"RUN_DIR={run_dir}"]  # 20000 + 4242 % 20000
    assert lines[3].split() == ["srun", "--kill-on-bad-exit=1", "python3", "-m", "spmd_rlhf.train",
                                f"hydra.run.dir={run_dir}", "trainer.resume=auto", "trainer.lr=1e-5"]
    # Each task, started by srun without these set, reaches the same rendezvous by itself.
    task = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                            "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "gpu-a[01-02]"})
    assert (task.master_addr, task.master_port, task.rank, task.world_size) == ("gpu-a01", 24242, 5, 16)


def run_sbatch_in_background(fake_slurm, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {k: v for k, v in {**os.environ, **fake_slurm.env, **(extra_env or {})}.items() if v != ""}
    proc = subprocess.Popen(["bash", str(SBATCH), "x=1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 30
    while not (fake_slurm.dir / "srun.pid").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "fake srun did not start"
        time.sleep(0.05)
    return proc


def test_sbatch_time_limit_signal_stops_the_tasks_then_requeues(fake_slurm):
    proc = run_sbatch_in_background(fake_slurm)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends to the batch script
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    calls = fake_slurm.log.read_text().splitlines()
    assert calls[0] == "scontrol show hostnames gpu-a[01-02]"
    assert calls[1].startswith("srun --kill-on-bad-exit=1 python3 -m spmd_rlhf.train")
    assert calls[2:] == ["scancel --signal=USR1 4242", "srun got USR1", "scontrol requeue 4242"]


def test_sbatch_without_signal_passes_the_exit_status_and_does_not_requeue(fake_slurm):
    proc = run_sbatch_in_background(fake_slurm, {"FAKE_SRUN_EXIT": "3", "FAKE_SRUN_TICKS": "5"})
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 3, stderr
    assert not [c for c in fake_slurm.log.read_text().splitlines() if "requeue" in c or "scancel" in c]


# --- submit.py ----------------------------------------------------------------------------------


def test_sweep_expansion():
    submit = load_submit()
    assert submit.expand_sweep(["a=1", "b=2"], multirun=False) == [("", ["a=1", "b=2"])]
    points = submit.expand_sweep(["trainer.lr=1e-4,2e-4", "x=1", "rollout.n=4,8"], multirun=True)
    assert [overrides for _, overrides in points] == [
        ["trainer.lr=0.0001", "x=1", "rollout.n=4"], ["trainer.lr=0.0001", "x=1", "rollout.n=8"],
        ["trainer.lr=0.0002", "x=1", "rollout.n=4"], ["trainer.lr=0.0002", "x=1", "rollout.n=8"]]
    assert [name for name, _ in points] == ["0_trainer.lr=0.0001_rollout.n=4", "1_trainer.lr=0.0001_rollout.n=8",
                                            "2_trainer.lr=0.0002_rollout.n=4", "3_trainer.lr=0.0002_rollout.n=8"]
    with pytest.raises(SystemExit, match="add -m"):
        submit.expand_sweep(["trainer.lr=1e-4,2e-4"], multirun=False)


def test_task_environment_and_requeue():
    submit = load_submit()
    job_env = SimpleNamespace(cluster="slurm", global_rank=9, num_tasks=16, local_rank=1, num_nodes=2,
                              hostnames=["gpu-a01", "gpu-a02"], job_id="4242")
    assert submit.distributed_env(job_env) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                                               "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu-a01",
                                               "MASTER_PORT": "24242"}  # the port srun's tasks derive, above
    assert submit.master_port("123_4") == 20000 + 1234

    task = submit.Train(["trainer.resume=auto", "trainer.resume=never", "trainer.lr=1e-5"], "/runs/a")
    delayed = task.checkpoint()
    requeued = delayed.function
    assert isinstance(requeued, submit.Train) and requeued.run_dir == "/runs/a"
    assert requeued.overrides == ["trainer.lr=1e-5", "trainer.resume=auto"]


@pytest.mark.slow
def test_local_sweep_runs_two_jobs_of_two_ranks(tmp_path):
    """Two points of ``trainer.lr``, each a 2-task job on CPU, run the embedded default for 2 steps."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SUBMIT), "--local", "--gpus-per-node", "2", "--output-dir", str(out), "--name", "sweep",
         "--timeout-min", "10", "-m", "trainer.lr=1e-4,2e-4", *SHORT_RUN],
        env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    runs = {lr: out / "sweep" / f"{i}_trainer.lr={lr}" for i, lr in enumerate(["0.0001", "0.0002"])}
    first_lr = {}
    for lr, run_dir in runs.items():
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "reward/mean" in r] == [1, 2], run_dir
        first_lr[lr] = next(r["actor/lr"] for r in records if r["step"] == 1 and "actor/lr" in r)
        assert f"lr: {lr}" in (run_dir / ".hydra" / "config.yaml").read_text()
    # Same schedule, different peak: the learning rates of step 1 are in the ratio of the points.
    assert first_lr["0.0002"] == pytest.approx(2 * first_lr["0.0001"], rel=1e-9) and first_lr["0.0001"] > 0
    results = [pickle.loads(p.read_bytes()) for p in sorted((out / "sweep" / "submitit").glob("*_result.pkl"))]
    assert len(results) == 4, "2 jobs x 2 tasks"
    assert sorted((r[1]["run_dir"], r[1]["rank"]) for r in results if r[0] == "success") == sorted(
        (str(run_dir), rank) for run_dir in runs.values() for rank in (0, 1))
