"""``recipe=tiny_qwen2_5_vl`` end to end under torchrun (2 gloo ranks, a few seconds): the built-in shapes
task's images go through the TorchEngine's prefill and the actor's forward on the directory of
``tools/make_tiny_model.py qwen2_5_vl``; GRPO steps complete, rewards and held-out metrics are logged,
the engine gets every update, and ``rollout/logprob_diff`` is float noise; also with LoRA
(``model.lora.rank=8``: merged weights to the engine, adapter-only checkpoints, merged export)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.launch import REPO_ROOT, child_env, torchrun

pytestmark = pytest.mark.slow


# colocated (both ranks train and generate), and split (one training rank, one generation rank: the
# generation rank's engine reads the images of its own copy of the prompts)
PLACEMENTS = {"colocate": [], "split": ["distributed.placement=split", "distributed.generation_ranks=1"]}


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_recipe_runs_with_images_and_logs_logprob_diff(tmp_path, placement):
    _run_and_check(tmp_path, PLACEMENTS[placement])


def test_lora_recipe_syncs_merged_weights_and_saves_adapters_that_export_as_the_vl_model(tmp_path):
    """model.lora.rank=8, colocated: adapters on the language model only, the TorchEngine gets the
    merged weights (logprob_diff stays float noise), the checkpoint holds the adapters alone, and
    ``export_hf.py --merged`` writes a directory that loads as the VL class with W + s B A."""
    from transformers import AutoModelForImageTextToText

    from spmd_rlhf.trainer.checkpoint import load_model_weights

    run_dir = _run_and_check(tmp_path, ["model.lora.rank=8"])
    steps = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "reward/mean" in r]
    # the reference is the actor with its adapters disabled: the KL to it starts at 0 and grows
    assert steps[0]["actor/kl_loss"] < 1e-9 < steps[-1]["actor/kl_loss"], [r["actor/kl_loss"] for r in steps]
    step = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    saved = load_model_weights(str(step))
    assert saved and all(".lora_A." in n or ".lora_B." in n for n in saved), sorted(saved)[:4]
    assert not any(".visual." in n for n in saved) and any(".language_model." in n for n in saved)
    assert any(n.endswith(".lora_B.default.weight") and t.abs().max() > 0 for n, t in saved.items()), "B moved"
    merged = tmp_path / "merged"
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "export_hf.py"), str(step), str(merged), "--merged"],
                   env=child_env(), check=True, capture_output=True, timeout=180)
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "outputs" / "tiny_qwen2_5_vl", dtype=torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32)
    assert type(model) is type(base)
    base_params, params = dict(base.named_parameters()), dict(model.named_parameters())
    assert list(params) == list(base_params)
    prefix = "base_model.model."
    for name in (n for n in saved if ".lora_A." in n):
        module = name.removeprefix(prefix).split(".lora_A.")[0]
        b = saved[name.replace(".lora_A.", ".lora_B.")]
        want = base_params[f"{module}.weight"] + (16.0 / 8) * b @ saved[name]  # model.lora.alpha=16 (default)
        torch.testing.assert_close(params[f"{module}.weight"], want, rtol=1e-5, atol=1e-6, msg=module)
    adapted = {n.removeprefix(prefix).split(".lora_A.")[0] + ".weight" for n in saved}
    assert all(torch.equal(params[n], base_params[n]) for n in params if n not in adapted)


def _run_and_check(tmp_path, overrides: list[str]):
    """Three GRPO steps of the recipe on 2 ranks with ``overrides``; the common checks; the run dir."""
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_tiny_model.py"), "qwen2_5_vl",
                    str(tmp_path / "outputs" / "tiny_qwen2_5_vl")], env=child_env(), check=True, capture_output=True,
                   timeout=120)
    run_dir = tmp_path / "run"
    torchrun(["-m", "spmd_rlhf.train", "recipe=tiny_qwen2_5_vl", f"hydra.run.dir={run_dir}",
              "logging.progress_bar=false",
              "trainer.total_steps=3", "trainer.batch_size=16", "trainer.mini_batch_size=16", "rollout.n=4",
              "data.shapes.num_train=64", "data.shapes.num_val=16", *overrides], nproc=2, timeout=300,
             cwd=tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward/mean" in r]
    assert len(steps) == 3
    assert all(0.0 <= r["reward/mean"] <= 1.0 and r["rollout/response_length/max"] <= 2 for r in steps)
    # the TorchEngine holds the actor's own fp32 weights after every sync, and reads the same pixels and
    # M-RoPE positions as the actor's forward: the gap is float noise
    assert all(0 <= r["rollout/logprob_diff"] < 1e-5 for r in steps), [r["rollout/logprob_diff"] for r in steps]
    assert [r["rollout/weight_version"] for r in steps] == sorted({r["rollout/weight_version"] for r in steps})
    evals = [r for r in records if "eval/shapes/accuracy" in r]
    assert len(evals) == 2 and all(r["eval/examples"] == 16 for r in evals)  # before and after
    return run_dir
