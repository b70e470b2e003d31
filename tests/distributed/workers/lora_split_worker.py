"""Run under torchrun with 3 ranks: LoRA's merged weights cross to a generation rank (split placement).

Ranks 0-1 train (FSDP2 over a PEFT model with random adapters), rank 2 generates (``TorchEngine``).
For a tiny Llama (biases everywhere) and a tiny Qwen2 (tied embeddings), twice (the adapters move
between the pushes, as a step moves them): ``CrossWeightSync`` sends the merged weights bucket by
bucket; the generation rank's engine must then hold PEFT's ``merge_and_unload`` of the same
adapters, under the base model's names, and no adapter. Each rank writes the passed cases to
``argv[1].rank<r>.json``.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import distribute_tensor

from spmd_rlhf.distributed.topology import init_distributed, shutdown
from spmd_rlhf.models.parallelize import parallelize
from spmd_rlhf.rollout.sync import CrossWeightSync
from spmd_rlhf.rollout.torch_engine import TorchEngine
from tests.distributed.workers.lora_sync_worker import ATOL, BUCKET, engine_weights, lora_model
from tests.distributed.workers.tiny import ARCHS


@torch.no_grad()
def move_adapters(peft: torch.nn.Module, actor: torch.nn.Module | None, seed: int) -> None:
    """New adapters in the full model (every rank alike) and in the training ranks' FSDP shards."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in peft.named_parameters():
        if ".lora_" in name:
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    if actor is not None:
        full = dict(peft.named_parameters())
        for name, param in actor.named_parameters():
            if ".lora_" in name:
                param.copy_(distribute_tensor(full[name].detach(), param.device_mesh, param.placements))


def main() -> None:
    out_path = sys.argv[1]
    topo = init_distributed(1, 1, 60, generation_ranks=1)
    cpu = torch.device("cpu")
    passed: list[str] = []
    for arch, vocab, tied in ARCHS[:2]:
        config, base, peft = lora_model(arch, vocab, tied)
        if topo.is_training:
            actor = parallelize(copy.deepcopy(peft), topo.fsdp_mesh, cpu)
            sync = CrossWeightSync(topo, BUCKET, model=actor)
        else:
            engine = TorchEngine(config, topo.gen_mesh, cpu, torch.float32, [1], pad_token_id=0)
            sync = CrossWeightSync(topo, BUCKET, engine=engine)
        for push in range(2):
            if push:
                move_adapters(peft, actor if topo.is_training else None, seed=7)
            moved = sync.push()
            if topo.is_generating:
                got = engine_weights(engine)
                want = dict(copy.deepcopy(peft).merge_and_unload().named_parameters())
                assert sorted(got) == sorted(want), (sorted(got), sorted(want))
                for name, tensor in want.items():
                    gap = (got[name] - tensor).abs().max()
                    assert torch.allclose(got[name], tensor, atol=ATOL, rtol=0), (name, gap)
                base_weights = dict(base.named_parameters())
                assert max(float((got[n] - base_weights[n]).abs().max()) for n in want) > 1e-2, "adapters matter"
                assert moved == sum(t.numel() * t.element_size() for t in want.values())
            passed.append(f"{arch}/push{push}")
    with open(f"{out_path}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(passed, f)
    shutdown()


if __name__ == "__main__":
    main()
