"""``tools/make_tiny_model.py``: each family's directory loads offline with plain transformers, holds
the weights it was made with, and generates the embedded task's tokens."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.launch import REPO_ROOT

_spec = importlib.util.spec_from_file_location("make_tiny_model", REPO_ROOT / "tools" / "make_tiny_model.py")
make_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tiny)


@pytest.mark.parametrize("family, model_type", [("qwen2", "qwen2"), ("qwen3_moe", "qwen3_moe")])
def test_directory_loads_offline_and_generates(tmp_path, monkeypatch, family, model_type):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    out = make_tiny.make_tiny_model(family, str(tmp_path / family), seed=3)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.model_type == model_type
    assert model.config.vocab_size == len(tokenizer) == 15
    assert sum(p.numel() for p in model.parameters()) < 500_000

    torch.manual_seed(3)  # the same seed builds the same model: the directory holds exactly its weights
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    make_tiny.spread_router(fresh)
    loaded = dict(model.named_parameters())
    for name, param in fresh.named_parameters():
        assert torch.equal(loaded[name], param), name

    ids = tokenizer("07+48=", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "07+48="
    out_ids = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=None)
    assert out_ids.shape == (1, ids.shape[1] + 4)
    with torch.no_grad():  # greedy decoding is the argmax of a plain forward
        logits = model(input_ids=out_ids[:, :-1]).logits[0, ids.shape[1] - 1 :]
    assert torch.equal(logits.argmax(-1), out_ids[0, ids.shape[1] :])


def test_moe_routes_tokens_to_different_experts(tmp_path):
    """Spread routers: the embedded task's tokens do not all pick the same top-2 experts."""
    out = make_tiny.make_tiny_model("qwen3_moe", str(tmp_path / "moe"))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        router_logits = model(input_ids=torch.arange(3, 15)[None], output_router_logits=True).router_logits
    assert len(router_logits) == 2
    for logits_TE in router_logits:
        chosen = {tuple(sorted(row)) for row in logits_TE.topk(2, dim=-1).indices.tolist()}
        assert len(chosen) >= 3, chosen


def test_unknown_family_names_the_choices(tmp_path):
    with pytest.raises(SystemExit, match="qwen2, qwen3_moe"):
        make_tiny.make_tiny_model("gpt2", str(tmp_path / "x"))
