"""Split placement's process groups on 4 real gloo ranks: who trains, who generates, which meshes
each rank holds (None outside), the sizes of the groups they carry, object messages between the
two sets, a receive that nobody answers failing at the collective timeout, and no group thread left
after ``shutdown``."""

from __future__ import annotations

import json

import pytest

from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "split_worker.py"

pytestmark = pytest.mark.slow


def expected(layout: tuple[int, int, int], rank: int) -> dict:
    """What rank ``rank`` of 4 should see under (generation_ranks, dp_replicate, tp), worked by hand."""
    generation_ranks, dp_replicate, tp = layout
    if generation_ranks == 0:
        return {"placement": "colocate", "train_ranks": [0, 1, 2, 3], "gen_ranks": [0, 1, 2, 3], "is_training": True,
                "is_generating": True, "dp_size": 4, "tp": tp, "gen_dp": 4 // tp, "train_mesh": [1, 4],
                "fsdp_mesh": [4], "gen_mesh": [4 // tp, tp], "reshard_mesh": True, "train_group_size": 4,
                "tp_rank": rank % tp, "gen_dp_rank": rank // tp, "tp_group_size": tp}
    trainers = 4 - generation_ranks
    training = rank < trainers
    fields = {"placement": "split", "train_ranks": list(range(trainers)), "gen_ranks": list(range(trainers, 4)),
              "is_training": training, "is_generating": not training, "dp_size": trainers, "tp": tp,
              "gen_dp": generation_ranks // tp, "reshard_mesh": False}
    if training:
        shard = trainers // dp_replicate
        fsdp = [shard] if dp_replicate == 1 else [dp_replicate, shard]
        fields.update(train_mesh=[dp_replicate, shard], fsdp_mesh=fsdp,
                      gen_mesh=None, train_group_size=trainers)
    else:
        index = rank - trainers
        fields.update(train_mesh=None, fsdp_mesh=None, gen_mesh=[generation_ranks // tp, tp], tp_rank=index % tp,
                      gen_dp_rank=index // tp, tp_group_size=tp)
    return fields


def test_split_layouts_objects_and_timeout(tmp_path):
    torchrun([str(WORKER), str(tmp_path / "out")], 4, timeout=120)
    layouts = [(2, 1, 2), (1, 1, 1), (2, 2, 1), (0, 1, 2)]  # the worker's LAYOUTS
    results = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in range(4)]
    for rank, result in enumerate(results):
        assert result["layouts"] == [expected(layout, rank) for layout in layouts], rank
    answers = [{"from": 2, "heard": 2, "ids": [0, 1], "big": True},
               {"from": 3, "heard": 3, "ids": [0, 1, 2], "big": True}]
    assert results[0]["objects"] == {"answers": answers}
    assert results[1]["objects"] == {}
    assert [results[r]["objects"] for r in (2, 3)] == [{"got_to": 2}, {"got_to": 3}]
    lost = results[0]["lost_receive_s"]
    assert 1.5 <= lost <= 10, f"a lost receive failed after {lost} s; the training group's timeout is 2 s"
    assert [r["threads_after_shutdown"] for r in results] == [[]] * 4  # shutdown ends the split groups too
