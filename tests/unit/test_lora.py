"""LoRA through PEFT: the config's errors, which parameters train, the merged weights' names, and the
export of a LoRA checkpoint (PEFT adapter directory; merged HF model on request)."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from spmd_rlhf.config import Config, ConfigError, validate
from spmd_rlhf.config.schema import LoraConfig
from spmd_rlhf.models.lora import MergedWeights, add_lora, reference_mode
from spmd_rlhf.tasks.arithmetic import build_tokenizer, tiny_model_config
from spmd_rlhf.train import build_optimizer
from spmd_rlhf.trainer.checkpoint import CheckpointManager, ModelOptimizerState, load_model_weights

REPO_ROOT = Path(__file__).resolve().parents[2]


def lora_cfg(**fields) -> Config:
    cfg = Config()
    cfg.model.lora.rank = 8
    for key, value in fields.items():
        setattr(cfg.model.lora, key, value)
    return cfg


@pytest.mark.parametrize("fields, key, fix", [
    (dict(rank=-1), "model.lora.rank", ">= 0"),
    (dict(alpha=0.0), "model.lora.alpha", "> 0"),
    (dict(dropout=1.0), "model.lora.dropout", r"\[0, 1\)"),
    (dict(target_modules=[]), "model.lora.target_modules", "q_proj"),
    (dict(sync="bogus"), "model.lora.sync", "merged"),
    (dict(sync="adapter"), "model.lora.sync=adapter", "rollout.engine=vllm.*set model.lora.sync=merged"),
])
def test_lora_mistakes_name_key_and_fix(fields, key: str, fix: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        validate(lora_cfg(**fields), 1)
    assert re.search(fix, str(info.value)), str(info.value)


def test_split_placement_takes_merged_sync_and_refuses_adapter_sync() -> None:
    cfg = lora_cfg(sync="adapter")
    cfg.rollout.engine = "vllm"
    validate(cfg, 2)
    cfg.distributed.placement = "split"
    cfg.distributed.generation_ranks = 1
    with pytest.raises(ConfigError, match=r"model.lora.sync=adapter .*distributed.placement=split"):
        validate(cfg, 2)
    cfg.model.lora.sync = "merged"
    validate(cfg, 3)


def test_lora_refuses_a_critic_copied_from_the_actor() -> None:
    cfg = lora_cfg()
    cfg.algorithm.adv_estimator = "gae"
    with pytest.raises(ConfigError, match="critic.init_from"):
        validate(cfg, 1)


def test_lora_default_validates() -> None:
    validate(lora_cfg(), 1)
    assert Config().model.lora.rank == 0 and Config().model.lora.sync == "merged"


def tiny_peft(rank: int = 4) -> tuple[torch.nn.Module, torch.nn.Module]:
    tokenizer = build_tokenizer()
    config = tiny_model_config(len(tokenizer), 32, 2, 4, tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return base, add_lora(copy.deepcopy(base), LoraConfig(rank=rank, alpha=2.0 * rank))


def test_only_adapters_train_and_hold_optimizer_state() -> None:
    base, peft = tiny_peft()
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert {n.split(".")[-4] for n in trainable} == set(targets)  # the default: attention and MLP projections
    optimizer, _ = build_optimizer(peft, 1e-3, 0.0, (0.9, 0.999), 0, 10, 0.0)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for n, p in peft.named_parameters() if p.requires_grad}
    frozen = sum(p.numel() for p in peft.parameters() if not p.requires_grad)
    assert frozen == sum(p.numel() for p in base.parameters())


def test_adapters_start_as_the_base_model_and_disable_to_it() -> None:
    base, peft = tiny_peft()
    ids = torch.randint(3, 12, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = base(input_ids=ids).logits
        assert torch.allclose(peft(input_ids=ids).logits, want, atol=1e-6)  # B = 0 at init
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
        assert (peft(input_ids=ids).logits - want).abs().max() > 1e-3
        with reference_mode(peft):
            assert torch.allclose(peft(input_ids=ids).logits, want, atol=1e-6)


def test_merged_weights_are_peft_merge_under_base_names() -> None:
    base, peft = tiny_peft()
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    got = dict(MergedWeights(peft).full_tensors())
    want = dict(copy.deepcopy(peft).merge_and_unload().named_parameters())
    assert list(got) == list(want) == [n for n, _ in base.named_parameters()]
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, atol=1e-6), name
    assert max(float((got[n] - p.detach()).abs().max()) for n, p in base.named_parameters()) > 1e-2


def load_export_tool():
    spec = importlib.util.spec_from_file_location("export_hf", REPO_ROOT / "tools" / "export_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_writes_peft_adapters_and_on_request_the_merged_model(tmp_path) -> None:
    base, peft = tiny_peft()
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    optimizer, _ = build_optimizer(peft, 1e-3, 0.0, (0.9, 0.999), 0, 10, 0.0)
    path = CheckpointManager(tmp_path / "ckpt", keep_last=1).save(
        1, {"actor": ModelOptimizerState(peft, optimizer)}, hf_config=peft.get_base_model().config,
        tokenizer=build_tokenizer())
    tool = load_export_tool()
    tool.export_hf(path, str(tmp_path / "adapter"))
    tool.export_hf(path, str(tmp_path / "merged"), merged=True)
    ids = torch.randint(3, 12, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = peft(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
        assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-5)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-5)
        assert (base(input_ids=ids).logits - want).abs().max() > 1e-2
    assert not (tmp_path / "adapter" / "config.json").exists()
    assert "spmd_rlhf_lora" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_a_base_read_from_a_directory_is_not_checkpointed_and_export_reads_it_again(tmp_path) -> None:
    """The checkpoint of a LoRA actor whose base came from a directory (model.path) holds the
    adapters and their AdamW state only; it loads back exactly, and both exports read the base again."""
    base, _ = tiny_peft()
    base.save_pretrained(tmp_path / "base")
    build_tokenizer().save_pretrained(tmp_path / "base")

    def actor():
        torch.manual_seed(1)
        model = add_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(rank=4, alpha=8.0))
        return model, build_optimizer(model, 1e-2, 0.0, (0.9, 0.999), 0, 10, 0.0)[0]

    peft, optimizer = actor()
    ids = torch.randint(3, 12, (2, 6), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # the adapters move and AdamW holds state
        peft(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = CheckpointManager(tmp_path / "ckpt", keep_last=1).save(
        1, {"actor": ModelOptimizerState(peft, optimizer)}, hf_config=peft.get_base_model().config,
        tokenizer=build_tokenizer())
    saved = load_model_weights(path)
    assert saved and all(".lora_A." in n or ".lora_B." in n for n in saved), sorted(saved)[:4]
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in peft.parameters() if p.requires_grad)

    resumed, resumed_opt = actor()  # other adapters (seed 1 again, but no steps): the load must replace them
    CheckpointManager(tmp_path / "ckpt", keep_last=1).load(path, {"actor": ModelOptimizerState(resumed, resumed_opt)})
    for (name, p), (_, q) in zip(peft.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    want_state = optimizer.state_dict()["state"]
    got_state = resumed_opt.state_dict()["state"]
    assert all(torch.equal(want_state[i]["exp_avg"], got_state[i]["exp_avg"]) for i in want_state)

    tool = load_export_tool()
    tool.export_hf(path, str(tmp_path / "adapter"))
    tool.export_hf(path, str(tmp_path / "merged"), merged=True)
    with torch.no_grad():
        want = peft(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                           tmp_path / "adapter")
        assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-5)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-5)
        assert (base(input_ids=ids).logits - want).abs().max() > 1e-3
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
