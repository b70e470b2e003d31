"""Run under torchrun: save and load FSDP2 checkpoints; the test compares what the ranks record.

``save OUT`` (2 ranks): a tiny Qwen2 sharded with FSDP2, AdamW and a warmup schedule take two
steps; every rank seeds its generators differently; the state is saved as step 7. Recorded: the
full (gathered) model and optimizer state, the scheduler, every rank's next random draws, and the
weights after one more step from a fixed batch. Then fresh models and optimizers (another seed)
load the checkpoint in the same processes and record the same things (``loaded_world2``).
Also checks that a preemption signal on rank 1 alone is seen by both ranks.

``load OUT`` (any number of ranks): fresh models and optimizers load the checkpoint; recorded as
``loaded_world<N>``.
"""

from __future__ import annotations

import copy
import os
import random
import signal
import sys

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from transformers import AutoModelForCausalLM

from spmd_rlhf.distributed.topology import init_distributed, shutdown
from spmd_rlhf.models.parallelize import parallelize
from spmd_rlhf.tasks.arithmetic import build_tokenizer, tiny_model_config
from spmd_rlhf.trainer.checkpoint import CheckpointManager, ModelOptimizerState, RNGState
from spmd_rlhf.trainer.preemption import PreemptionHandler
from spmd_rlhf.trainer.schedule import build_scheduler

SAVED_STEP = 7
RNG_SEED = {"save": 1000, "fresh": 2000}  # + rank
TOKENIZER = build_tokenizer()
CONFIG = tiny_model_config(len(TOKENIZER), 64, 2, 2, TOKENIZER.pad_token_id, TOKENIZER.eos_token_id)
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def build(topo, seed: int):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIG, dtype=torch.float32, attn_implementation="sdpa")
    model = parallelize(model, topo.fsdp_mesh, topo.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, optimizer, build_scheduler(optimizer, 3, 10, 0.1)


def train_step(model, optimizer, scheduler, seed: int) -> None:
    """The same global batch on every world size: each rank takes its rows."""
    ids = torch.randint(0, len(TOKENIZER), (4, 6), generator=torch.Generator().manual_seed(seed))
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    rows = ids[rank * 4 // world: (rank + 1) * 4 // world] if world <= 4 else ids
    model(input_ids=rows, labels=rows).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def seed_rng(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def draws() -> dict:
    return {"python": random.random(), "numpy": float(np.random.rand()), "torch": torch.rand(4)}


def record(model, optimizer, scheduler, trainer: dict) -> dict:
    """Full states (a collective), this rank's next draws, and the weights after one more step."""
    # deep copies: on the CPU the "full" state may share storage with the live one
    out = copy.deepcopy({"model": get_model_state_dict(model, options=FULL),
                         "optim": get_optimizer_state_dict(model, optimizer, options=FULL),
                         "scheduler": scheduler.state_dict(), "trainer": trainer})
    out["draws"] = draws()
    train_step(model, optimizer, scheduler, seed=99)
    out["after_step"] = copy.deepcopy(get_model_state_dict(model, options=FULL))
    return out


def state(model, optimizer, scheduler, trainer: dict) -> dict:
    return {"actor": ModelOptimizerState(model, optimizer, scheduler), "trainer": trainer, "rng": RNGState()}


def load_fresh(topo, manager: CheckpointManager) -> dict:
    model, optimizer, scheduler = build(topo, seed=123)
    seed_rng(RNG_SEED["fresh"] + topo.rank)
    trainer = {"step": 0, "loader": {"epoch": 0, "position": 0}}
    info = manager.load(manager.resolve("auto"), state(model, optimizer, scheduler, trainer))
    assert info.step == SAVED_STEP and trainer["step"] == SAVED_STEP
    return record(model, optimizer, scheduler, trainer)


def preemption_agreement(rank: int) -> dict:
    with PreemptionHandler() as handler:
        before = handler.requested()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        after = handler.requested()
    return {"before": before, "after": after, "restored": signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL}


def save(topo, manager: CheckpointManager, out: str) -> None:
    model, optimizer, scheduler = build(topo, seed=0)
    for i in range(2):
        train_step(model, optimizer, scheduler, seed=i)
    seed_rng(RNG_SEED["save"] + topo.rank)
    draws()  # move the generators off their seeds
    trainer = {"step": SAVED_STEP, "loader": {"epoch": 1, "position": 24}}
    manager.save(SAVED_STEP, state(model, optimizer, scheduler, trainer), hf_config=CONFIG, tokenizer=TOKENIZER,
                 extra={"world": topo.world_size})
    saved = record(model, optimizer, scheduler, trainer)
    saved["preemption"] = preemption_agreement(topo.rank)
    torch.save(saved, os.path.join(out, f"saved_rank{topo.rank}.pt"))
    loaded = load_fresh(topo, manager)
    torch.save(loaded, os.path.join(out, f"loaded_world{topo.world_size}_rank{topo.rank}.pt"))


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    topo = init_distributed(dp_replicate=1, tp=1, timeout_s=120)
    manager = CheckpointManager(os.path.join(out, "checkpoints"), keep_last=2)
    try:
        if mode == "save":
            save(topo, manager, out)
        else:
            loaded = load_fresh(topo, manager)
            torch.save(loaded, os.path.join(out, f"loaded_world{topo.world_size}_rank{topo.rank}.pt"))
    finally:
        shutdown()


if __name__ == "__main__":
    main()
