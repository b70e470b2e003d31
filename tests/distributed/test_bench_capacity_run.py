"""``tools/bench_capacity.py`` end to end on the CPU: a tiny LoRA case runs in its torchrun child
and the JSON and table carry what the GPU run reports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.launch import REPO_ROOT

pytestmark = pytest.mark.slow


def test_tiny_lora_case_reports_fit_phases_and_throughput(tmp_path):
    out = tmp_path / "cap.json"
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "bench_capacity.py"), "--shapes", "tiny", "--modes", "lora",
           "--engine", "torch", "--steps", "1", "--prompts", "2", "--samples", "2", "--prompt-len", "8",
           "--gen-len", "8", "--min-case-s", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    assert result["fits"] == "yes", result.get("log_tail")
    assert result["case"]["lora_rank"] == 16
    assert 0 < result["trainable_params"] < result["params"] / 10  # only the adapters train
    phases = [result[f"timing/{p}"] for p in ("generate", "update", "step")]
    assert all(t > 0 for t in phases) and phases[0] + phases[1] <= phases[2] + 1e-6
    assert result["tokens"] == 2 * 2 * 16
    assert result["tokens_per_s"] == pytest.approx(result["tokens"] / result["timing/step"], rel=1e-6)
    assert "| tiny |" in proc.stdout and "largest that trains, lora: tiny" in proc.stdout
