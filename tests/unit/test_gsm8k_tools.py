"""recipe=gsm8k_tools and its CPU variant compose into valid configs, and tools/prepare_gsm8k_tools.py
gives prepared GSM8K rows a system message that describes the Python tool in the format the rollout
parses."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from spmd_rlhf.config import Config, ConfigError, validate
from spmd_rlhf.rollout.toolbox import PythonTool
from spmd_rlhf.rollout.tools import parse_tool_call
from tests.launch import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))
import prepare_gsm8k  # noqa: E402
import prepare_gsm8k_tools  # noqa: E402


@pytest.fixture(scope="module")
def compose():
    import spmd_rlhf.train  # noqa: F401  (registers the schema and the recipe group)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        yield lambda overrides: OmegaConf.to_object(hydra_compose(config_name="config", overrides=overrides))


@pytest.mark.parametrize("recipe", ["gsm8k_tools", "gsm8k_tools_cpu"])
def test_recipes_compose_to_a_valid_multi_turn_config(compose, recipe: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a checkout with the prepared files and a model directory
    (tmp_path / "data" / "gsm8k_tools").mkdir(parents=True)
    for split in ("train", "test"):
        (tmp_path / "data" / "gsm8k_tools" / f"{split}.parquet").write_bytes(b"")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    cfg = compose([f"recipe={recipe}", "model.path=model"])
    assert isinstance(cfg, Config)
    validate(cfg, 1)
    assert cfg.rollout.multi_turn.enable and cfg.rollout.multi_turn.tools == ["python"]
    assert cfg.data.train_files == ["data/gsm8k_tools/train.parquet"]
    assert cfg.data.val_files == ["data/gsm8k_tools/test.parquet"] and cfg.trainer.sft.steps == 0
    assert cfg.reward.custom_function is None  # GSM8K's rule by the rows' data source
    assert cfg.rollout.engine == ("vllm" if recipe == "gsm8k_tools" else "torch")


def test_gpu_recipe_needs_a_model_path(compose) -> None:
    with pytest.raises(ConfigError, match=r"model\.path"):
        validate(compose(["recipe=gsm8k_tools"]), 1)


def test_prepared_rows_describe_the_tool(tmp_path: Path) -> None:
    source = tmp_path / "gsm8k.jsonl"
    source.write_text("".join(json.dumps({"question": f"What is {i} + 2?", "answer": f"{i}+2 = {i + 2}\n#### {i + 2}"})
                              + "\n" for i in range(20)))
    assert prepare_gsm8k.main(["--input", str(source), "--out-dir", str(tmp_path / "plain")]) == 0
    assert prepare_gsm8k_tools.main(["--in-dir", str(tmp_path / "plain"), "--out-dir", str(tmp_path / "tools")]) == 0
    for split in ("train", "test"):
        plain = prepare_gsm8k_tools.read_rows(str(tmp_path / "plain" / f"{split}.jsonl"))
        rows = prepare_gsm8k_tools.read_rows(str(tmp_path / "tools" / f"{split}.jsonl"))
        assert len(rows) == len(plain) > 0
        for before, after in zip(plain, rows):
            assert after["prompt"][0]["role"] == "system" and after["prompt"][1:] == before["prompt"]
            assert {k: v for k, v in after.items() if k != "prompt"} == {k: v for k, v in before.items() if k != "prompt"}
    system = rows[0]["prompt"][0]["content"]
    function = json.loads(re.search(r"<tools>\n(.*)\n</tools>", system).group(1))["function"]
    assert function["description"] == PythonTool.description and function["parameters"] == PythonTool.parameters
    example = parse_tool_call(system.rsplit("XML tags:", 1)[1])  # the example call in the instructions
    assert example.error is None and example.name == "python" and "code" in example.arguments


def test_missing_input_names_the_first_script(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="prepare_gsm8k.py"):
        prepare_gsm8k_tools.main(["--in-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")])
