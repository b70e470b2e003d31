"""Run under torchrun: LoRA's merged weight sync against a full sync of the merged model.

For a tiny Llama (biases everywhere) and a tiny Qwen2 (tied embeddings), with adapters whose B is
random (PEFT starts it at zero), at tp = 2 and tp = 1: the truth is PEFT's own
``merge_and_unload`` of a copy. The LoRA actor (FSDP2 over the PEFT model) syncs through
``WeightSync`` into a ``TorchEngine``; the merged model, sharded the same way, syncs into another.
Checked on every rank: the streams carry the same names (the base model's) and tensors, the two
engines hold the same weights, the whole-tensor stream gives the merged model's tensors, and the
actor with its adapters disabled computes the base model's logits (and, once the adapters are folded into
the base, the adapted model's). Each rank writes the passed
cases to ``argv[1].rank<r>.json``.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from spmd_rlhf.config.schema import LoraConfig
from spmd_rlhf.distributed.reshard import full_tensor_stream
from spmd_rlhf.distributed.topology import Topology, init_distributed, shutdown
from spmd_rlhf.models.lora import MergedWeights, add_lora, fold_adapters, reference_mode
from spmd_rlhf.models.parallelize import parallelize
from spmd_rlhf.rollout.sync import WeightSync
from spmd_rlhf.rollout.torch_engine import TorchEngine
from tests.distributed.workers.tiny import ARCHS, tiny_config, tiny_model

ATOL = 1e-6
BUCKET = 2048  # bytes: several buckets per model


def lora_model(arch: str, vocab: int, tied: bool):
    config = tiny_config(arch, vocab, tied)
    base = tiny_model(config, seed=0)
    torch.manual_seed(1)
    peft = add_lora(copy.deepcopy(base), LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():  # PEFT starts B at zero: give the merge something to add
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    return config, base, peft


def engine_weights(engine: TorchEngine) -> dict[str, torch.Tensor]:
    return {n: (p.to_local() if isinstance(p, DTensor) else p).clone() for n, p in engine.model.named_parameters()}


def streamed(sync: WeightSync) -> dict[str, torch.Tensor]:
    return {name: t.clone() for bucket in sync.stream() for name, t in bucket}


def check_sync(config, peft, merged, topo: Topology) -> None:
    cpu = torch.device("cpu")
    lora_actor = parallelize(copy.deepcopy(peft), topo.fsdp_mesh, cpu)
    merged_actor = parallelize(copy.deepcopy(merged), topo.fsdp_mesh, cpu)
    engines = [TorchEngine(config, topo.gen_mesh, cpu, torch.float32, [1], pad_token_id=0) for _ in range(2)]
    syncs = [WeightSync(engines[0], lora_actor, topo, BUCKET), WeightSync(engines[1], merged_actor, topo, BUCKET)]
    got, want = streamed(syncs[0]), streamed(syncs[1])
    assert list(got) == list(want), (list(got), list(want))
    assert not any("lora_" in n or n.startswith("base_model") or "base_layer" in n for n in got)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert torch.allclose(got[name], want[name], atol=ATOL, rtol=0), (name, (got[name] - want[name]).abs().max())
    for sync in syncs:
        sync.push()
    a, b = engine_weights(engines[0]), engine_weights(engines[1])
    assert a.keys() == b.keys()
    moved = 0.0
    base_params = dict(lora_actor.get_base_model().named_parameters())
    for name in a:
        assert torch.allclose(a[name], b[name], atol=ATOL, rtol=0), name
    for name, param in base_params.items():
        if name.endswith("q_proj.base_layer.weight"):
            moved = max(moved, float((param.full_tensor() - dict(merged.named_parameters())[name.replace(
                "base_layer.", "")]).abs().max()))
    assert moved > 1e-2, "the adapters change the merged weights (else the test proves nothing)"


def check_full_stream(peft, merged, topo: Topology) -> None:
    lora_actor = parallelize(copy.deepcopy(peft), topo.fsdp_mesh, torch.device("cpu"))
    stream = full_tensor_stream(MergedWeights(lora_actor).full_tensors(), BUCKET)
    got = {name: t for bucket in stream for name, t in bucket}
    want = dict(merged.named_parameters())
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, atol=ATOL, rtol=0), name


def check_reference(base, peft, topo: Topology) -> None:
    lora_actor = parallelize(copy.deepcopy(peft), topo.fsdp_mesh, torch.device("cpu"))
    ids = torch.randint(2, 30, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = base(input_ids=ids).logits
        with reference_mode(lora_actor):
            ref = lora_actor(input_ids=ids).logits
        adapted = lora_actor(input_ids=ids).logits
    assert torch.allclose(ref, want, atol=1e-5, rtol=0), (ref - want).abs().max()
    assert (adapted - want).abs().max() > 1e-2, "the adapters are on outside the context"
    fold_adapters(lora_actor)  # after a warm start: the reference becomes the adapted model
    with torch.no_grad():
        folded = lora_actor(input_ids=ids).logits
        with reference_mode(lora_actor):
            folded_ref = lora_actor(input_ids=ids).logits
    assert torch.allclose(folded, adapted, atol=1e-5, rtol=0) and torch.allclose(folded_ref, adapted, atol=1e-5, rtol=0)


def main() -> None:
    out_path = sys.argv[1]
    topologies = {"tp2": init_distributed(1, 2, 60), "tp1": init_distributed(1, 1, 60)}
    passed: list[str] = []
    for arch, vocab, tied in ARCHS[:2]:
        config, base, peft = lora_model(arch, vocab, tied)
        merged = copy.deepcopy(peft).merge_and_unload()
        for label, topo in topologies.items():
            check_sync(config, peft, merged, topo)
            passed.append(f"{arch}/{label}/sync")
        check_full_stream(peft, merged, topologies["tp1"])
        passed.append(f"{arch}/full_stream")
        check_reference(base, peft, topologies["tp1"])
        passed.append(f"{arch}/reference")
    with open(f"{out_path}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(passed, f)
    shutdown()


if __name__ == "__main__":
    main()
