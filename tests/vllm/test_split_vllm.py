"""VLLMEngine on generation-only ranks (split placement), under torchrun on gloo (CPU).

The reference is the colocated engine on a world of one; the split runs put the engine on the
last G ranks of a larger world, whose first ranks build none (see ``workers/split_vllm_worker.py``
for what else each run asserts): one generation rank, two replicas (per-prompt seeds), and one
replica over tp = 2. With the same weights and seeds the completions must be the
colocated engine's: the same tokens and finish reasons, log-probs within 1e-4 (tp = 2 sums its
partial products in another order).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "vllm" / "workers" / "split_vllm_worker.py"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def run(prefix, world: int, gen: int, tp: int) -> list[dict]:
    """The generation ranks' results, rank order."""
    torchrun([str(WORKER), str(prefix), str(gen), str(tp)], world, timeout=400, env=ENV)
    return [json.loads((prefix.parent / f"{prefix.name}.rank{rank}.json").read_text())
            for rank in range(world - gen, world)]


def merged(results: list[dict], key: str) -> dict:
    """The tp ranks' shares of one replica, in prompt order."""
    return {field: [row for r in results for row in r[key][field]] for field in ("token_ids", "logprobs",
                                                                                 "finish_reasons")}


@pytest.fixture(scope="module")
def colocated(tmp_path_factory) -> list[dict]:
    return run(tmp_path_factory.mktemp("colocated") / "result", 1, 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize(("world", "gen", "tp"), [(3, 1, 1), (3, 2, 1), (4, 2, 2)])
def test_split_engine_generates_what_colocated_does(tmp_path, colocated, world, gen, tp):
    split = run(tmp_path / "result", world, gen, tp)
    assert all(r["world_ok"] for r in split)
    assert [i for r in split for i in r["prompt_ids"]] == colocated[0]["prompt_ids"] == list(range(7))
    keys = ["greedy", "seeded"] + (["sampled"] if gen == tp else [])  # unseeded: one replica only
    assert all(set(keys) <= set(r) for r in split)
    for key in keys:
        got, want = merged(split, key), merged(colocated, key)
        assert got["token_ids"] == want["token_ids"], key
        assert got["finish_reasons"] == want["finish_reasons"], key
        for a, b in zip(got["logprobs"], want["logprobs"], strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    first_samples = merged(split, "seeded")["token_ids"][::2]  # n = 2, prompt-major
    assert first_samples != merged(split, "greedy")["token_ids"], "temperature 0.7 sampled, not greedy"
