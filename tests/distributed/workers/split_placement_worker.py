"""Run under torchrun: the real ``spmd_rlhf.train.run`` on a shortened embedded default, recording
what the comparison needs. ``argv``: OUT_PREFIX, then config overrides (as on the command line).

Every training rank saves ``OUT_PREFIX.rank<r>.pt``: each step's groups as it trained on them
(prompt index, token ids, engine logprobs per sample; the loss masks apart), the actor's full
weights when the RL run starts (after the warm start or the resume) and after it, and the run's
results; rank 0's metrics are in ``OUT_PREFIX/run/metrics.jsonl``.
"""

from __future__ import annotations

import os
import sys

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import spmd_rlhf.train as train
from spmd_rlhf.rollout.local import LocalRollouts
from spmd_rlhf.rollout.remote import RemoteRollouts
from spmd_rlhf.trainer.loop import Trainer

RECORD: dict = {"samples": {}, "masks": {}, "initial": None, "weights": None, "results": None, "resumed_at": None}


def recording(next_fn):
    def next(self, step, timer):
        rollout, side = next_fn(self, step, timer)
        RECORD["samples"][step] = [(e.index, list(t), list(lp)) for e, t, lp in
                                   zip(rollout.examples, rollout.samples.token_ids, rollout.samples.logprobs)]
        masks = rollout.samples.loss_masks or [None] * rollout.size
        RECORD["masks"][step] = [(e.index, m) for e, m in zip(rollout.examples, masks)]
        return rollout, side
    return next


def final_weights(run_fn):
    def run(self, *args, **kwargs):
        RECORD["resumed_at"] = self.step
        RECORD["initial"] = full_weights(self)
        results = run_fn(self, *args, **kwargs)
        RECORD["weights"] = full_weights(self)
        return results
    return run


def full_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor().detach().clone() for name, p in trainer.actor.model.named_parameters()}


LocalRollouts.next = recording(LocalRollouts.next)
RemoteRollouts.next = recording(RemoteRollouts.next)
Trainer.run = final_weights(Trainer.run)


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    with initialize_config_dir(config_dir=str(train.CONFIG_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    rank = int(os.environ["RANK"])
    RECORD["results"] = train.run(cfg, os.path.join(out, "run"))
    if RECORD["weights"] is not None:  # a training rank
        torch.save(RECORD, f"{out}.rank{rank}.pt")


if __name__ == "__main__":
    main()
