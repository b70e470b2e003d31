"""Run under torchrun (gloo, CPU): VLLMEngine on generation-only ranks (split placement).

``argv``: output prefix, ``G`` (generation ranks: the last G of the world), ``tp``. With G equal
to the world size this is the colocated engine (the reference); otherwise the topology's split
placement: the first W - G ranks build no engine and keep using their own group while the last G
ranks build one over the generation mesh (gen_dp = G / tp, tp), load the weights of a tiny random fp32 Qwen2 from a full
state dict and generate. Each generation rank writes ``<prefix>.rank<r>.json`` with its share of
the completions (greedy, and sampling with per-prompt seeds and, on one replica, without) and
``world_ok``; the test compares them with the colocated single-rank engine's.

What the split run proves on the way (asserted here):
* a training-only group (ranks 0..T-1) works while and after the generation ranks build, use and
  close vLLM (nothing of vLLM runs on them, and their collectives do not wait for it);
* a job-wide ``new_group`` created after the engine agrees on every rank (vLLM's groups did not
  advance the trainer's group counter on the generation ranks), and so does a job-wide
  all_gather after ``close`` (vLLM's teardown left the job's world alone).
"""

from __future__ import annotations

import json
import os
import sys
import torch
import torch.distributed as dist
from transformers import Qwen2Config

from spmd_rlhf.distributed.reshard import full_tensor_stream
from spmd_rlhf.distributed.topology import init_distributed, shutdown
from spmd_rlhf.rollout.base import SamplingConfig, Samples
from spmd_rlhf.rollout.vllm_engine import VLLMEngine
from tests.distributed.workers.tiny import random_prompts, tiny_model

VOCAB, EOS = 37, 36
GREEDY = SamplingConfig(max_new_tokens=8, temperature=0.0)
SAMPLED = SamplingConfig(max_new_tokens=8, n=2, temperature=0.7, seed=11)
TIMEOUT_S = 300


def config() -> Qwen2Config:
    return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True, use_sliding_window=False)


def share(rows: list, parts: int, part: int) -> list:
    """Part ``part`` of ``rows`` cut into ``parts`` contiguous pieces (uneven when needed)."""
    per = -(-len(rows) // parts)
    return rows[part * per:(part + 1) * per]


def generate(engine: VLLMEngine, prompts: list[list[int]], slot: int, slots: int) -> dict:
    """This generation rank's share of the prompts (rank order), greedy and sampled. Per-prompt
    seeds (the prompt's index) make sampling independent of the replica; without them, sampling
    is compared only where one replica draws every prompt."""
    ids = share(list(range(len(prompts))), slots, slot)
    mine = [prompts[i] for i in ids]
    one_replica = engine.tp == slots
    out: dict = {"prompt_ids": ids}
    for key, sampling, seeds in (("greedy", GREEDY, None), ("seeded", SAMPLED, ids), ("sampled", SAMPLED, None)):
        if key == "sampled" and not one_replica:
            continue
        samples: Samples = engine.generate(mine, sampling, seeds=seeds)
        out[key] = {"token_ids": samples.token_ids, "logprobs": samples.logprobs,
                    "finish_reasons": samples.finish_reasons}
    return out


def main() -> None:
    out, gen, tp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    world = int(os.environ["WORLD_SIZE"])
    topo = init_distributed(1, tp, TIMEOUT_S, generation_ranks=0 if gen == world else gen)
    rank = dist.get_rank()
    trainers = [] if gen == world else topo.train_ranks
    assert topo.gen_ranks == list(range(world - gen, world))
    full = tiny_model(config(), seed=0)
    prompts = random_prompts(7, VOCAB, seed=1, max_len=9)
    result: dict = {}

    if rank in trainers:  # busy with their own group while the generation ranks start vLLM
        for step in range(3):
            total = torch.tensor([float(rank + step)])
            dist.all_reduce(total, group=topo.train_group)
            assert total.item() == sum(r + step for r in trainers), total
    else:
        engine = VLLMEngine(full.config, topo.gen_mesh, topo.device, torch.float32, [EOS], max_model_len=64,
                            kv_cache_gib=1, enforce_eager=True, timeout_s=TIMEOUT_S)
        engine.load_weights(full_tensor_stream(full.named_parameters(), 2048, torch.float32))
        assert engine.weight_version == 1
        result = generate(engine, prompts, rank - (world - gen), gen)

    late = dist.new_group(list(range(world)))  # job-wide, after the engine: names must agree
    seen = torch.tensor([float(rank)])
    dist.all_reduce(seen, group=late)
    assert seen.item() == sum(range(world)), seen
    if rank not in trainers:
        engine.close()  # colocated, this also ends the job's world (vLLM's teardown)
    if trainers:  # split: the job's world outlives vLLM's teardown
        everyone: list = [None] * world
        dist.all_gather_object(everyone, rank)
        assert everyone == list(range(world)), everyone
    if rank not in trainers:
        result["world_ok"] = True
        with open(f"{out}.rank{rank}.json", "w") as f:
            json.dump(result, f)
    shutdown()


if __name__ == "__main__":
    main()
