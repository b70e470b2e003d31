"""Run under torchrun with 2 ranks: actor (FSDP2) -> TorchEngine at tp=2 and tp=1 (2 replicas).

For each tiny architecture: sync weights through ``reshard_stream`` + ``param_shard_dims``,
check the engine's local slices, then compare tp=2 generation with tp=1 generation and with a
plain HF forward. Writes the names of the passed checks to ``argv[1]``.rank<r>.json.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from spmd_rlhf.models.parallelize import parallelize
from torch.distributed.tensor import DTensor

from spmd_rlhf.distributed.reshard import reshard_stream, tp_chunk
from spmd_rlhf.distributed.topology import Topology, init_distributed, shutdown
from spmd_rlhf.distributed.tp_plan import param_shard_dims
from spmd_rlhf.rollout.base import SamplingConfig, Samples
from spmd_rlhf.rollout.torch_engine import TorchEngine
from tests.distributed.workers.tiny import ARCHS, hf_logprobs, random_prompts, tiny_config, tiny_model

GREEDY = SamplingConfig(max_new_tokens=10, temperature=0.0)
SAMPLED = SamplingConfig(max_new_tokens=10, n=2, temperature=0.9, top_k=20, top_p=0.95, seed=11)


def make_actor(full: torch.nn.Module, topo: Topology) -> torch.nn.Module:
    """The trainer's own FSDP2 layout, on a copy of ``full``."""
    return parallelize(copy.deepcopy(full), topo.fsdp_mesh, torch.device("cpu"))


def make_engine(config, topo: Topology, actor, eos: list[int]) -> TorchEngine:
    engine = TorchEngine(config, topo.gen_mesh, torch.device("cpu"), torch.float32, eos, pad_token_id=0, max_batch_size=5)
    engine.load_weights(reshard_stream(actor.named_parameters(), param_shard_dims(actor), topo.reshard_mesh, 2048))
    assert engine.weight_version == 1
    return engine


def check_slices(engine: TorchEngine, full: torch.nn.Module, topo: Topology) -> None:
    dims = param_shard_dims(full)
    full_params = dict(full.named_parameters())
    assert set(dict(engine.model.named_parameters())) == set(full_params)
    for name, param in engine.model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        dim = dims[name] if topo.tp > 1 else None
        expected = full_params[name] if dim is None else tp_chunk(full_params[name], dim, topo.tp, topo.tp_rank)
        assert torch.equal(local, expected), name


def check_logprobs(full, prompts: list[list[int]], samples: Samples, n: int, temperature: float) -> None:
    for row, (tokens, logprobs) in enumerate(zip(samples.token_ids, samples.logprobs)):
        expected = hf_logprobs(full, prompts[row // n], tokens, temperature)
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=0)


def assert_same_tokens(got: Samples, want: Samples, logprob_atol: float = 1e-5) -> None:
    assert got.token_ids == want.token_ids, (got.token_ids, want.token_ids)
    assert got.finish_reasons == want.finish_reasons
    for a, b in zip(got.logprobs, want.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=logprob_atol, rtol=0)


def share(samples: Samples, start: int, stop: int, n: int) -> Samples:
    rows = slice(start * n, stop * n)
    return Samples(samples.token_ids[rows], samples.logprobs[rows], samples.finish_reasons[rows])


def gather_tp(samples: Samples, topo: Topology) -> Samples:
    parts: list[Samples | None] = [None] * topo.tp
    dist.all_gather_object(parts, samples, group=topo.gen_mesh["tp"].get_group())
    return Samples(*([x for p in parts for x in getattr(p, f)] for f in ("token_ids", "logprobs", "finish_reasons")))


def run_arch(arch: str, vocab: int, tied: bool, tp2: Topology, tp1: Topology, passed: list[str]) -> None:
    config = tiny_config(arch, vocab, tied)
    full = tiny_model(config, seed=0)
    actor = make_actor(full, tp2)
    eos = [vocab - 1]
    eng2, eng1 = make_engine(config, tp2, actor, eos), make_engine(config, tp1, actor, eos)
    check_slices(eng2, full, tp2)
    check_slices(eng1, full, tp1)
    for engine in (eng1, eng2):
        assert (engine.model.lm_head.weight is engine.model.model.embed_tokens.weight) == tied
    passed.append(f"{arch}:slices")

    prompts = random_prompts(7, vocab, seed=1)
    rank = dist.get_rank()
    lo, hi = (0, 4) if rank == 0 else (4, 7)  # uneven shares
    mine = prompts[lo:hi]

    reference = eng1.generate(prompts, GREEDY)  # tp=1: a local, whole-replica run
    check_logprobs(full, prompts, reference, 1, 1.0)
    assert_same_tokens(eng2.generate(mine, GREEDY), share(reference, lo, hi, 1))
    assert_same_tokens(eng1.generate(mine, GREEDY), share(reference, lo, hi, 1))
    passed.append(f"{arch}:greedy_tp2_equals_tp1")

    first = eng2.generate(mine, SAMPLED)
    assert_same_tokens(eng2.generate(mine, SAMPLED), first, logprob_atol=0.0)
    assert eng2.generate(mine, SamplingConfig(**{**SAMPLED.__dict__, "seed": 12})).token_ids != first.token_ids
    check_logprobs(full, mine, first, SAMPLED.n, SAMPLED.temperature)
    assert_same_tokens(gather_tp(first, tp2), eng1.generate(prompts, SAMPLED))
    passed.append(f"{arch}:sampling_reproducible_and_tp_consistent")

    top1 = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=1, seed=5)
    assert eng2.generate(mine, top1).token_ids == share(reference, lo, hi, 1).token_ids
    passed.append(f"{arch}:top_k1_is_greedy")

    stop_token = reference.token_ids[0][2]
    eng_stop = make_engine(config, tp2, actor, eos + [stop_token])
    stopped = eng_stop.generate(mine, GREEDY)
    expected = share(reference, lo, hi, 1)
    for tokens, reason, ref_tokens, ref_reason in zip(
        stopped.token_ids, stopped.finish_reasons, expected.token_ids, expected.finish_reasons
    ):
        if stop_token in ref_tokens:
            ref_tokens, ref_reason = ref_tokens[: ref_tokens.index(stop_token) + 1], "stop"
        assert (tokens, reason) == (ref_tokens, ref_reason)
    if rank == 0:
        assert stopped.finish_reasons[0] == "stop"  # its stop token sits at position 2
    passed.append(f"{arch}:eos_stops")


def main() -> None:
    out_path = sys.argv[1]
    tp2 = init_distributed(1, 2, 60)
    tp1 = init_distributed(1, 1, 60)
    assert dist.get_world_size() == 2 and tp2.tp == 2 and tp1.gen_dp == 2
    passed: list[str] = []
    for arch, vocab, tied in ARCHS:
        run_arch(arch, vocab, tied, tp2, tp1, passed)
    with open(f"{out_path}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(passed, f)
    shutdown()


if __name__ == "__main__":
    main()
