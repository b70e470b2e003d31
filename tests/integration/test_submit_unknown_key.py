"""``launch/submit.py`` refuses a key the schema does not know before it submits anything."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.launch import REPO_ROOT, child_env

pytest.importorskip("submitit")


def test_submit_refuses_an_unknown_key_before_submitting(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "submit.py"), "--local", "--gpus-per-node", "1",
                           "--output-dir", str(tmp_path), "+trainer.total_step=3"], env=child_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "trainer.total_step is not a configuration key; did you mean trainer.total_steps?" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.rglob("*.pkl")), "nothing was submitted"
