"""Run under torchrun with 2 ranks (gloo, CPU, tp=1: two independent vLLM replicas): adapter sync
against merged sync of the same LoRA actor.

Both ranks hold the same tiny fp32 Qwen2 (head_dim 32) with the same PEFT adapters (rank 8, B
random so the adapters matter). Both engines come from ``build_engine``: rank 0's with vLLM's
LoRA support, synced with ``model.lora.sync=adapter`` (the base once, then the adapters from
memory); rank 1's a plain engine synced with ``model.lora.sync=merged``. Both generate the same
prompts, greedy and sampled with per-prompt seeds. ``argv[1]``: output prefix; rank 0 writes ``<prefix>.json`` with, per
round (before and after the adapters move): whether both ranks drew the same tokens, the largest
log-prob gap between them, each rank's largest gap to the actor's own (PEFT) log-probs, the gap to
the base model without adapters, the bytes rank 0's push moved, the adapters' and the base's bytes.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist

from spmd_rlhf.config import Config
from spmd_rlhf.config.schema import LoraConfig
from spmd_rlhf.distributed.topology import init_distributed, shutdown
from spmd_rlhf.models.lora import add_lora
from spmd_rlhf.rollout.build import build_engine
from spmd_rlhf.rollout.sync import WeightSync
from tests.distributed.workers.tiny import hf_logprobs, random_prompts, tiny_model
from tests.vllm.workers.vllm_engine_worker import EOS, GREEDY, SAMPLED, VOCAB, config

RANK = 8


def run_config(adapter: bool) -> Config:
    """The settings ``build_engine`` reads: vLLM, LoRA of rank 8, synced as adapters or merged."""
    cfg = Config()
    cfg.rollout.engine, cfg.rollout.weight_sync = "vllm", "full"
    cfg.data.max_prompt_length, cfg.rollout.max_new_tokens = 32, 32
    cfg.model.lora.rank, cfg.model.lora.sync = RANK, "adapter" if adapter else "merged"
    return cfg


@torch.no_grad()
def move_adapters(model: torch.nn.Module, seed: int) -> None:
    """The same new adapters on every rank (a stand-in for a training step)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def main() -> None:
    out = sys.argv[1]
    topo = init_distributed(1, 1, 300)
    rank = dist.get_rank()
    adapter = rank == 0
    base = tiny_model(config(), seed=0)
    actor = add_lora(copy.deepcopy(base), LoraConfig(rank=RANK, alpha=2.0 * RANK,
                                                     sync="adapter" if adapter else "merged"))
    engine = build_engine(run_config(adapter), topo, base.config, [EOS], pad_id=0)
    sync = WeightSync(engine, actor, topo, bucket_bytes=2048)
    adapter_bytes = sum(p.numel() * 4 for n, p in actor.named_parameters() if ".lora_" in n)
    base_bytes = sum(p.numel() * 4 for _, p in base.named_parameters())
    prompts = random_prompts(6, VOCAB, seed=1, max_len=9)
    rounds = []
    for round_ in range(2):
        move_adapters(actor, seed=100 + round_)
        pushed = sync.push()
        mine = [engine.generate(prompts, GREEDY), engine.generate(prompts, SAMPLED, seeds=list(range(6)))]
        both: list = [None, None]
        dist.all_gather_object(both, [(s.token_ids, s.logprobs) for s in mine])
        record = {"pushed_bytes": pushed, "adapter_bytes": adapter_bytes, "base_bytes": base_bytes,
                  "weight_version": engine.weight_version,
                  "same_tokens": [t for t, _ in both[0]] == [t for t, _ in both[1]]}
        gaps, base_gaps, actor_gaps = [], [], [[], []]
        for (tokens_a, lps_a), (tokens_b, lps_b), sampling in zip(both[0], both[1], (GREEDY, SAMPLED)):
            rows = [p for p in prompts for _ in range(sampling.n)]
            temperature = sampling.temperature or 1.0
            for prompt, tokens, a, b in zip(rows, tokens_a, lps_a, lps_b):
                gaps.append(max(abs(x - y) for x, y in zip(a, b)))
                without = hf_logprobs(base, prompt, tokens, temperature)
                base_gaps.append(float((without - torch.tensor(a)).abs().max()))
            for r, (tokens_r, lps_r) in enumerate(((tokens_a, lps_a), (tokens_b, lps_b))):
                for prompt, tokens, lps in zip(rows, tokens_r, lps_r):
                    want = hf_logprobs(actor, prompt, tokens, temperature)
                    actor_gaps[r].append(float((want - torch.tensor(lps)).abs().max()))
        record.update(max_gap=max(gaps), base_gap=max(base_gaps), actor_gap=[max(g) for g in actor_gaps])
        rounds.append(record)
    if rank == 0:
        with open(f"{out}.json", "w") as f:
            json.dump(rounds, f)
    engine.close()
    shutdown()


if __name__ == "__main__":
    main()
