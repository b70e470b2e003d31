"""``tools/train_reward_model.py``: a tiny reward model that prefers correct sums, loadable by the trainer.

The tool trains once (default settings, about 15 s on one core). Its held-out accuracy on
carry-dropped answers must clear a bound that an untrained model of the same shape does not; the
saved directory passes ``check_model_dir`` with the policy's tokenizer, and ``load_reward_model``
+ ``RewardModel.score`` (a world of one, in this process) rank held-out correct answers above
carry-dropped ones and agree with plain HF.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from spmd_rlhf.data.batch import collate
from spmd_rlhf.models.heads import check_model_dir, load_reward_model
from spmd_rlhf.rewards.model import RewardModel
from spmd_rlhf.tasks.arithmetic import AdditionTask, add_without_carry, build_tokenizer
from tests.launch import REPO_ROOT, world_of_one

TOOL = REPO_ROOT / "tools" / "train_reward_model.py"
MIN_ACCURACY = 0.9  # seed 0 reaches 0.98; an untrained model scores about 0.5 (checked below)


def load_tool():
    spec = importlib.util.spec_from_file_location("train_reward_model", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return load_tool()


@pytest.fixture(scope="module")
def trained(tool, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward_model") / "rm"
    return out, tool.train_reward_model(str(out), seed=0)


@pytest.fixture(scope="module")
def topology():
    """A 1-rank gloo world in this process, torn down (and the environment restored) after."""
    with world_of_one() as topo:
        yield topo


def test_heldout_accuracy_clears_the_bound_an_untrained_model_does_not(tool, trained):
    _, result = trained
    assert result["heldout_pairwise_accuracy"] == result["heldout_accuracy/carry"] >= MIN_ACCURACY
    assert result["heldout_pairs/carry"] > 100 and result["heldout_pairs/small"] > 100
    assert result["train_loss_last"] < 0.2 * result["train_loss_first"]
    task, tokenizer = AdditionTask(seed=0), build_tokenizer()
    rows = [("carry", a, b) for a, b in tool.eligible("carry", task.split()[1])]
    untrained = tool._new_model(tokenizer, 0, 64, 2, 2)
    assert tool.pairwise_accuracy(untrained, tool.pair_tensors(rows, task, tokenizer, random.Random(1))) < 0.75


def test_directory_is_a_reward_model_for_the_policy_tokenizer(trained):
    out, _ = trained
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    config = check_model_dir(str(out), "reward.model.path", build_tokenizer())
    assert config.num_labels == 1
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == build_tokenizer().pad_token_id


def test_trainer_scores_rank_heldout_correct_answers_first(trained, topology):
    out, _ = trained
    task, tokenizer = AdditionTask(seed=0), build_tokenizer()
    problems = [(a, b) for a, b in task.split()[1] if add_without_carry(a, b) != a + b]

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompts = [encode(task.prompt(a, b)) for a, b in problems]
    chosen = [encode(task.answer(a + b)) + [tokenizer.eos_token_id] for a, b in problems]
    rejected = [encode(task.answer(add_without_carry(a, b))) + [tokenizer.eos_token_id] for a, b in problems]
    scorer = RewardModel(load_reward_model(str(out), topology), topology.device, micro_batch_size=64)
    pad = tokenizer.pad_token_id
    chosen_B, rejected_B = (scorer.score(collate(prompts, answers, pad)) for answers in (chosen, rejected))
    assert float((chosen_B > rejected_B).float().mean()) >= MIN_ACCURACY
    plain = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want_B = plain(input_ids=torch.tensor([p + c for p, c in zip(prompts, chosen)])).logits[:, 0]
    torch.testing.assert_close(chosen_B, want_B, rtol=1e-5, atol=1e-5)


def test_cli_writes_a_directory_and_prints_json(tool, tmp_path, capsys):
    tool.main([str(tmp_path / "cli"), "--steps", "3", "--hidden-size", "32", "--negatives", "carry,small"])
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 3 and 0.0 <= result["heldout_pairwise_accuracy"] <= 1.0
    assert (tmp_path / "cli" / "model.safetensors").is_file()


@pytest.mark.parametrize("kwargs, message", [({"negatives": ("typo",)}, "--negatives typo"),
                                             ({"steps": 0}, "--steps 0")])
def test_bad_arguments(tool, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tool.train_reward_model(str(tmp_path / "x"), **kwargs)
