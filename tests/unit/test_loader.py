"""PromptLoader: every prompt once per epoch, the same mini-batches on any number of ranks."""

from spmd_rlhf.data.loader import PromptLoader


def _step(examples, world, mini, seed=3):
    loaders = [PromptLoader(examples, 8, r, world, seed, mini_batch=mini) for r in range(world)]
    return [loader.next() for loader in loaders], loaders


def test_each_mini_batch_holds_the_same_prompts_on_any_world_size():
    examples = list(range(40))
    one, _ = _step(examples, 1, 4)
    for world in (2, 4):
        parts, _ = _step(examples, world, 4)
        per_rank = 4 // world
        for k in range(2):  # the two mini-batches of the step
            joined = sorted(p for part in parts for p in part[k * per_rank : (k + 1) * per_rank])
            assert joined == sorted(one[0][k * 4 : (k + 1) * 4])


def test_epoch_covers_every_prompt_once_and_reshuffles():
    examples = list(range(16))
    loader = PromptLoader(examples, 8, 0, 1, seed=0)
    first_epoch = loader.next() + loader.next()
    assert sorted(first_epoch) == examples
    second_epoch = loader.next() + loader.next()
    assert sorted(second_epoch) == examples and second_epoch != first_epoch
    assert loader.state_dict()["epoch"] == 1


def test_resume_from_state_dict_continues_the_same_sequence():
    examples = list(range(24))
    a = PromptLoader(examples, 8, 1, 2, seed=5)
    a.next()
    state = a.state_dict()
    expected = [a.next() for _ in range(4)]
    b = PromptLoader(examples, 8, 1, 2, seed=5)
    b.load_state_dict(state)
    assert [b.next() for _ in range(4)] == expected
