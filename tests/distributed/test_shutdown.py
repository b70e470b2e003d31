"""Shutdown of a 2-rank gloo world, repeated on a loaded machine: every process-group thread is
gone when ``topology.shutdown`` returns, and every rank exits 0, also when the other rank has
already exited.

A gloo worker thread left alive at interpreter exit that still holds its last collective's tensors
aborts the process ("terminate called without an active exception", exit -6); the worker starves
those threads of CPU to make that likely (see shutdown_worker). The thread list after shutdown is
the deterministic half of the check, the exit status the half that needs the race.
"""

from __future__ import annotations

import re

import pytest

from tests.launch import REPO_ROOT, busy_loops, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "shutdown_worker.py"
REPEATS = 2
LINE = re.compile(r"rank (\d): process-group threads after shutdown: (\[[^\]]*\])")

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("peer", ["together", "gone"])
def test_shutdown_ends_every_group_thread_and_every_rank_exits_0_under_load(peer):
    with busy_loops(1):
        for attempt in range(REPEATS):
            proc = torchrun([str(WORKER), peer], nproc=2, timeout=180, check=False)
            out = f"attempt {attempt}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            assert proc.returncode == 0, out
            assert "terminate called" not in proc.stderr, out
            left = dict(LINE.findall(proc.stdout))
            assert left == {"0": "[]", "1": "[]"}, out
