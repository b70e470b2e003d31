"""Run under torchrun (1 or 2 ranks): one actor update on packed micro-batches, sp = world size.

Every world size builds the same tiny Qwen2 policy (4 heads, 2 key/value heads), shards it with
FSDP2 and takes a fixed batch of 6 rows of unequal lengths; with 2 ranks each holds 3 of them and
the two form one sequence-parallel group (``distributed.sp=2``). It computes the log-probs of
every row, then one update (PPO clip with ratios away from 1, seq-mean-token-mean, entropy bonus)
with plain SGD at lr 1, so the weight change is minus the gradient. Rank 0 saves the log-probs of
all rows, the weights before and after, the rank-reduced metrics, and the number of tokens the
first layer's MLP saw in each forward (each rank's own) to ``argv[1]``. ``argv[2] == "ac"``:
activation checkpointing (the attention's all-to-alls run again in the backward); ``"compile"``:
``torch.compile``d layers (aot_eager; minutes on 2 cores, so not in the test suite).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from spmd_rlhf.config import Config
from spmd_rlhf.data.batch import collate
from spmd_rlhf.distributed.topology import init_distributed, shutdown
from spmd_rlhf.models.parallelize import parallelize
from spmd_rlhf.trainer.actor import Actor, PolicyTargets
from spmd_rlhf.trainer.metrics import reduce_metrics
from spmd_rlhf.trainer.micro import MicroBatcher
from tests.distributed.workers.tiny import tiny_config, tiny_model

ROWS, VOCAB, MAX_TOKENS = 6, 37, 21  # budget 21: several packed rows, odd lengths (padding to sp)


def fixed_batch():
    """Rows of 3-13 tokens, the second half of each a response; advantages and old log-probs."""
    gen = torch.Generator().manual_seed(7)
    prompts, responses = [], []
    for _ in range(ROWS):
        prompt_len = int(torch.randint(2, 6, (1,), generator=gen))
        prompts.append(torch.randint(1, VOCAB, (prompt_len,), generator=gen).tolist())
        response_len = int(torch.randint(1, 9, (1,), generator=gen))
        responses.append(torch.randint(1, VOCAB, (response_len,), generator=gen).tolist())
    batch = collate(prompts, responses, pad_id=0)
    advantages_BT = torch.randn(batch.loss_mask_BT.shape, generator=gen) * batch.loss_mask_BT
    noise_BT = 0.1 * torch.randn(batch.loss_mask_BT.shape, generator=gen)
    return batch, advantages_BT, noise_BT


def full_weights(model) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}


def main(out_path: str, variant: str) -> None:
    world = int(os.environ["WORLD_SIZE"])
    topo = init_distributed(1, 1, 60.0, sp=world)
    assert topo.sp == world and (world == 1) == (topo.sp_group is None)
    model = tiny_model(tiny_config("qwen2", VOCAB, tied=True), seed=0).train()
    mlp_tokens: list[int] = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: mlp_tokens.append(args[0].shape[1]))
    model = parallelize(model, topo.fsdp_mesh, topo.device, activation_checkpointing=variant == "ac",
                        compile_layers=variant == "compile", compile_backend="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batcher = MicroBatcher(MAX_TOKENS, chunk_tokens=4)
    assert batcher.sp == world
    actor = Actor(model, optimizer, scheduler, topo.dp_size, 0.0, topo.device, batcher=batcher)
    batch, advantages_BT, noise_BT = fixed_batch()
    share = ROWS // world
    own = slice(topo.rank * share, (topo.rank + 1) * share)
    mine = batch.select(own)
    width = mine.loss_mask_BT.shape[1]
    logprobs_BT = actor.logprobs(mine, 2, 1.0)
    assert logprobs_BT.shape == mine.loss_mask_BT.shape
    gathered = [None] * world
    dist.all_gather_object(gathered, logprobs_BT)
    algo = Config().algorithm
    algo.loss_agg_mode, algo.entropy_coef, algo.use_kl_loss = "seq-mean-token-mean", 0.01, False
    targets = PolicyTargets(advantages_BT=advantages_BT[own, :width],
                            old_logprobs_BT=(logprobs_BT + noise_BT[own, :width]) * mine.loss_mask_BT)
    before = full_weights(model)
    metrics = reduce_metrics(actor.update(mine, targets, algo, 2, 1.0))
    after = full_weights(model)
    if topo.rank == 0:
        torch.save({"logprobs": gathered, "before": before, "after": after, "metrics": metrics,
                    "mlp_tokens": mlp_tokens}, out_path)
    del actor, model, optimizer, scheduler
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
