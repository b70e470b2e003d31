"""Failing well: out-of-memory errors name the phase and the knob; K non-finite steps in a row
abort; an actor update with a non-finite gradient is skipped, counted, and changes nothing."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from spmd_rlhf.config import AlgorithmConfig
from spmd_rlhf.data.batch import collate
from spmd_rlhf.models.parallelize import parallelize
from spmd_rlhf.tasks.arithmetic import build_tokenizer, tiny_model_config
from spmd_rlhf.trainer.actor import Actor, PolicyTargets
from spmd_rlhf.trainer.faults import NonFiniteGuard, PhaseOutOfMemory, oom_hint
from spmd_rlhf.trainer.schedule import build_scheduler

# --- oom_hint -----------------------------------------------------------------------------------


@pytest.mark.parametrize("phase, knob", [
    ("reshard", "rollout.bucket_mb"),
    ("generate", "rollout.max_batch_size"),
    ("generate", "trainer.offload_actor_during_rollout"),
    ("reference", "trainer.micro_batch_size"),
    ("update", "trainer.micro_batch_size"),
    ("update", "model.activation_checkpointing"),
    ("a_phase_without_a_table_entry", "trainer.micro_batch_size"),
])
def test_oom_names_the_phase_and_the_knob(phase, knob):
    original = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(PhaseOutOfMemory) as info:
        with oom_hint(phase):
            raise original
    message = str(info.value)
    assert f"during the {phase} phase" in message and knob in message, message
    assert "Tried to allocate 2.00 GiB" in message, "the original message is kept"
    assert info.value.__cause__ is original


def test_oom_hint_leaves_other_errors_and_success_alone():
    with pytest.raises(ValueError, match="^not memory$"):
        with oom_hint("update"):
            raise ValueError("not memory")
    with oom_hint("update"):
        value = 3
    assert value == 3


# --- torchrun restarts ---------------------------------------------------------------------------


@pytest.mark.parametrize("environ, refused", [
    ({}, False),  # not under torchrun
    ({"TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"}, False),  # first attempt
    ({"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_USE_AGENT_STORE": "False"}, False),  # a fresh store
    ({"TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}, True),  # would hang
])
def test_restart_with_the_agent_store_is_refused(environ, refused):
    from spmd_rlhf.config import ConfigError
    from spmd_rlhf.train import check_torchrun_restart

    if not refused:
        check_torchrun_restart(environ)
        return
    with pytest.raises(ConfigError, match="restart 2") as info:
        check_torchrun_restart(environ)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in str(info.value) and "--rdzv-backend c10d" in str(info.value)


# --- NonFiniteGuard -----------------------------------------------------------------------------


def test_guard_aborts_after_k_skipped_steps_in_a_row():
    guard = NonFiniteGuard(max_consecutive=3)
    guard.after_step(True, step=1)
    guard.after_step(True, step=2)
    assert guard.consecutive == 2
    with pytest.raises(FloatingPointError) as info:
        guard.after_step(True, step=3)
    message = str(info.value)
    assert message.startswith("step 3:") and "3 consecutive steps" in message
    assert "trainer.max_consecutive_skips=3" in message and "trainer.lr" in message


def test_guard_resets_on_a_good_step():
    guard = NonFiniteGuard(max_consecutive=3)
    for step, skipped in enumerate([True, True, False, True, True, False, True, True], start=1):
        guard.after_step(skipped, step)  # never 3 in a row: no abort
    assert guard.consecutive == 2


def test_guard_of_one_aborts_at_the_first_skip():
    guard = NonFiniteGuard(max_consecutive=1)
    guard.after_step(False, step=1)
    with pytest.raises(FloatingPointError, match="^step 2:"):
        guard.after_step(True, step=2)


# --- Actor.update with a non-finite loss ---------------------------------------------------------


def tiny_actor(mesh) -> tuple[Actor, object]:
    tokenizer = build_tokenizer()
    config = tiny_model_config(len(tokenizer), 32, 1, 1, tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model = parallelize(model, mesh, torch.device("cpu"), trainable=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, 0, 10, 1.0)
    return Actor(model, optimizer, scheduler, 1, 1.0, torch.device("cpu")), tokenizer


def full(actor: Actor) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in actor.model.named_parameters()}


def test_nan_advantages_skip_the_optimizer_step_and_count_it(world_of_one):
    actor, tokenizer = tiny_actor(world_of_one)
    batch = collate([[3, 4, 5], [6, 7]], [[8, 9, tokenizer.eos_token_id], [10, 11]], tokenizer.pad_token_id)
    old = actor.logprobs(batch, 4, 1.0)
    algo = AlgorithmConfig(use_kl_loss=False, kl_coef=0.0)
    before = full(actor)

    nan_adv = torch.full_like(batch.loss_mask_BT, float("nan"))
    metrics = actor.update(batch, PolicyTargets(nan_adv, old), algo, 4, 1.0)
    assert actor.skipped_steps == 1 and metrics["actor/skipped_steps"] == 1.0
    assert not math.isfinite(metrics["actor/grad_norm"])
    after = full(actor)
    assert all(torch.equal(before[n], after[n]) for n in before), "a skipped step changed the weights"
    assert not actor.optimizer.state, "no optimizer step: no Adam moments"
    assert actor.scheduler.last_epoch == 0, "no scheduler step"
    assert all(p.grad is None for p in actor.model.parameters()), "the NaN gradients are dropped"

    # A finite step afterwards trains normally and leaves the count alone.
    good_adv = batch.loss_mask_BT * torch.tensor([[1.0], [-1.0]])
    metrics = actor.update(batch, PolicyTargets(good_adv, old), algo, 4, 1.0)
    assert actor.skipped_steps == 1 and metrics["actor/skipped_steps"] == 1.0
    assert math.isfinite(metrics["actor/grad_norm"]) and metrics["actor/grad_norm"] > 0
    trained = full(actor)
    assert not all(torch.equal(after[n], trained[n]) for n in after)
    assert all(torch.isfinite(t).all() for t in trained.values())
    assert actor.scheduler.last_epoch == 1
