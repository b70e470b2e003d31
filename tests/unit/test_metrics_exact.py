"""Token-weighted metrics are exact over ranks holding different token counts: the sums and the
token counts of every rank are added, then divided once (not a mean of per-rank means). Two gloo
ranks in spawned processes; the expected values are worked out by hand below."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spmd_rlhf.trainer.experience import rollout_correction
from spmd_rlhf.trainer.learner import Learner
from spmd_rlhf.trainer.metrics import global_means, reduce_metrics
from tests.launch import free_port

# Rank 0 holds 4 loss tokens, 1 of them clipped; rank 1 holds 2, both clipped.
CLIPPED = {0: (1.0, 4.0), 1: (2.0, 2.0)}
EXACT_CLIPFRAC = (1 + 2) / (4 + 2)  # 0.5; the mean of the ranks' fractions would be (1/4 + 1) / 2 = 0.625
# |old - engine| on the masked tokens: rank 0 three tokens of 0.1, rank 1 one token of 0.4 (and a
# masked-out position with a large difference that must not count).
EXACT_LOGPROB_DIFF = (3 * 0.1 + 0.4) / 4  # 0.175; the mean of the ranks' means would be 0.25


class _Clipping(Learner):
    namespace = "actor"
    whole = ("actor/pg_loss",)


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        clipped, tokens = CLIPPED[rank]
        results = {"global_means": global_means({"actor/pg_clipfrac": (clipped, tokens)})}

        model = torch.nn.Linear(2, 1)
        model(torch.ones(1, 2)).sum().backward()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        learner = _Clipping(model, optimizer, scheduler, dp_size=2, grad_clip=0.0, device=torch.device("cpu"))
        totals = {"actor/pg_clipfrac": torch.tensor(clipped), "actor/pg_loss": torch.tensor(0.25),
                  "_tokens": torch.tensor(tokens)}
        results["learner"] = reduce_metrics(learner._finish_step(totals))

        if rank == 0:
            old, engine, mask = torch.full((1, 4), -1.0), torch.full((1, 4), -1.1), torch.tensor([[1, 1, 1, 0]])
            engine[0, 3] = -9.0
        else:
            old, engine, mask = torch.full((1, 2), -1.0), torch.full((1, 2), -1.4), torch.tensor([[1, 0]])
            engine[0, 1] = -9.0
        _, metrics = rollout_correction(old, engine, mask, tis_cap=0.0)
        results["correction"] = reduce_metrics(metrics)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("exact")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return {rank: torch.load(out / f"rank{rank}.pt") for rank in (0, 1)}


def test_global_means_divide_summed_counts_once(results) -> None:
    for rank in (0, 1):
        assert results[rank]["global_means"]["actor/pg_clipfrac"] == pytest.approx(EXACT_CLIPFRAC, abs=1e-12)


def test_a_learners_clip_fraction_is_weighted_by_tokens_across_ranks(results) -> None:
    for rank in (0, 1):
        logged = results[rank]["learner"]
        assert logged["actor/pg_clipfrac"] == pytest.approx(EXACT_CLIPFRAC, abs=1e-12)
        assert logged["actor/pg_loss"] == pytest.approx(0.25, abs=1e-12), "already global: kept as it is"


def test_the_engine_mismatch_is_weighted_by_tokens_across_ranks(results) -> None:
    for rank in (0, 1):
        logged = results[rank]["correction"]
        assert logged["rollout/logprob_diff"] == pytest.approx(EXACT_LOGPROB_DIFF, abs=1e-6)
        assert logged["rollout/logprob_diff/max"] == pytest.approx(0.4, abs=1e-6)


def test_without_a_process_group_a_mean_is_this_ranks_own() -> None:
    assert not dist.is_initialized()
    assert global_means({"a": (3.0, 4.0), "b": (0.0, 0.0)}) == {"a": 0.75, "b": 0.0}


def test_memory_metrics_read_the_allocator_peak_and_the_device_then_reset(monkeypatch):
    """CUDA: the allocator's peak and the device's used memory in GiB, the peak reset for the next
    step; CPU: nothing. (The CUDA calls are the boundary: stood in for by their documented returns.)"""
    from spmd_rlhf.trainer.metrics import memory_metrics

    assert memory_metrics(torch.device("cpu")) == {}
    resets = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: resets.append(device))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 * 2**30, 80 * 2**30))
    cuda = torch.device("cuda", 0)
    assert memory_metrics(cuda) == {"memory/torch_peak_gib/max": 3.0, "memory/device_used_gib/max": 20.0}
    assert resets == [cuda]
    assert all(key.endswith("/max") for key in memory_metrics(cuda))  # reduced by max across ranks
