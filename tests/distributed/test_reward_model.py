"""The sharded reward model scores what a plain HF model scores, at the last attended token.

Two gloo ranks load random reward models with ``load_reward_model`` and score the fixed batch
(rows of unequal length, right-padded, half of the responses ending with EOS) in uneven
micro-batches. The reference is plain HF in this process: each row alone, unpadded, with no pad
id, so HF's own pooling takes the last token. One model pads with its own pad id, the other with
pad == EOS, where HF's pooling on the padded batch skips a final EOS: the test shows that it does
(so the comparison can fail) and that the trainer's scores do not.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from tests.distributed.workers.scalar_heads import fixed_batch, fixed_rows, save_random_reward_model
from tests.launch import REPO_ROOT, torchrun

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "reward_model_worker.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_models")
    paths = {"pad": root / "pad", "pad_is_eos": root / "pad_is_eos"}
    save_random_reward_model(str(paths["pad"]), pad_is_eos=False, seed=0)
    save_random_reward_model(str(paths["pad_is_eos"]), pad_is_eos=True, seed=1)
    return paths


@pytest.fixture(scope="module")
def two_ranks(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward_scores") / "scores.pt"
    torchrun([str(WORKER), str(out), *(f"{name}={path}" for name, path in dirs.items())], 2, timeout=120)
    result = torch.load(out)
    assert result["world"] == 2
    return result


def plain_hf(path) -> torch.nn.Module:
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    model.config.pad_token_id = None  # one unpadded row at a time: HF pools at its last token
    return model


@torch.no_grad()
def reference_scores(path) -> torch.Tensor:
    model = plain_hf(path)
    return torch.tensor([float(model(input_ids=torch.tensor([p + r])).logits[0, 0]) for p, r in zip(*fixed_rows())])


@pytest.mark.parametrize("name", ["pad", "pad_is_eos"])
def test_sharded_scores_equal_plain_hf(two_ranks, dirs, name):
    want = reference_scores(dirs[name])
    assert want.std() > 0.1, "scores differ between rows, or the comparison would prove little"
    torch.testing.assert_close(two_ranks[name], want, rtol=1e-5, atol=1e-5)
    assert two_ranks[f"{name}/resharded"], "scoring must leave every parameter sharded"


def test_bf16_scores_close_to_fp32(two_ranks, dirs):
    want = reference_scores(dirs["pad"])
    torch.testing.assert_close(two_ranks["pad/bf16"], want, rtol=0.05, atol=0.1)
    assert not torch.equal(two_ranks["pad/bf16"], two_ranks["pad"]), "bf16 was really used"


@torch.no_grad()
def test_hf_pooling_would_skip_the_final_eos_when_pad_is_eos(dirs):
    """The rule the trainer avoids: with pad == EOS HF scores the token before a final EOS."""
    model = AutoModelForSequenceClassification.from_pretrained(dirs["pad_is_eos"], dtype=torch.float32).eval()
    batch = fixed_batch(model.config.pad_token_id)
    hf_B = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits[:, 0]
    want = reference_scores(dirs["pad_is_eos"])
    ends_with_eos = torch.tensor([r[-1] == model.config.eos_token_id for r in fixed_rows()[1]])
    assert ends_with_eos.any() and (~ends_with_eos).any()
    assert ((hf_B - want).abs()[ends_with_eos] > 1e-3).all()
    torch.testing.assert_close(hf_B[~ends_with_eos], want[~ends_with_eos], rtol=1e-5, atol=1e-5)
