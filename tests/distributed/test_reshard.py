"""FSDP2 -> tensor-parallel reshard equals torch.chunk of the full tensor, exactly.

The worker runs every (dp_replicate, tp) layout the world size allows (HSDP included) in one
job, on parameters with uneven shapes, for shard dims None/0/1, and checks bucket bounds.
"""

from __future__ import annotations

import json

import pytest

from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "reshard_worker.py"


@pytest.mark.slow
@pytest.mark.parametrize(
    "nproc, layouts",
    [
        (2, [[1, 1], [1, 2], [2, 1]]),
        (4, [[1, 1], [1, 2], [1, 4], [2, 1], [2, 2]]),
    ],
    ids=["world2", "world4"],
)
def test_reshard_matches_chunk(tmp_path, nproc, layouts):
    out = tmp_path / "result"
    torchrun([str(WORKER), str(out)], nproc, timeout=120)
    for rank in range(nproc):
        result = json.loads((tmp_path / f"result.rank{rank}.json").read_text())
        assert result == {"world": nproc, "layouts": layouts}
