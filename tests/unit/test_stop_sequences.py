"""Stop sequences in TorchEngine: a row ends right after the first stop sequence it generates (kept in
the output, finish reason "stop"), with exactly the tokens and logprobs it would have had without the
stop; rows that never generate one are unchanged."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh

from spmd_rlhf.rollout.base import SamplingConfig
from spmd_rlhf.rollout.torch_engine import TorchEngine
from tests.distributed.workers.tiny import random_prompts, tiny_config, tiny_model

VOCAB, EOS = 37, 36


def engine() -> TorchEngine:
    config = tiny_config("qwen2", VOCAB, True)
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("gen_dp", "tp"))
    out = TorchEngine(config, mesh, torch.device("cpu"), torch.float32, [EOS], pad_token_id=0, max_batch_size=4)
    out.load_weights([list(tiny_model(config).named_parameters())])
    return out


def first_end(tokens: list[int], stop: tuple[int, ...]) -> int | None:
    """Tokens up to and including the first occurrence of ``stop``; None without one."""
    k = len(stop)
    return next((i + k for i in range(len(tokens) - k + 1) if tuple(tokens[i:i + k]) == stop), None)


def test_generation_stops_right_after_a_stop_sequence(world_of_one):
    prompts, seeds = random_prompts(5, VOCAB, seed=7, low=1), [0, 1, 2, 3, 4]
    sampling = SamplingConfig(max_new_tokens=16, n=2, temperature=1.0, seed=3)
    gen = engine()
    free = gen.generate(prompts, sampling, seeds=seeds)
    row = next(t for t in free.token_ids if len(t) >= 8)  # a pair from the middle of some row
    pair, single = (row[4], row[5]), (row[2],)
    stopped = gen.generate(prompts, SamplingConfig(**{**vars(sampling), "stop_sequences": (pair, single)}),
                           seeds=seeds)
    cut_rows = 0
    for tokens, logprobs, reason, got, got_lp, got_reason in zip(
            free.token_ids, free.logprobs, free.finish_reasons,
            stopped.token_ids, stopped.logprobs, stopped.finish_reasons):
        ends = [e for e in (first_end(tokens, pair), first_end(tokens, single)) if e is not None]
        if not ends:
            assert (got, got_reason) == (tokens, reason)
            continue
        end = min(ends)
        cut_rows += end < len(tokens)
        assert got == tokens[:end] and got_reason == "stop"
        torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(logprobs[:end]), rtol=1e-5, atol=1e-5)
    assert cut_rows >= 1, "the stop cut at least one row short"


def test_single_token_stops_are_what_stop_ids_can_honour():
    sampling = SamplingConfig(max_new_tokens=4, stop_sequences=((5,), (7, 8), (3,), (5,)))
    assert sampling.single_token_stops() == [3, 5]


def test_vllm_gets_the_one_token_stops_as_stop_ids():
    from types import SimpleNamespace

    from spmd_rlhf.rollout.vllm_engine import VLLMEngine

    engine = SimpleNamespace(_SamplingParams=dict, eos_ids=[2], _banned=[])  # the parameters as keyword arguments
    sampling = SamplingConfig(max_new_tokens=4, stop_sequences=((16,), (7, 8)))
    assert VLLMEngine._params(engine, sampling, seed=1)["stop_token_ids"] == [2, 16]
    ignoring = SamplingConfig(max_new_tokens=4, ignore_eos=True, stop_sequences=((16,),))
    assert VLLMEngine._params(engine, ignoring, seed=1)["stop_token_ids"] == [16]
