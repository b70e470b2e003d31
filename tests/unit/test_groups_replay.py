"""Group operations of a rank's rollout, the replay buffer and the KL guard."""

from __future__ import annotations

import torch

from spmd_rlhf.config import AlgorithmConfig
from spmd_rlhf.data.datasets import PromptExample
from spmd_rlhf.rollout.base import Samples
from spmd_rlhf.trainer.groups import Rollout, concat
from spmd_rlhf.trainer.kl_control import KLControl
from spmd_rlhf.trainer.replay import GroupReplayBuffer


def _example(i: int) -> PromptExample:
    return PromptExample(prompt_ids=[1, 2 + i], data_source="arithmetic", ground_truth=str(i), extra_info={})


def _rollout(rewards: list[list[float]], tag: int = 0) -> Rollout:
    """Group g, sample j: tokens [100*tag + 10*g + j], reward rewards[g][j]."""
    n = len(rewards[0])
    examples = [_example(g) for g in range(len(rewards)) for _ in range(n)]
    tokens = [[100 * tag + 10 * g + j] for g in range(len(rewards)) for j in range(n)]
    samples = Samples(tokens, [[-0.5] for _ in tokens], ["stop"] * len(tokens))
    return Rollout(examples, samples, n, torch.tensor([float(r) for row in rewards for r in row]))


def test_groups_keep_samples_together_in_order() -> None:
    rollout = _rollout([[0, 1], [1, 1], [0, 0]])
    picked = rollout.groups([2, 0])
    assert picked.num_groups == 2 and picked.n == 2
    assert picked.samples.token_ids == [[20], [21], [0], [1]]
    assert picked.rewards.tolist() == [0, 0, 0, 1]
    assert [e.ground_truth for e in picked.examples] == ["2", "2", "0", "0"]


def test_concat_and_batch_layout() -> None:
    both = concat([_rollout([[0, 1]]), _rollout([[1, 1]], tag=1)])
    assert both.num_groups == 2 and both.rewards.tolist() == [0, 1, 1, 1]
    batch = both.batch(pad_id=0)
    # prompt [1, 2] + one response token: the loss column is 1 (predicts token 2)
    assert batch.loss_mask_BT.tolist() == [[0.0, 1.0]] * 4
    assert batch.input_ids_BT[:, 2].tolist() == [0, 1, 100, 101]


def test_replay_keeps_informative_successful_groups_and_replaces_filtered_first() -> None:
    buffer = GroupReplayBuffer(capacity=2, min_reward=1.0, seed=0)
    # group 0 mixed (kept), group 1 all solved (std 0: not kept), group 2 mixed but best 0.5 (< 1: not kept)
    assert buffer.add(_rollout([[0, 1], [1, 1], [0, 0.5]], tag=1)) == 1
    assert buffer.add(_rollout([[1, 0], [0, 1], [0, 0]], tag=2)) == 2
    assert len(buffer) == 2  # capacity 2: the oldest group went
    fresh = _rollout([[0, 0], [0, 1], [1, 1], [0, 1]], tag=3)
    mixed, replaced = buffer.mix(fresh, fraction=0.5, filtered=[0, 2])
    assert replaced == 2
    # the two filtered groups (0 and 2) were swapped for buffered ones (tag 2), the others kept
    assert [t[0] // 100 for t in mixed.samples.token_ids] == [2, 2, 3, 3, 2, 2, 3, 3]
    assert mixed.samples.token_ids[2:4] == fresh.samples.token_ids[2:4]
    assert mixed.samples.token_ids[6:8] == fresh.samples.token_ids[6:8]


def test_replay_state_round_trip(tmp_path) -> None:
    buffer = GroupReplayBuffer(capacity=4, min_reward=1.0, seed=3)
    buffer.add(_rollout([[0, 1], [1, 0]]))
    other = GroupReplayBuffer(capacity=4, min_reward=1.0, seed=99)
    path = tmp_path / "replay.pt"
    torch.save(buffer.state_dict(), path)
    other.load_state_dict(torch.load(path, weights_only=True))  # plain values: loads like a checkpoint's rank file
    fresh = _rollout([[0, 0], [0, 0]], tag=5)
    a, _ = buffer.mix(fresh, 1.0, [])
    b, _ = other.mix(fresh, 1.0, [])
    assert a.samples.token_ids == b.samples.token_ids


class _Scheduler:
    def __init__(self):
        self.base_lrs = [1.0]
        self.optimizer = type("Opt", (), {"param_groups": [{"lr": 0.5}]})()


def test_kl_guard_skips_and_decays_lr() -> None:
    algo = AlgorithmConfig()
    algo.kl_guard.max_kl, algo.kl_guard.lr_decay = 0.1, 0.5
    control = KLControl(algo)
    scheduler = _Scheduler()
    assert not control.guard(0.05, [scheduler])
    assert control.guard(0.2, [scheduler]) and control.guard(0.3, [scheduler])
    assert control.guard_skips == 2 and control.lr_scale == 0.25
    assert scheduler.base_lrs == [0.25] and scheduler.optimizer.param_groups[0]["lr"] == 0.125


def test_measured_kl_is_mean_k3_over_valid_tokens() -> None:
    control = KLControl(AlgorithmConfig())
    old = torch.tensor([[0.0, -1.0, 5.0]])
    ref = torch.tensor([[0.0, -2.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # token 0: log r = 0 -> k3 0; token 1: log r = ref - old = -1 -> e^-1 + 1 - 1 = 0.367879...
    expected = (0.0 + 0.36787944) / 2
    assert abs(control.measured_kl(old, ref, mask) - expected) < 1e-6
