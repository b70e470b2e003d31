"""``tools/export_hf.py``: a checkpoint becomes a HF directory that transformers loads as it was saved."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spmd_rlhf.tasks.arithmetic import build_tokenizer, tiny_model_config
from spmd_rlhf.trainer.checkpoint import CheckpointError, CheckpointManager, ModelOptimizerState, RNGState
from tests.launch import REPO_ROOT, child_env

TOOL = REPO_ROOT / "tools" / "export_hf.py"
PROMPTS = ["07+48=", "99+01=055"]


def load_tool():
    spec = importlib.util.spec_from_file_location("export_hf", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A trained-looking tiny Qwen2 (tied embeddings) with its optimizer, saved with config and tokenizer."""
    tokenizer = build_tokenizer()
    config = tiny_model_config(len(tokenizer), 64, 2, 2, tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert config.tie_word_embeddings
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)  # away from the init, biases included
    optimizer = torch.optim.AdamW(model.parameters())
    directory = tmp_path_factory.mktemp("ckpt")
    path = CheckpointManager(directory, keep_last=1).save(
        3, {"actor": ModelOptimizerState(model, optimizer), "rng": RNGState()}, hf_config=config, tokenizer=tokenizer)
    return path, model, tokenizer


def logits(model, tokenizer, texts):
    ids = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits


def test_cli_export_loads_with_identical_logits_and_tokenizer(checkpoint, tmp_path):
    path, original, tokenizer = checkpoint
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(TOOL), path, str(out)], env=child_env(), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    exported, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # lm_head comes from the tie
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    loaded_tokenizer = AutoTokenizer.from_pretrained(out)
    for text in PROMPTS:
        assert loaded_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert loaded_tokenizer.decode(tokenizer("12+34=046").input_ids) == "12+34=046"
    assert (loaded_tokenizer.pad_token, loaded_tokenizer.eos_token) == ("<pad>", "<eos>")
    torch.testing.assert_close(logits(exported.eval(), loaded_tokenizer, PROMPTS), logits(original, tokenizer, PROMPTS),
                               rtol=0, atol=0)


def test_export_in_bfloat16(checkpoint, tmp_path):
    path, original, _ = checkpoint
    load_tool().export_hf(path, str(tmp_path / "bf16"), dtype=torch.bfloat16)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert exported.dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    torch.testing.assert_close(exported.model.norm.weight, original.model.norm.weight.to(torch.bfloat16), rtol=0, atol=0)


def test_export_takes_a_checkpoint_directory(checkpoint, tmp_path):
    path, original, _ = checkpoint
    load_tool().export_hf(os.path.dirname(path), str(tmp_path / "hf"))  # the step `latest` names
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(exported.state_dict(), original.state_dict(), rtol=0, atol=0)


def test_export_without_hf_config_names_the_missing_file(tmp_path):
    model = torch.nn.Linear(2, 2)
    path = CheckpointManager(tmp_path / "ckpt", keep_last=1).save(1, {"actor": ModelOptimizerState(model)})
    with pytest.raises(CheckpointError, match=r"hf/config\.json is missing"):
        load_tool().export_hf(path, str(tmp_path / "out"))
    proc = subprocess.run([sys.executable, str(TOOL), path, str(tmp_path / "out")], env=child_env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "hf/config.json is missing" in proc.stderr and "Traceback" not in proc.stderr


def test_export_of_a_missing_component(checkpoint, tmp_path):
    path, _, _ = checkpoint
    with pytest.raises(CheckpointError, match="no component 'critic'"):
        load_tool().export_hf(path, str(tmp_path / "out"), component="critic")


def test_export_takes_the_latest_file(checkpoint, tmp_path):
    path, original, _ = checkpoint
    latest = os.path.join(os.path.dirname(path), "latest")
    assert os.path.isfile(latest)
    proc = subprocess.run([sys.executable, str(TOOL), latest, str(tmp_path / "hf")], env=child_env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(exported.state_dict(), original.state_dict(), rtol=0, atol=0)


def test_export_writes_the_model_dtype_with_the_cache_on(tmp_path):
    """A bf16 model trained in fp32 masters (its config still names bf16, the cache off for training)
    exports in bf16, ready to generate."""
    tokenizer = build_tokenizer()
    config = tiny_model_config(len(tokenizer), 64, 2, 2, tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.dtype, model.config.use_cache = torch.bfloat16, False
    path = CheckpointManager(tmp_path / "ckpt", keep_last=1).save(
        1, {"actor": ModelOptimizerState(model, torch.optim.AdamW(model.parameters()))}, hf_config=model.config,
        tokenizer=tokenizer)
    load_tool().export_hf(path, str(tmp_path / "hf"))
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["dtype"] == "bfloat16" and saved["use_cache"] is True
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert exported.dtype == torch.bfloat16
    torch.testing.assert_close(exported.model.layers[0].mlp.up_proj.weight,
                               model.model.layers[0].mlp.up_proj.weight.to(torch.bfloat16), rtol=0, atol=0)
    load_tool().export_hf(path, str(tmp_path / "fp32"), dtype=torch.float32)  # asked for: fp32
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype="auto").dtype == torch.float32


def test_a_latest_file_naming_a_missing_step(checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("step_00000099")
    with pytest.raises(CheckpointError, match="step_00000099, which is not a complete step folder"):
        load_tool().export_hf(str(ckpt / "latest"), str(tmp_path / "out"))


def test_a_vision_language_checkpoint_exports_with_its_image_processor(tmp_path):
    """A Qwen2.5-VL actor (saved with ``model_dir``: its image processor rides along in ``hf/``)
    exports as the VL class; the export reads an image through its placeholders to the same logits."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO_ROOT / "tools" / "make_tiny_model.py")
    make_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tiny)
    source = make_tiny.make_tiny_model("qwen2_5_vl", str(tmp_path / "vl"), seed=2)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)  # tied: moves the embeddings too, away from the saved directory
    tokenizer = AutoTokenizer.from_pretrained(source)
    path = CheckpointManager(tmp_path / "ckpt", keep_last=1).save(
        2, {"actor": ModelOptimizerState(model, torch.optim.AdamW(model.parameters()))}, hf_config=model.config,
        tokenizer=tokenizer, model_dir=source)
    load_tool().export_hf(path, str(tmp_path / "hf"))
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(exported).__name__ == "Qwen2_5_VLForConditionalGeneration"
    pixels = AutoImageProcessor.from_pretrained(tmp_path / "hf")(images=[Image.new("RGB", (56, 56), (9, 200, 40))],
                                                                   return_tensors="pt")
    ids = tokenizer("<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>1+2=", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(input_ids=ids, **pixels).logits
        got = exported(input_ids=ids, **pixels).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
