"""Run under torchrun (1 or 2 ranks, gloo): the tiny Qwen2.5-VL through FSDP2 on a global batch of
rows with images, each rank its contiguous half of the rows. Rows 4 and 5 are text only, so at 2
ranks rank 1's first micro-batch holds no image while rank 0's does (the vision tower's FSDP units
must still gather alike on both).

* ``logprobs``: the actor's log-probs of every row equal plain, unpadded HF forwards within 1e-5;
* ``reference``: ``build_reference``'s frozen copy gives the actor's log-probs;
* ``update``: one policy-gradient step with fixed advantages; the vision tower (frozen by default)
  stays bit-identical to the initial weights (``argv[2] == "unfrozen"``: it trains too).
Rank 0 saves the passed checks, the log-probs, the initial and the final full weights to ``argv[1]``.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist

from spmd_rlhf.config import AlgorithmConfig
from spmd_rlhf.distributed.topology import init_distributed, shutdown
from spmd_rlhf.models.build import build_reference
from spmd_rlhf.models.parallelize import parallelize
from spmd_rlhf.trainer.actor import Actor, PolicyTargets
from spmd_rlhf.trainer.metrics import reduce_metrics
from tests.distributed.workers.tiny_vl import hf_batch_logprobs, tiny_vl, vl_batch

SIZES = [(56, 56), (84, 56), (112, 112), (56, 112), None, None, (112, 84), (56, 56)]
MICRO = 2
ATOL = 1e-5


def gathered(values_BT: torch.Tensor, rows: slice, shape: torch.Size) -> torch.Tensor:
    """This rank's rows of a ``[B, T-1]`` tensor placed in the global shape, summed over ranks."""
    out = torch.zeros(shape)
    out[rows, : values_BT.shape[1]] = values_BT
    dist.all_reduce(out)
    return out


def main() -> None:
    out, freeze = sys.argv[1], sys.argv[2:] != ["unfrozen"]
    topo = init_distributed(1, 1, 120)
    rank, world, passed = dist.get_rank(), dist.get_world_size(), []
    full, tokenizer = tiny_vl()
    batch, prompts, responses = vl_batch(tokenizer, sizes=SIZES)
    half = batch.size // world
    rows = slice(rank * half, (rank + 1) * half)
    mine = batch.select(rows)
    expected_BT = hf_batch_logprobs(full, batch, prompts, responses)

    actor_model = parallelize(copy.deepcopy(full), topo.fsdp_mesh, topo.device, freeze_vision_tower=freeze)
    optimizer = torch.optim.AdamW([p for p in actor_model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    actor = Actor(actor_model, optimizer, scheduler, topo.dp_size, 0.0, topo.device)
    logprobs_BT = gathered(actor.logprobs(mine, MICRO, 1.0), rows, batch.loss_mask_BT.shape)
    torch.testing.assert_close(logprobs_BT, expected_BT, rtol=0, atol=ATOL)
    passed.append("logprobs")

    reference = build_reference(actor_model, full.config, topo)
    ref_BT = actor.reference_logprobs(mine, MICRO, 1.0, reference)
    torch.testing.assert_close(gathered(ref_BT, rows, batch.loss_mask_BT.shape), logprobs_BT, rtol=0, atol=1e-6)
    passed.append("reference")

    advantages_BT = torch.randn(batch.loss_mask_BT.shape, generator=torch.Generator().manual_seed(1))
    targets = PolicyTargets(advantages_BT[rows, : mine.loss_mask_BT.shape[1]], None)
    metrics = reduce_metrics(actor.update(mine, targets, AlgorithmConfig(use_kl_loss=False), MICRO, 1.0))
    weights = {name: p.full_tensor().detach().clone() for name, p in actor_model.named_parameters()}
    initial = dict(full.named_parameters())
    for name, weight in weights.items():
        if name.startswith("model.visual.") and freeze:
            assert torch.equal(weight, initial[name]), name
    passed.append("update")
    if rank == 0:
        torch.save({"world": world, "passed": passed, "logprobs": logprobs_BT, "weights": weights,
                    "initial": {n: p.detach().clone() for n, p in initial.items()}, "metrics": metrics}, out)
    shutdown()


if __name__ == "__main__":
    main()
