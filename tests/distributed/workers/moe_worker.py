"""Run under torchrun (1 or 2 ranks, gloo): the tiny Qwen3-MoE of ``tools/make_tiny_model.py``
through FSDP2, both weight syncs, the TorchEngine and one GRPO step.

* ``experts_sharded``: each rank stores whole experts, its torch.chunk block of the expert dim;
* ``syncs_identical``: ``reshard_stream`` (tp slices; whole tensors at tp = 1) and
  ``full_tensor_stream`` give two TorchEngines bit-identical weights, equal to the model's;
* ``engine_logprobs``: the engine's greedy logprobs match a plain HF forward within 1e-4;
* ``expert_parallel`` (2 ranks): a tp = 2 TorchEngine holds 2 of the 4 experts per rank (the
  reshard's dim-0 slices of ``param_shard_dims``) and generates the tp = 1 engine's greedy tokens,
  its logprobs within 1e-4 of a plain HF forward;
* ``grpo_step``: one on-policy GRPO step of the ``Actor`` on a fixed global batch (8 prompts x 4
  responses, fixed rewards), this rank's rows only. The router balance loss is off: it is taken
  per micro-batch (``models/moe.py``), so it depends on how rows split into micro-batches and
  ranks, and the step could not be the same on 1 and 2 ranks (``tests/unit/test_moe.py`` checks it).
Rank 0 saves the passed checks, the final full weights and the step's metrics to ``argv[1]``.
"""

from __future__ import annotations

import copy
import importlib.util
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from spmd_rlhf.algorithms.advantages import broadcast_to_tokens, grpo_advantages
from spmd_rlhf.config import AlgorithmConfig
from spmd_rlhf.data.batch import collate, response_tensor
from spmd_rlhf.distributed.reshard import full_tensor_stream, reshard_stream, tp_chunk
from spmd_rlhf.distributed.topology import Topology, init_distributed, shutdown
from spmd_rlhf.distributed.tp_plan import param_shard_dims, replicated_dims
from spmd_rlhf.models.parallelize import parallelize
from spmd_rlhf.rollout.base import SamplingConfig
from spmd_rlhf.rollout.torch_engine import TorchEngine
from spmd_rlhf.trainer.actor import Actor, PolicyTargets
from spmd_rlhf.trainer.metrics import reduce_metrics
from tests.distributed.workers.tiny import hf_logprobs, random_prompts
from tests.launch import REPO_ROOT

_spec = importlib.util.spec_from_file_location("make_tiny_model", REPO_ROOT / "tools" / "make_tiny_model.py")
make_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tiny)

PROMPTS, N, EOS = 8, 4, 1
REWARDS = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 0]]
AUX_COEF = 0.0  # per micro-batch, the balance term depends on how rows split into micro-batches: off here


def tiny_moe() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from spmd_rlhf.tasks.arithmetic import build_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_tiny.tiny_config("qwen3_moe", build_tokenizer()), dtype=torch.float32)
    make_tiny.spread_router(model)
    return model.eval()


def check_experts_sharded(actor, full, rank: int, world: int) -> None:
    for name, param in actor.named_parameters():
        if "experts" not in name:
            continue
        assert isinstance(param, DTensor), name
        local, whole = param.to_local(), full.get_parameter(name)
        per_rank = -(-whole.shape[0] // world)
        assert local.shape == (per_rank, *whole.shape[1:]), (name, local.shape)
        assert torch.equal(local, whole[rank * per_rank : (rank + 1) * per_rank]), name


def check_syncs(actor, full, topo) -> TorchEngine:
    engines = [TorchEngine(full.config, topo.gen_mesh, topo.device, torch.float32, [EOS], 0) for _ in range(2)]
    engines[0].load_weights(reshard_stream(actor.named_parameters(), replicated_dims(actor), topo.reshard_mesh, 4096))
    engines[1].load_weights(full_tensor_stream(actor.named_parameters(), 4096, torch.float32))
    expected = dict(full.named_parameters())
    for (name, a), (other, b) in zip(engines[0].model.named_parameters(), engines[1].model.named_parameters(), strict=True):
        assert name == other and torch.equal(a, b) and torch.equal(a, expected[name]), name
    return engines[0]


def check_engine_logprobs(engine: TorchEngine, full) -> None:
    prompts = random_prompts(5, 15, seed=3, low=3)
    samples = engine.generate(prompts, SamplingConfig(max_new_tokens=6, temperature=0.0))
    for prompt, tokens, logprobs in zip(prompts, samples.token_ids, samples.logprobs):
        torch.testing.assert_close(torch.tensor(logprobs), hf_logprobs(full, prompt, tokens), atol=1e-4, rtol=0)


def check_expert_parallel(full, tp2: Topology, tp1_engine: TorchEngine) -> None:
    actor = parallelize(copy.deepcopy(full), tp2.fsdp_mesh, tp2.device, router_aux_loss_coef=0.0)
    dims = param_shard_dims(actor)
    engine = TorchEngine(full.config, tp2.gen_mesh, tp2.device, torch.float32, [EOS], 0)
    engine.load_weights(reshard_stream(actor.named_parameters(), dims, tp2.reshard_mesh, 4096))
    whole = dict(full.named_parameters())
    for name, param in engine.model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        expected = whole[name] if dims[name] is None else tp_chunk(whole[name], dims[name], 2, tp2.tp_rank)
        assert torch.equal(local, expected), name
    assert engine.model.get_parameter("model.layers.0.mlp.experts.gate_up_proj").shape[0] == 2
    prompts = random_prompts(7, 15, seed=1, low=3)
    lo, hi = (0, 4) if tp2.tp_rank == 0 else (4, 7)  # uneven shares of one tp group
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    got, want = engine.generate(prompts[lo:hi], greedy), tp1_engine.generate(prompts[lo:hi], greedy)
    assert got.token_ids == want.token_ids, (got.token_ids, want.token_ids)
    for prompt, tokens, logprobs in zip(prompts[lo:hi], got.token_ids, got.logprobs):
        torch.testing.assert_close(torch.tensor(logprobs), hf_logprobs(full, prompt, tokens), atol=1e-4, rtol=0)


def fixed_rollout() -> tuple[list[list[int]], list[list[int]]]:
    """Every (prompt, response) row of the global batch, prompt-major; lengths vary."""
    gen = torch.Generator().manual_seed(1234)
    rows, responses = [], []
    for i in range(PROMPTS):
        prompt = [3 + i] + torch.randint(3, 15, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
        for j in range(N):
            tokens = torch.randint(3, 15, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen).tolist()
            rows.append(prompt)
            responses.append(tokens + [EOS] if j % 2 == 0 else tokens)
    return rows, responses


def grpo_step(actor: Actor, engine: TorchEngine, rank: int, world: int) -> dict[str, float]:
    rows, responses = fixed_rollout()
    mine = slice(rank * len(rows) // world, (rank + 1) * len(rows) // world)
    batch = collate(rows[mine], responses[mine], pad_id=0)
    adv_B = grpo_advantages(torch.tensor(REWARDS, dtype=torch.float32)).reshape(-1)[mine]
    # the engine's logprobs of the fixed tokens: its weights are the actor's, so the mismatch is float noise
    engine_lp = [hf_logprobs(engine.model, p, r).tolist() for p, r in zip(rows[mine], responses[mine])]
    targets = PolicyTargets(advantages_BT=broadcast_to_tokens(adv_B, batch.loss_mask_BT), old_logprobs_BT=None,
                            engine_logprobs_BT=response_tensor(engine_lp, batch, [len(p) for p in rows[mine]]))
    algo = AlgorithmConfig(use_kl_loss=False)
    return reduce_metrics(actor.update(batch, targets, algo, micro_batch_size=5, temperature=1.0))


def main() -> None:
    out = sys.argv[1]
    topo = init_distributed(1, 1, 120)
    rank, world, passed = dist.get_rank(), dist.get_world_size(), []
    full = tiny_moe()
    actor_model = parallelize(copy.deepcopy(full), topo.fsdp_mesh, topo.device, router_aux_loss_coef=AUX_COEF)
    check_experts_sharded(actor_model, full, rank, world)
    passed.append("experts_sharded")
    engine = check_syncs(actor_model, full, topo)
    passed.append("syncs_identical")
    check_engine_logprobs(engine, full)
    passed.append("engine_logprobs")
    if world == 2:
        check_expert_parallel(full, init_distributed(1, 2, 120), engine)
        passed.append("expert_parallel")
    optimizer = torch.optim.AdamW(actor_model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    actor = Actor(actor_model, optimizer, scheduler, topo.dp_size, 0.0, topo.device)
    metrics = grpo_step(actor, engine, rank, world)
    passed.append("grpo_step")
    weights = {name: p.full_tensor().detach().clone() for name, p in actor_model.named_parameters()}
    if rank == 0:
        initial = {name: p.detach().clone() for name, p in full.named_parameters()}
        torch.save({"world": world, "passed": passed, "metrics": metrics, "weights": weights, "initial": initial}, out)
    shutdown()


if __name__ == "__main__":
    main()
