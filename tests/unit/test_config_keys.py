"""Unknown keys (``+trainer.total_step=5``), keys named in messages, and prompt + response beyond
the model's positions: each refused with the key and the fix, before any process group."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

from spmd_rlhf.config import Config, ConfigError, check_context_length, check_known_keys, schema_keys
from spmd_rlhf.config.keys import nearest_keys, unknown_keys

REPO = Path(__file__).resolve().parents[2]
SECTIONS = "model|data|reward|rollout|algorithm|critic|trainer|logging|distributed"
# a key a user is told to set: "section.name...=" inside a string
KEY_ASSIGNMENT = re.compile(rf"(?<![\w./+-])((?:{SECTIONS})(?:\.[a-z_][a-z0-9_]*)+)=")


def test_the_composed_default_has_no_unknown_key() -> None:
    from dataclasses import asdict

    assert unknown_keys(asdict(Config())) == []
    check_known_keys(asdict(Config()))
    check_known_keys(None)


@pytest.mark.parametrize(("given", "key", "suggested"), [
    ("trainer.total_step", "trainer.total_step", "trainer.total_steps"),
    ("rollout.vllm.gpu_mem", "rollout.vllm.gpu_mem", "rollout.vllm.gpu_memory_utilization"),
    ("algorithm.kl_coeff", "algorithm.kl_coeff", "algorithm.kl_coef"),
    ("trainr.lr", "trainr", "trainer"),  # the unknown section is the mistake
])
def test_an_unknown_key_is_refused_with_the_nearest_valid_one(given: str, key: str, suggested: str) -> None:
    config: dict = {}
    node = config
    *sections, leaf = given.split(".")
    for section in sections:
        node = node.setdefault(section, {})
    node[leaf] = 5
    with pytest.raises(ConfigError) as err:
        check_known_keys(config)
    message = str(err.value)
    assert message.startswith(f"{key} is not a configuration key") and suggested in message
    assert suggested in nearest_keys(key)


def test_a_far_off_name_lists_the_fields_of_its_section() -> None:
    with pytest.raises(ConfigError, match=r"logging\.zzz is not a configuration key.*logging\.wandb"):
        check_known_keys({"logging": {"wandb": True, "zzz": 1}})


def test_every_section_and_leaf_is_a_schema_key() -> None:
    keys = set(schema_keys())
    assert {"trainer", "trainer.sft", "trainer.sft.steps", "rollout.vllm.sleep_level", "distributed.tp"} <= keys
    assert "rollout.tp" not in keys


def test_keys_that_messages_tell_a_user_to_set_exist() -> None:
    """Every ``section.key=`` inside a string of the package and the tools names a real key."""
    keys = set(schema_keys())
    wrong = []
    for path in sorted([*REPO.glob("spmd_rlhf/**/*.py"), *REPO.glob("tools/*.py"), *REPO.glob("launch/*.py")]):
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if token.type != tokenize.STRING and token.type != getattr(tokenize, "FSTRING_MIDDLE", -1):
                continue
            wrong += [f"{path.relative_to(REPO)}:{token.start[0]}: {m}" for m in KEY_ASSIGNMENT.findall(token.string)
                      if m not in keys]
    assert not wrong, "messages name keys the schema does not have:\n" + "\n".join(wrong)


def cfg_with(engine: str, prompt: int, new: int) -> Config:
    cfg = Config()
    cfg.rollout.engine, cfg.data.max_prompt_length, cfg.rollout.max_new_tokens = engine, prompt, new
    return cfg


def test_prompt_and_response_beyond_the_model_positions() -> None:
    check_context_length(cfg_with("torch", 100, 28), 128)  # exactly full
    check_context_length(cfg_with("torch", 100, 28), None)  # the model does not say
    check_context_length(cfg_with("vllm", 200_000, 28), 128)  # vLLM caps max_model_len itself
    with pytest.raises(ConfigError) as err:
        check_context_length(cfg_with("torch", 200_000, 512), 8192)
    message = str(err.value)
    assert "data.max_prompt_length=200000" in message and "rollout.max_new_tokens=512" in message
    assert "max_position_embeddings=8192" in message and "at most 8192" in message
