"""One GPU, one process: the colocated vLLM engine against the FSDP2 actor it is synced from.

Writes a JSON report to argv[1]; tests/gpu/test_vllm_colocate.py asserts on it.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

from spmd_rlhf.data.batch import collate, response_tensor  # noqa: E402
from spmd_rlhf.distributed.reshard import full_tensor_stream, reshard_stream  # noqa: E402
from spmd_rlhf.distributed.topology import init_distributed, shutdown  # noqa: E402
from spmd_rlhf.models.parallelize import parallelize  # noqa: E402
from spmd_rlhf.rollout import vllm_compat as compat  # noqa: E402
from spmd_rlhf.rollout.base import SamplingConfig  # noqa: E402
from spmd_rlhf.rollout.sync import sync_shard_dims  # noqa: E402
from spmd_rlhf.rollout.vllm_engine import VLLMEngine  # noqa: E402
from spmd_rlhf.trainer.micro import token_logits  # noqa: E402
from spmd_rlhf.algorithms.losses import logprobs_from_logits  # noqa: E402

EOS = 1


def tiny_config() -> Qwen2Config:
    return Qwen2Config(vocab_size=1001, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=EOS, pad_token_id=EOS)


def sync(engine, actor, topo, path: str) -> None:
    engine.wants_full_weights = path == "full"
    if path == "full":
        stream = full_tensor_stream(actor.named_parameters(), 2**20, dtype=torch.bfloat16)
    else:
        stream = reshard_stream(actor.named_parameters(), sync_shard_dims(engine, actor, topo.tp),
                                topo.reshard_mesh, 2**20, dtype=torch.bfloat16)
    engine.load_weights(stream)


def rollout_step(engine, actor, topo, prompts, sampling, path="dtensor"):
    """The trainer's order: wake weights -> sync -> (KV cache wakes) -> generate -> sleep."""
    engine.wake()
    sync(engine, actor, topo, path)
    samples = engine.generate(prompts, sampling)
    engine.sleep()
    return samples


@torch.no_grad()
def actor_logprob_gap(actor, prompts, samples, device) -> tuple[float, float]:
    batch = collate(prompts, samples.token_ids, EOS)
    engine_lp = response_tensor(samples.logprobs, batch, [len(p) for p in prompts])
    lp = logprobs_from_logits(token_logits(actor, batch.to(device), 1.0), batch.input_ids_BT[:, 1:].to(device)).cpu()
    actor.reshard()  # a forward without backward leaves the FSDP root's parameters gathered
    gap = (lp - engine_lp).abs() * batch.loss_mask_BT
    return float(gap.sum() / batch.loss_mask_BT.sum()), float(gap.max())


def update_actor(actor, device, steps=3) -> None:
    """A few large AdamW steps on random tokens: the policy moves far from the synced one."""
    optimizer = torch.optim.AdamW(actor.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(7)
    for _ in range(steps):
        ids = torch.randint(2, 1001, (8, 32), generator=generator).to(device)
        loss = actor(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main(out_path: str) -> None:
    topo = init_distributed(1, 1, 600)
    device = topo.device
    config = tiny_config()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    actor = parallelize(model, topo.fsdp_mesh, device)
    engine = VLLMEngine(config, topo.gen_mesh, device, torch.bfloat16, [EOS], weight_sync="dtensor", seed=0,
                        max_model_len=128, gpu_memory_utilization=0.2, enforce_eager=True, sleep_level=1)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 1001, (12 + i,), generator=generator).tolist() for i in range(8)]
    greedy = SamplingConfig(max_new_tokens=24, n=1, temperature=0.0)
    report: dict = {}

    before = rollout_step(engine, actor, topo, prompts, greedy)
    report["gap_before_update"] = actor_logprob_gap(actor, prompts, before, device)
    update_actor(actor, device)
    after = rollout_step(engine, actor, topo, prompts, greedy)
    report["gap_after_update"] = actor_logprob_gap(actor, prompts, after, device)
    report["stale_gap"] = actor_logprob_gap(actor, prompts, before, device)  # old rollout vs new actor
    report["tokens_changed_by_update"] = before.token_ids != after.token_ids
    report["weight_version"] = engine.weight_version

    # both sync paths: bit-identical engine weights
    engine.wake()
    sync(engine, actor, topo, "dtensor")
    params = dict(compat.driver_model(engine.llm).named_parameters())
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    sync(engine, actor, topo, "full")
    report["paths_identical"] = all(torch.equal(p, snapshot[n]) for n, p in params.items())
    report["num_params"] = len(params)
    engine.sleep()

    # level 2 (weights discarded, buffers restored) generates what level 1 generated
    level1 = rollout_step(engine, actor, topo, prompts, greedy)
    engine.sleep_level = 2
    engine.wake()
    sync(engine, actor, topo, "dtensor")
    level2 = engine.generate(prompts, greedy)
    free_awake, _ = torch.cuda.mem_get_info()
    engine.sleep()
    free_asleep, _ = torch.cuda.mem_get_info()
    report["level2_equals_level1"] = level2.token_ids == level1.token_ids
    report["level2_logprob_max_diff"] = max(
        (abs(a - b) for x, y in zip(level1.logprobs, level2.logprobs) for a, b in zip(x, y)), default=0.0)
    report["free_gib_awake_vs_asleep"] = [free_awake / 2**30, free_asleep / 2**30]
    # actor shards in host memory while generating: memory freed, weights back intact, same tokens
    from spmd_rlhf.trainer.offload import ActorOffload

    weights = {n: p.full_tensor().clone() for n, p in actor.named_parameters()}
    engine.wake()
    sync(engine, actor, topo, "dtensor")
    free_before, _ = torch.cuda.mem_get_info()
    with ActorOffload(actor, None, device, enabled=True):
        free_offloaded, _ = torch.cuda.mem_get_info()
        offloaded = engine.generate(prompts, greedy)
        engine.sleep()
    report["offload_freed_mib"] = (free_offloaded - free_before) / 2**20
    report["offload_tokens_equal"] = offloaded.token_ids == level1.token_ids
    report["offload_weights_restored"] = all(
        p.device.type == "cuda" and torch.equal(p.full_tensor(), weights[n]) for n, p in actor.named_parameters())
    with open(out_path, "w") as f:
        json.dump(report, f)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
