"""The fault and resume end-to-end tests, run again and again beside busy loops (a loaded
machine), with no failure. Heavy (about an hour for 10 runs on 2 cores), so it runs only when
asked: ``CONTENTION_RUNS=10 pytest tests/integration/test_contention.py``; the same check from
the command line is ``python tools/contention_check.py``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.launch import REPO_ROOT

RUNS = int(os.environ.get("CONTENTION_RUNS", "0") or 0)
BUSY = int(os.environ.get("CONTENTION_BUSY", "1") or 1)


@pytest.mark.slow
@pytest.mark.timeout(0)  # the runs have their own limit
@pytest.mark.skipif(RUNS < 1, reason="heavy: set CONTENTION_RUNS=N to run the fault and resume tests N times")
def test_fault_and_resume_tests_pass_every_time_on_a_loaded_machine(tmp_path):
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "contention_check.py"), "--runs", str(RUNS), "--busy", str(BUSY),
           "--timeout", "3600", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert f"{RUNS} runs beside {BUSY} busy loop(s): 0 with a failure" in proc.stdout, proc.stdout[-6000:]
