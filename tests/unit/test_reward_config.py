"""The rule reward's knobs (``reward.sandbox.*``, ``reward.code_score``, ``reward.math_timeout_s``):
refused with the key when unusable, and ``build_scorer`` hands each one to the scorer it builds."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from spmd_rlhf.config import CODE_SCORES, Config, ConfigError, RewardSandboxConfig, validate
from spmd_rlhf.rewards import sandboxed
from spmd_rlhf.rewards.build import build_scorer
from spmd_rlhf.sandbox import SandboxLimits

ADD = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
MUL = "```python\na, b = map(int, input().split())\nprint(a * b)\n```"
# MUL prints 2, 4, 0 against 3, 4, 3: one test of three passes
STDIO = json.dumps({"inputs": ["1 2\n", "2 2\n", "3 0\n"], "outputs": ["3\n", "4\n", "3\n"]})
# 1.0 only when it runs in a process other than the one that asks (ground truth = the asker's pid)
CUSTOM = "import os\n\ndef elsewhere(data_source, solution_str, ground_truth, extra_info=None):\n" \
         "    return float(os.getpid() != int(ground_truth))\n"


@pytest.mark.parametrize(("key", "value"), [
    ("code_score", "most"),
    ("math_timeout_s", 0.0),
    ("sandbox.workers", 0),
    ("sandbox.timeout_s", 0.0),
    ("sandbox.cpu_s", -1.0),
    ("sandbox.memory_mb", 0),
    ("sandbox.max_output_bytes", 0),
    ("sandbox.max_processes", 0),
    ("sandbox.max_file_mb", -5),
])
def test_an_unusable_reward_knob_is_refused_naming_its_key(key: str, value: object) -> None:
    cfg = Config()
    *section, leaf = key.split(".")
    setattr(cfg.reward.sandbox if section else cfg.reward, leaf, value)
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert str(err.value).startswith(f"reward.{key}=") and f"set reward.{key}=" in str(err.value)


def test_unset_workers_and_cpu_seconds_are_valid() -> None:
    cfg = Config()
    cfg.reward.code_score, cfg.reward.sandbox.workers, cfg.reward.sandbox.cpu_s = "all_pass", None, None
    validate(cfg, 1)


def test_user_rewards_run_in_the_sandbox_by_default() -> None:
    cfg = Config()
    assert cfg.reward.sandbox.custom_function is True
    validate(cfg, 1)  # no effect (and no complaint) without reward.custom_function
    cfg.reward.custom_function = "my_rewards:score"
    validate(cfg, 1)


def test_the_config_mirrors_the_sandbox_and_the_scorer() -> None:
    """The config cannot import the sandbox (it sits below it): its defaults and choices are copies."""
    ours = RewardSandboxConfig()
    for field in dataclasses.fields(SandboxLimits):
        assert getattr(ours, field.name) == field.default, field.name
    assert CODE_SCORES == sandboxed.CODE_SCORES
    assert Config().reward.code_score == sandboxed.RewardContext().code_score
    assert Config().reward.math_timeout_s == sandboxed.RewardContext().math_timeout_s


def test_build_scorer_hands_over_every_knob() -> None:
    cfg = Config()
    r, s = cfg.reward, cfg.reward.sandbox
    r.timeout_s, r.default_source, r.code_score, r.math_timeout_s = 7.0, "gsm8k", "all_pass", 2.5
    s.workers, s.timeout_s, s.cpu_s, s.memory_mb = 3, 4.0, 3.5, 512
    s.max_output_bytes, s.max_processes, s.max_file_mb = 2048, 8, 16
    scorer = build_scorer(r)
    try:
        assert scorer.context == sandboxed.RewardContext(
            SandboxLimits(timeout_s=4.0, cpu_s=3.5, memory_mb=512, max_output_bytes=2048, max_processes=8,
                          max_file_mb=16), "all_pass", 2.5)
        assert scorer.sandbox.limits == scorer.context.limits and scorer.sandbox.workers == 3
        assert (scorer.timeout_s, scorer.default_source, scorer.custom_fn) == (7.0, "gsm8k", None)
    finally:
        scorer.close()
    s.workers = None
    scorer = build_scorer(r)
    assert scorer.sandbox.workers == min(4, os.cpu_count() or 1)
    scorer.close()


@pytest.mark.parametrize(("code_score", "expected"), [("fraction", [1.0, 1 / 3]), ("all_pass", [1.0, 0.0])])
def test_built_scorer_scores_code_as_configured(code_score: str, expected: list[float]) -> None:
    cfg = Config()
    cfg.reward.code_score, cfg.reward.sandbox.workers = code_score, 1
    scorer = build_scorer(cfg.reward)
    try:
        scores, metrics = scorer.score(["codecontests"] * 2, [ADD, MUL], [STDIO] * 2, [None, None])
    finally:
        scorer.close()
    assert scores == pytest.approx(expected, abs=1e-9) and metrics["reward/errors"] == 0.0


@pytest.mark.parametrize("in_sandbox", [None, False])
def test_custom_function_runs_in_the_sandbox_unless_turned_off(tmp_path: Path, in_sandbox: bool | None) -> None:
    path = tmp_path / "my_reward.py"
    path.write_text(CUSTOM)
    cfg = Config()
    cfg.reward.custom_function = f"{path}:elsewhere"
    if in_sandbox is not None:  # None: the default
        cfg.reward.sandbox.custom_function = in_sandbox
    cfg.reward.sandbox.workers = 1
    scorer = build_scorer(cfg.reward)
    try:
        scores, metrics = scorer.score(["mine"], ["answer"], [str(os.getpid())], [None])
    finally:
        scorer.close()
    assert scores == [0.0 if in_sandbox is False else 1.0] and metrics["reward/errors"] == 0.0
