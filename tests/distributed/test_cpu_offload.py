"""``trainer.cpu_offload``: FSDP2's CPUOffloadPolicy changes where the state lives, not what a step does.

Two ranks on gloo run one GRPO step of the real ``Trainer`` (``workers/cpu_offload_worker.py``) with
and without the offload: equal weights (fp32, 1e-6), equal metrics, equal weights as the engine
receives them. On a CPU machine every device is the CPU, so the placement checks assert that FSDP
holds the policy on every module of the actor and of the reference that follows it, and that
parameters, gradients and optimizer state are on the CPU as the policy places them. The config
refuses the offload together with ``trainer.offload_actor_during_rollout``; the program trains
two steps with it under torchrun.
"""

from __future__ import annotations

import pytest
import torch

from spmd_rlhf.config import Config, ConfigError, validate
from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "cpu_offload_worker.py"
ATOL = 1e-6
MOVED = 1e-4  # the step moves some weight by at least this much (lr 1e-3)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("cpu_offload") / "runs.pt"
    torchrun([str(WORKER), str(path)], 2, timeout=300)
    result = torch.load(path)
    assert result["world"] == 2
    return result["runs"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("name", ["offload", "offload_fused"])
def test_offloaded_step_equals_plain(runs, name):
    plain, offloaded = runs["plain"], runs[name]
    assert plain["optimizer_steps"] == offloaded["optimizer_steps"] == 2
    assert max_diff(plain["final"], plain["initial"]) > MOVED, "the step trains"
    assert plain["metrics"]["actor/kl_loss"] > 0, "the KL term against the reference acts"
    assert max_diff(offloaded["final"], plain["final"]) <= ATOL
    for key, value in plain["metrics"].items():
        assert offloaded["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("name", ["plain", "offload"])
def test_engine_receives_the_trained_weights(runs, name):
    """Both weight-sync streams read offloaded shards and deliver the final weights, on the device."""
    run = runs[name]
    for kind, tensors in run["synced"].items():
        assert max_diff(tensors, run["final"]) == 0.0, kind
        assert {t.device.type for t in tensors.values()} == {"cpu"}, kind  # topo.device on a CPU machine


def test_policy_and_placement(runs):
    plain, offloaded = runs["plain"], runs["offload"]
    assert plain["offloaded"] == (False, False)
    assert offloaded["offloaded"] == (True, True), "the reference follows the actor"
    for model in ("actor", "reference"):
        assert len(offloaded["policies"][model]) == len(plain["policies"][model]) >= 3, "root + decoder layers"
        assert set(offloaded["policies"][model]) == {"CPUOffloadPolicy"}, model
        assert set(plain["policies"][model]) == {"OffloadPolicy"}, model  # FSDP's "no offload"
    for key in ("params", "reference_params", "grads", "state"):
        assert offloaded[key] == ["cpu"], key
    assert offloaded["fused"] is False and runs["offload_fused"]["fused"] is True
    assert offloaded["fused_default_on_cuda"] is False, "no CUDA fused kernel for state in host memory"
    assert offloaded["rollout_offload_enabled"] is False, "the policy already keeps the actor on the host"


def test_offload_with_rollout_offload_is_a_config_error():
    cfg = Config()
    cfg.trainer.cpu_offload = True
    validate(cfg, 2)
    cfg.trainer.offload_actor_during_rollout = True
    with pytest.raises(ConfigError, match="trainer.cpu_offload.*trainer.offload_actor_during_rollout=false"):
        validate(cfg, 2)


def test_program_trains_with_cpu_offload(tmp_path):
    proc = torchrun(["-m", "spmd_rlhf.train", f"hydra.run.dir={tmp_path / 'run'}", "trainer.cpu_offload=true",
                     "trainer.total_steps=2", "trainer.sft.steps=20", "data.arithmetic.num_val=32",
                     "logging.progress_bar=false"], 2, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"actor/grad_norm"') == 2
