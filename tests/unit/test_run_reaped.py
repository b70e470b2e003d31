"""``tests.launch.run_reaped``: a command that runs past its timeout is killed with everything it
started, also children detached with setsid (as torchrun starts its workers)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.launch import run_reaped

TIMEOUT_S = 5  # far more than bash needs to start two children


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_a_timeout_kills_the_command_and_its_detached_children(tmp_path):
    pids = tmp_path / "pids"
    script = f"setsid sleep 600 & echo $! >> {pids}; setsid sleep 600 & echo $! >> {pids}; wait"
    with pytest.raises(subprocess.TimeoutExpired):
        run_reaped(["bash", "-c", script], TIMEOUT_S)
    started = [int(line) for line in pids.read_text().split()]
    assert len(started) == 2
    deadline = time.monotonic() + 10  # SIGKILL is immediate; reaping by init may take a moment
    while any(alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in started if alive(pid)], "a child outlived the timeout"
