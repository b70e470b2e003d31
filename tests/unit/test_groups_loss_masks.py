"""Multi-turn loss masks survive group picking, concatenation (dynamic sampling) and the replay buffer."""

from __future__ import annotations

import torch

from spmd_rlhf.data.datasets import PromptExample
from spmd_rlhf.rollout.base import Samples
from spmd_rlhf.rollout.groups import Rollout, concat
from spmd_rlhf.trainer.replay import GroupReplayBuffer


def _rollout(tag: int, masked: bool) -> Rollout:
    """Two groups of two samples; sample (g, j) has tokens [tag, g, j]; masked: the middle token is
    a tool's (mask 0), as multi-turn rollouts give."""
    examples = [PromptExample(prompt_ids=[1, 2], data_source="arithmetic", ground_truth=str(g), extra_info={},
                              index=g) for g in range(2) for _ in range(2)]
    tokens = [[tag, g, j] for g in range(2) for j in range(2)]
    masks = [[1, 0, 1] for _ in tokens] if masked else None
    samples = Samples(tokens, [[-0.5, 0.0, -0.5] for _ in tokens], ["stop"] * 4, masks)
    return Rollout(examples, samples, 2, torch.tensor([0.0, 1.0, 1.0, 0.0]))


def test_groups_keep_each_samples_mask() -> None:
    rollout = _rollout(7, masked=True)
    rollout.samples.loss_masks[3] = [1, 1, 0]  # group 1, sample 1: a different mask, so the order shows
    picked = rollout.groups([1])
    assert picked.samples.loss_masks == [[1, 0, 1], [1, 1, 0]]
    assert _rollout(7, masked=False).groups([1]).samples.loss_masks is None


def test_concat_fills_unmasked_parts_with_ones_and_the_batch_masks_tool_tokens() -> None:
    both = concat([_rollout(7, masked=True).groups([0]), _rollout(8, masked=False).groups([1])])
    assert both.samples.loss_masks == [[1, 0, 1]] * 2 + [[1, 1, 1]] * 2
    assert concat([_rollout(7, False), _rollout(8, False)]).samples.loss_masks is None
    # prompt [1, 2] + 3 response tokens: loss columns 1..3 predict the response, the tool token (column 2) not
    batch = both.batch(pad_id=0)
    assert batch.loss_mask_BT.tolist() == [[0, 1, 0, 1]] * 2 + [[0, 1, 1, 1]] * 2


def test_replay_keeps_masks_through_mix_and_its_state() -> None:
    buffer = GroupReplayBuffer(capacity=4, min_reward=1.0, seed=0)
    assert buffer.add(_rollout(7, masked=True)) == 2
    restored = GroupReplayBuffer(capacity=4, min_reward=1.0, seed=5)
    restored.load_state_dict(buffer.state_dict())
    for buf in (buffer, restored):
        mixed, replaced = buf.mix(_rollout(9, masked=False), 0.5, filtered=[0])
        assert replaced == 1
        assert [t[0] for t in mixed.samples.token_ids] == [7, 7, 9, 9], "the filtered group 0 is replaced"
        assert mixed.samples.loss_masks == [[1, 0, 1]] * 2 + [[1, 1, 1]] * 2


def test_split_placement_messages_carry_masks() -> None:
    from spmd_rlhf.rollout.messages import assemble, split_groups

    sent = _rollout(7, masked=True).samples
    sent.loss_masks[2] = [1, 1, 0]  # group 1's first sample
    groups = split_groups(sent, 2, first=4)
    examples = {4: _rollout(7, True).examples[0], 5: _rollout(7, True).examples[2]}
    rollout, greedy = assemble([5, 4], groups, examples, 2)
    assert greedy is None and [t[1] for t in rollout.samples.token_ids] == [1, 1, 0, 0]
    assert rollout.samples.loss_masks == [[1, 1, 0], [1, 0, 1], [1, 0, 1], [1, 0, 1]]
    # a single-turn group (no masks), and one kept in a checkpoint written before masks were sent (4 fields)
    plain = split_groups(_rollout(8, masked=False).samples, 2, first=0)
    assert assemble([0, 1], plain, {0: examples[4], 1: examples[5]}, 2)[0].samples.loss_masks is None
    mixed = {0: plain[0][:4], 5: groups[5]}
    assert assemble([0, 5], mixed, {0: examples[4], 5: examples[5]}, 2)[0].samples.loss_masks == \
        [[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 1]]
