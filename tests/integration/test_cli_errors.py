"""User mistakes on the real command line: ``python -m spmd_rlhf.train`` (a world of one) and
``torchrun`` with two ranks exit non-zero, quickly, naming the key, without a traceback."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import child_env, torchrun

CLI_TIMEOUT = 180  # seconds; imports alone take several on a loaded machine
PREFIX = "spmd_rlhf: configuration error:"
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def train_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spmd_rlhf.train", f"hydra.run.dir={tmp_path / 'run'}", *overrides],
        env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=CLI_TIMEOUT,
    )


def assert_config_error(proc: subprocess.CompletedProcess, key: str) -> None:
    output = f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, output
    assert PREFIX in proc.stderr and key in proc.stderr, output
    assert "Traceback" not in proc.stderr, output


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 model and a character tokenizer with a chat template, saved like a HF download."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 +=?<>\n"
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_hf")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_negative_batch_size(tmp_path: Path) -> None:
    proc = train_cli(tmp_path, "trainer.batch_size=-4")
    assert_config_error(proc, "trainer.batch_size")


def test_missing_model_dir(tmp_path: Path) -> None:
    proc = train_cli(tmp_path, f"model.path={tmp_path / 'nope'}")
    assert_config_error(proc, "model.path")


def test_empty_dataset(tmp_path: Path, tiny_hf_dir: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = train_cli(tmp_path, f"model.path={tiny_hf_dir}", f"data.train_files=[{empty}]", "trainer.sft.steps=0")
    assert_config_error(proc, "data.train_files")
    assert "no usable rows" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_engine_without_vllm(tmp_path: Path) -> None:
    proc = train_cli(tmp_path, "rollout.engine=vllm")
    assert_config_error(proc, "rollout.engine")
    assert "pip install -e .[vllm]" in proc.stderr and "rollout.engine=torch" in proc.stderr


def test_unknown_algorithm_option(tmp_path: Path) -> None:
    proc = train_cli(tmp_path, "algorithm=nonexistent")
    assert proc.returncode != 0, proc.stderr
    assert "algorithm" in proc.stderr and "nonexistent" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_truncated_safetensors_names_the_file(tmp_path: Path, tiny_hf_dir: Path) -> None:
    import shutil

    broken = tmp_path / "broken_model"
    shutil.copytree(tiny_hf_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])  # an interrupted download
    proc = train_cli(tmp_path, f"model.path={broken}", "trainer.sft.steps=0")
    assert_config_error(proc, "model.path")
    assert str(weights) in proc.stderr and "truncated" in proc.stderr


def test_unknown_key_added_with_plus_is_refused(tmp_path: Path) -> None:
    proc = train_cli(tmp_path, "+trainer.total_step=5")
    assert_config_error(proc, "trainer.total_step")
    assert "did you mean trainer.total_steps?" in proc.stderr


def test_prompt_and_response_beyond_the_model_positions(tmp_path: Path, tiny_hf_dir: Path) -> None:
    # the tiny model has 128 positions
    proc = train_cli(tmp_path, f"model.path={tiny_hf_dir}", "trainer.sft.steps=0", "data.max_prompt_length=100",
                     "rollout.max_new_tokens=64")
    assert_config_error(proc, "data.max_prompt_length")
    assert "rollout.max_new_tokens=64" in proc.stderr and "max_position_embeddings=128" in proc.stderr


def test_raw_gsm8k_as_training_data(tmp_path: Path, tiny_hf_dir: Path) -> None:
    raw = tmp_path / "train.jsonl"
    raw.write_text('{"question": "1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n' * 4)
    proc = train_cli(tmp_path, f"model.path={tiny_hf_dir}", f"data.train_files=[{raw}]", "trainer.sft.steps=0")
    assert_config_error(proc, "data.train_files")
    assert "tools/prepare_gsm8k.py" in proc.stderr
    assert sum(PREFIX in line for line in proc.stderr.splitlines()) == 1


COLLECTIVE_TIMEOUT_S = 600  # distributed.timeout_s's default


def _torchrun_config_error(tmp_path: Path, key: str, *overrides: str) -> None:
    start = time.monotonic()
    proc = torchrun(["-m", "spmd_rlhf.train", f"hydra.run.dir={tmp_path / 'run'}", *overrides], nproc=2,
                    timeout=400, cwd=tmp_path, check=False)  # under pytest's own 600 s
    elapsed = time.monotonic() - start
    output = f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    assert proc.returncode != 0, output
    # a rank left waiting in a collective would take the whole timeout; startup on a busy machine
    # may take a minute or more, so the bound is half the timeout rather than a fixed wall time
    assert elapsed < COLLECTIVE_TIMEOUT_S / 2, f"took {elapsed:.0f}s\n{output}"
    # Rank 0 prints the message once and exits 2; the other rank exits non-zero too, or is ended
    # by torchrun first. The only traceback is torchrun's own report, none from a rank.
    assert "exitcode  : 2" in proc.stderr, output
    messages = [line for line in proc.stderr.splitlines() if PREFIX in line]
    assert len(messages) == 1 and key in messages[0], output
    assert "spmd_rlhf/train.py" not in proc.stderr and "spmd_rlhf/config/" not in proc.stderr, output


@pytest.mark.slow
def test_torchrun_tp_not_dividing_world(tmp_path: Path) -> None:
    _torchrun_config_error(tmp_path, "distributed.tp", "distributed.tp=3")


@pytest.mark.slow
def test_torchrun_batch_not_divisible_by_world(tmp_path: Path) -> None:
    _torchrun_config_error(tmp_path, "trainer.batch_size", "trainer.batch_size=3", "trainer.mini_batch_size=3")
