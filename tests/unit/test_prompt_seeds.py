"""Per-prompt sampling streams: a prompt's samples depend on its seed only, not on which other
prompts share the batch, their order or the chunking; inverse-CDF draws never pick a token of
probability zero; the helpers that cut a batch between generation ranks cover it exactly."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh

from spmd_rlhf.rollout.base import SamplingConfig, Samples, sample_seeds
from spmd_rlhf.rollout.messages import assemble, share, split_groups
from spmd_rlhf.rollout.torch_engine import TorchEngine, inverse_cdf
from tests.distributed.workers.tiny import random_prompts, tiny_config, tiny_model

VOCAB, EOS = 37, 36


def engine(max_batch_size: int) -> TorchEngine:
    config = tiny_config("qwen2", VOCAB, True)
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("gen_dp", "tp"))
    out = TorchEngine(config, mesh, torch.device("cpu"), torch.float32, [EOS], pad_token_id=0,
                      max_batch_size=max_batch_size)
    out.load_weights([list(tiny_model(config).named_parameters())])
    return out


def test_samples_follow_the_prompt_not_the_batch(world_of_one):
    prompts = random_prompts(6, VOCAB, seed=3)
    sampling = SamplingConfig(max_new_tokens=8, n=3, temperature=1.0, top_k=20, seed=11)
    whole = engine(max_batch_size=256).generate(prompts, sampling, seeds=list(range(6)))
    order = [4, 1, 5]
    part = engine(max_batch_size=2).generate([prompts[i] for i in order], sampling, seeds=order)
    for j, i in enumerate(order):
        assert part.token_ids[3 * j:3 * j + 3] == whole.token_ids[3 * i:3 * i + 3], f"prompt {i}"
        for got, want in zip(part.logprobs[3 * j:3 * j + 3], whole.logprobs[3 * i:3 * i + 3]):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
    again = engine(max_batch_size=256).generate(prompts, SamplingConfig(**{**vars(sampling), "seed": 12}),
                                                seeds=list(range(6)))
    assert again.token_ids != whole.token_ids, "another step seed draws other samples"
    samples_of_one_prompt = whole.token_ids[0:3]
    assert len({tuple(t) for t in samples_of_one_prompt}) > 1, "a prompt's n samples draw from n streams"


def test_sample_seeds_differ_per_prompt_and_sample():
    seeds = sample_seeds(5, [0, 1, 2], 4)
    assert len(seeds) == 12 == len(set(seeds)) and all(0 <= s < 2**63 for s in seeds)
    assert sample_seeds(5, [2], 4) == seeds[8:]


def test_inverse_cdf_skips_zero_probability_tokens():
    probs_BV = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]] * 5)
    uniform_B = torch.tensor([0.0, 0.2499, 0.25, 0.9, 1.0 - 2**-53], dtype=torch.float64)
    assert inverse_cdf(probs_BV, uniform_B).tolist() == [1, 1, 3, 3, 3]


def test_shares_cover_a_batch_and_groups_reassemble_in_a_ranks_order():
    assert [list(share(10, 3, i)) for i in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    samples = Samples([[g, j] for g in range(3) for j in range(2)], [[0.0, 0.0]] * 6, ["stop"] * 6)
    groups = split_groups(samples, 2, first=4)
    assert sorted(groups) == [4, 5, 6]
    rollout, greedy = assemble([6, 4], groups, {4: "a", 6: "c"}, 2)
    assert rollout.samples.token_ids == [[2, 0], [2, 1], [0, 0], [0, 1]] and rollout.examples == ["c", "c", "a", "a"]
    assert greedy is None
