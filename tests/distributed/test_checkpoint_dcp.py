"""FSDP2 checkpoints on gloo: saved by 2 ranks, loaded by 2 (exactly the same state), by 1 and by 4
(DCP reshards: the same full tensors); every rank's RNG restored; exported to a HF directory.

Equality is exact (``atol=0``): loading copies bytes. On the same world size, one more optimizer
step from the same batch also gives exactly the same weights (the restored optimizer is usable,
not just equal). Across world sizes that step is not compared: the summation order of the gradient
reduction differs, and Adam turns the float noise of gradients that are zero in exact arithmetic
(the key bias) into updates of the size of the learning rate.
"""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest
import torch

from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "checkpoint_worker.py"
SAVED_WORLD = 2
FRESH_SEED = 2000  # the worker seeds rank r's generators with FRESH_SEED + r before loading

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    torchrun([str(WORKER), "save", str(out)], SAVED_WORLD, timeout=300)
    return out


def load_world(out, world: int) -> tuple[list[dict], str]:
    proc = None
    if not (out / f"loaded_world{world}_rank0.pt").exists():
        proc = torchrun([str(WORKER), "load", str(out)], world, timeout=300)
    return [torch.load(out / f"loaded_world{world}_rank{r}.pt") for r in range(world)], proc.stderr if proc else ""


def saved_ranks(out) -> list[dict]:
    return [torch.load(out / f"saved_rank{r}.pt") for r in range(SAVED_WORLD)]


def fresh_draws(rank: int) -> dict:
    """What a rank whose generators keep their seeded state draws first (as the worker draws)."""
    seed = FRESH_SEED + rank
    torch_gen = torch.Generator().manual_seed(seed)
    return {"python": random.Random(seed).random(), "numpy": float(np.random.RandomState(seed).rand()),
            "torch": torch.rand(4, generator=torch_gen)}


def assert_same_state(got: dict, want: dict) -> None:
    torch.testing.assert_close(got["model"], want["model"], rtol=0, atol=0)
    torch.testing.assert_close(got["optim"]["state"], want["optim"]["state"], rtol=0, atol=0)
    assert got["optim"]["param_groups"] == want["optim"]["param_groups"]
    assert got["scheduler"] == want["scheduler"]
    assert got["trainer"] == want["trainer"] == {"step": 7, "loader": {"epoch": 1, "position": 24}}


def test_state_is_nontrivial(saved):
    want = saved_ranks(saved)[0]
    assert want["scheduler"]["last_epoch"] == 2
    step = want["optim"]["state"]["model.embed_tokens.weight"]["step"]
    assert float(step) == 2.0
    assert all(float(s["exp_avg"].abs().max()) > 0 for s in want["optim"]["state"].values())


def test_same_world_size_restores_exactly(saved):
    want = saved_ranks(saved)
    got, _ = load_world(saved, SAVED_WORLD)
    assert_same_state(got[0], want[0])
    torch.testing.assert_close(got[0]["after_step"], want[0]["after_step"], rtol=0, atol=0)
    for rank in range(SAVED_WORLD):
        assert got[rank]["draws"]["python"] == want[rank]["draws"]["python"]
        assert got[rank]["draws"]["numpy"] == want[rank]["draws"]["numpy"]
        assert torch.equal(got[rank]["draws"]["torch"], want[rank]["draws"]["torch"])
    assert want[0]["draws"]["python"] != want[1]["draws"]["python"], "ranks have their own streams"


@pytest.mark.parametrize("world", [1, 4])
def test_other_world_size_reshards(saved, world):
    want = saved_ranks(saved)
    got, stderr = load_world(saved, world)
    assert_same_state(got[0], want[0])
    for rank in range(world):
        expected = want[rank]["draws"] if rank < SAVED_WORLD else fresh_draws(rank)
        assert got[rank]["draws"]["python"] == expected["python"], rank
        assert got[rank]["draws"]["numpy"] == expected["numpy"], rank
        assert torch.equal(got[rank]["draws"]["torch"], expected["torch"]), rank
    assert stderr.count(f"was saved by {SAVED_WORLD} ranks and this run has {world}") == 1, stderr[-3000:]


def test_preemption_flag_is_agreed_across_ranks(saved):
    for rank, record in enumerate(saved_ranks(saved)):
        assert record["preemption"] == {"before": False, "after": True, "restored": True}, rank


def test_export_of_a_sharded_checkpoint(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("export_hf", REPO_ROOT / "tools" / "export_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.export_hf(str(saved / "checkpoints"), str(tmp_path / "hf"))
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    want = saved_ranks(saved)[0]["model"]
    torch.testing.assert_close(model.state_dict(), want, rtol=0, atol=0)
