"""Split placement's weight transfer on real gloo ranks: FSDP2 training ranks send, tensor-parallel
generation ranks receive exactly ``full.chunk(tp, dim)[tp_rank]`` of every parameter of tiny Llama
and Qwen2 models, one message per bucket, and nothing but their own slices.

Layouts (generation_ranks, dp_replicate, tp): world 3 = 2 training + 1 generation rank (tp 1);
world 4 = 2 + 2 with tp 2 (one replica), 2 + 2 with HSDP training (dp_replicate 2) and two tp-1
replicas (each training rank serves one generation rank), and 3 + 1 (FSDP blocks of uneven rows
over 3 ranks; two training ranks serve nobody but take part in the gathers).
"""

from __future__ import annotations

import json

import pytest

from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "cross_reshard_worker.py"
SMALL_BUCKET = 4096  # the worker's second run

pytestmark = pytest.mark.slow


def check_layout(layout: list[int], per_rank: list[dict]) -> None:
    generation_ranks, dp_replicate, tp = layout
    world = len(per_rank)
    trainers = world - generation_ranks
    dp_shard = trainers // dp_replicate
    runs = len(per_rank[0]["runs"])
    assert [r["training"] for r in per_rank] == [rank < trainers for rank in range(world)]
    assert [r["tp_rank"] for r in per_rank[trainers:]] == [i % tp for i in range(generation_ranks)]
    for run in range(runs):
        train = [r["runs"][run] for r in per_rank[:trainers]]
        gen = [r["runs"][run] for r in per_rank[trainers:]]
        buckets = train[0]["buckets"]
        assert {t["buckets"] for t in train} | {g["buckets"] for g in gen} == {buckets}
        assert buckets == 1 if run % 2 == 0 else buckets > 3, (run, buckets)  # the worker's RUNS, per model
        for g in gen:  # one message per bucket, exactly this rank's slices
            assert g["calls"] == ["irecv"] * buckets, g["calls"]
            assert g["received_bytes"] == g["expected_bytes"] > 0
            if run % 2 == 1:
                assert all(sum(sizes[:-1]) < SMALL_BUCKET for sizes in g["bucket_sizes"]), g["bucket_sizes"]
        for rank, t in enumerate(train):  # one gather per bucket (none unsharded), one send per served rank
            served = sum(1 for i in range(generation_ranks) if i % trainers == rank)
            gathers = buckets if dp_shard > 1 else 0
            assert sorted(t["calls"]) == sorted(["all_gather_single"] * gathers + ["isend"] * served * buckets), t
        assert sum(t["sent_bytes"] for t in train) == sum(g["received_bytes"] for g in gen)


@pytest.mark.parametrize("nproc, layouts", [(3, ["1,1,1"]), (4, ["2,1,2", "2,2,1", "1,1,1"])], ids=["world3", "world4"])
def test_cross_reshard_delivers_tp_slices(tmp_path, nproc, layouts):
    torchrun([str(WORKER), str(tmp_path / "out"), *layouts], nproc, timeout=120)
    results = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in range(nproc)]
    for index, layout in enumerate(layouts):
        per_rank = [result[index] for result in results]
        assert all(r["layout"] == [int(x) for x in layout.split(",")] for r in per_rank)
        assert len(per_rank[0]["runs"]) == 4  # Llama and Qwen2, fp32 in one bucket and bf16 in small ones
        check_layout(per_rank[0]["layout"], per_rank)
