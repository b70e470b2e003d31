"""Config validation (every user mistake names its key and a fix) and Hydra composition of the
real configs, recipes and overrides into the typed ``Config``."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from spmd_rlhf.config import Config, ConfigError, validate

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"


def _raises(cfg: Config, world_size: int, key: str, fix: str) -> str:
    """Assert ``validate`` raises a ``ConfigError`` naming ``key`` and matching the ``fix`` regex."""
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        validate(cfg, world_size)
    message = str(info.value)
    assert re.search(fix, message), f"message suggests no fix ({fix!r}): {message}"
    return message


def _set(**fields: object) -> Callable[[Config], None]:
    """A mutation of ``Config()``: ``_set(trainer__batch_size=-1)`` sets ``cfg.trainer.batch_size``."""

    def apply(cfg: Config) -> None:
        for dotted, value in fields.items():
            *path, name = dotted.split("__")
            node = cfg
            for part in path:
                node = getattr(node, part)
            setattr(node, name, value)

    return apply


# (id, mutation of Config(), world size, key the error must name, regex of the suggested fix)
MISTAKES = [
    ("negative_batch", _set(trainer__batch_size=-1), 1, "trainer.batch_size", r"set trainer\.batch_size=<a positive"),
    ("zero_n", _set(rollout__n=0), 1, "rollout.n", r"set rollout\.n=<a positive"),
    ("zero_micro", _set(trainer__micro_batch_size=0), 1, "trainer.micro_batch_size",
     r"set trainer\.micro_batch_size=<a positive"),
    ("zero_tp", _set(distributed__tp=0), 1, "distributed.tp", r"set distributed\.tp=<a positive"),
    ("batch_vs_world", _set(trainer__batch_size=6, trainer__mini_batch_size=2), 4, "trainer.batch_size",
     r"choose trainer\.batch_size as a multiple of 4"),
    ("mini_not_dividing", _set(trainer__batch_size=32, trainer__mini_batch_size=12), 1, "trainer.mini_batch_size",
     r"choose trainer\.batch_size as a multiple of 12"),
    ("mini_above_batch", _set(trainer__batch_size=8, trainer__mini_batch_size=16), 1, "trainer.mini_batch_size",
     r"set trainer\.mini_batch_size <= trainer\.batch_size"),
    ("tp_vs_shard", _set(distributed__tp=3), 4, "distributed.tp", r"set distributed\.tp to a divisor of 4"),
    ("replicate_vs_world", _set(distributed__dp_replicate=3), 4, "distributed.dp_replicate",
     r"multiple of 3 \(the number of launched processes\)"),
    ("algorithm_name", _set(algorithm__name="trpo"), 1, "algorithm.name", r"set algorithm\.name=.*grpo|grpo.*set"),
    ("engine", _set(rollout__engine="sglang"), 1, "rollout.engine", r"set rollout\.engine="),
    ("loss_agg_mode", _set(algorithm__loss_agg_mode="token-sum"), 1, "algorithm.loss_agg_mode",
     r"token-mean.*set algorithm\.loss_agg_mode="),
    ("kl_estimator", _set(algorithm__kl_estimator="k4"), 1, "algorithm.kl_estimator",
     r"k3.*set algorithm\.kl_estimator="),
    ("top_p_high", _set(rollout__top_p=1.5), 1, "rollout.top_p", r"set rollout\.top_p=1\.0"),
    ("top_p_zero", _set(rollout__top_p=0.0), 1, "rollout.top_p", r"set rollout\.top_p=1\.0"),
    ("kl_twice", _set(algorithm__use_kl_loss=True, algorithm__kl_coef=0.01, algorithm__kl_in_reward__enable=True), 1,
     "algorithm.kl_in_reward.enable", r"pick one: set algorithm\.use_kl_loss=false"),
    ("rloo_one_sample", _set(algorithm__adv_estimator="rloo", rollout__n=1), 1, "rollout.n", r"set rollout\.n >= 2"),
    ("estimator", _set(algorithm__adv_estimator="vtrace"), 1, "algorithm.adv_estimator", r"gae.*set algorithm"),
    ("dual_clip", _set(algorithm__clip_ratio_c=0.5), 1, "algorithm.clip_ratio_c", r"> 1 .*or 0 \(off\)"),
    ("gamma", _set(algorithm__gamma=1.5), 1, "algorithm.gamma", r"set algorithm\.gamma=1\.0"),
    ("replay_no_buffer", _set(algorithm__filter__replay_fraction=0.25), 1, "algorithm.filter.replay_capacity",
     r"set algorithm\.filter\.replay_capacity"),
    ("no_reward", _set(reward__rule_weight=0.0), 1, "reward.rule_weight", r"set reward\.model\.path"),
    ("overlong_buffer", _set(algorithm__overlong__buffer_len=600), 1, "algorithm.overlong.buffer_len",
     r"rollout\.max_new_tokens"),
    ("kl_guard_decay", _set(algorithm__kl_guard__lr_decay=0.0), 1, "algorithm.kl_guard.lr_decay", r"set it to 0\.5"),
]


@pytest.mark.parametrize("mutate,world_size,key,fix", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistake_names_key_and_fix(mutate, world_size: int, key: str, fix: str) -> None:
    cfg = Config()
    mutate(cfg)
    _raises(cfg, world_size, key, fix)


def test_reward_model_path_without_config(tmp_path: Path) -> None:
    cfg = Config()
    cfg.reward.model.path = str(tmp_path)
    _raises(cfg, 1, "reward.model.path", r"point reward\.model\.path at one")


def test_model_path_missing_dir(tmp_path: Path) -> None:
    cfg = Config()
    cfg.model.path = str(tmp_path / "nope")
    _raises(cfg, 1, "model.path", r"point model\.path at a Hugging Face model directory")


def test_model_path_without_config_json(tmp_path: Path) -> None:
    cfg = Config()
    cfg.model.path = str(tmp_path)
    message = _raises(cfg, 1, "model.path", r"point model\.path at a Hugging Face model directory")
    assert "config.json" in message


def _hf_dir(tmp_path: Path) -> str:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return str(model)


def test_train_file_missing(tmp_path: Path) -> None:
    cfg = Config()
    cfg.model.path = _hf_dir(tmp_path)
    cfg.data.train_files = [str(tmp_path / "missing.jsonl")]
    message = _raises(cfg, 1, "data.train_files", r"fix the path in data\.train_files")
    assert "missing.jsonl" in message


def test_train_files_without_model_path(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("")
    cfg = Config()
    cfg.data.train_files = [str(data)]
    _raises(cfg, 1, "data.train_files", r"[Ss]et model\.path=.*or clear data\.train_files")


def test_resume_pointing_nowhere(tmp_path: Path) -> None:
    cfg = Config()
    cfg.trainer.resume = str(tmp_path / "no_checkpoint")
    _raises(cfg, 1, "trainer.resume", r"set trainer\.resume=auto")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_default_config_validates(world_size: int) -> None:
    validate(Config(), world_size)


def test_hsdp_with_tensor_parallel_validates() -> None:
    cfg = Config()
    cfg.distributed.dp_replicate = 2
    cfg.distributed.tp = 2
    validate(cfg, 4)


def test_existing_resume_path_and_hf_dir_validate(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("")
    cfg = Config()
    cfg.model.path = _hf_dir(tmp_path)
    cfg.data.train_files = [str(data)]
    cfg.trainer.resume = str(tmp_path)
    validate(cfg, 1)


# --- Hydra composition -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose():
    """``compose(overrides) -> DictConfig`` over the real configs/ and recipes/."""
    import spmd_rlhf.train  # noqa: F401  (registers the schema and the recipe group)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield lambda overrides=(): hydra_compose(config_name="config", overrides=list(overrides))


def test_default_composition_is_a_valid_config(compose) -> None:
    cfg = OmegaConf.to_object(compose())
    assert isinstance(cfg, Config)
    assert cfg.model.path is None and cfg.data.train_files == []
    validate(cfg, 1)
    validate(cfg, 2)


def test_grpo_gsm8k_recipe_selects_gsm8k_data(compose) -> None:
    gsm8k = OmegaConf.load(CONFIG_DIR / "data" / "gsm8k.yaml")
    cfg = OmegaConf.to_object(compose(["recipe=grpo_gsm8k", "model.path=/models/some-hf-model"]))
    assert isinstance(cfg, Config)
    assert cfg.model.path == "/models/some-hf-model"
    assert cfg.data.train_files == list(gsm8k.train_files)
    assert cfg.data.val_files == list(gsm8k.val_files)
    assert cfg.data.apply_chat_template is True
    assert cfg.trainer.batch_size == 64 and cfg.trainer.mini_batch_size == 32


def test_grpo_gsm8k_recipe_without_model_path_is_a_config_error(compose) -> None:
    # The recipe's `model.path: ???` cannot blank out the schema's default when merged, so the
    # composed config has no model path; validation is what tells the user to set one.
    cfg = OmegaConf.to_object(compose(["recipe=grpo_gsm8k"]))
    assert cfg.model.path is None
    _raises(cfg, 1, "model.path", r"Set model\.path=<HF model dir>")


def test_unknown_config_group_option(compose) -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="algorithm/nonexistent"):
        compose(["algorithm=nonexistent"])


def test_overrides_land_in_typed_config(compose) -> None:
    cfg = OmegaConf.to_object(compose([
        "trainer.total_steps=7", "rollout.n=3", "distributed.tp=2", "logging.wandb=true",
        "trainer.save_every=5", "trainer.resume=auto",
    ]))
    assert isinstance(cfg, Config)
    assert cfg.trainer.total_steps == 7
    assert cfg.rollout.n == 3
    assert cfg.distributed.tp == 2
    assert cfg.logging.wandb is True
    assert cfg.trainer.save_every == 5
    assert cfg.trainer.resume == "auto"
    validate(cfg, 2)


def test_override_of_unknown_key_is_rejected(compose) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer.bach_size"):
        compose(["trainer.bach_size=4"])


def test_override_of_wrong_type_is_rejected(compose) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="rollout.n"):
        compose(["rollout.n=many"])


# --- rollout.engine=vllm (its knobs; what needs vLLM itself: test_config_vllm.py) -------------


@pytest.mark.parametrize("key, value, fix", [
    ("sleep_level", 3, r"set rollout\.vllm\.sleep_level=2"),
    ("dtype", "fp8", r"set rollout\.vllm\.dtype="),
    ("gpu_memory_utilization", 1.5, r"set rollout\.vllm\.gpu_memory_utilization=0\.5"),
    ("kv_cache_gib", 0, r"set rollout\.vllm\.kv_cache_gib=<a positive"),
    ("max_model_len", 0, r"set rollout\.vllm\.max_model_len=<a positive"),
])
def test_vllm_knobs_are_checked(key: str, value, fix: str) -> None:
    cfg = Config()
    cfg.rollout.engine = "vllm"
    setattr(cfg.rollout.vllm, key, value)
    _raises(cfg, 1, f"rollout.vllm.{key}", fix)


def test_vllm_engine_config_validates_without_vllm() -> None:
    cfg = Config()
    cfg.rollout.engine = "vllm"
    cfg.algorithm.tis_cap = 2.0
    validate(cfg, 2)


def test_negative_tis_cap() -> None:
    cfg = Config()
    cfg.algorithm.tis_cap = -1.0
    _raises(cfg, 1, "algorithm.tis_cap", r"set algorithm\.tis_cap=<a non-negative")


def test_vllm_overrides_compose(compose) -> None:
    cfg = OmegaConf.to_object(compose(["rollout.vllm.kv_cache_gib=2", "rollout.vllm.enforce_eager=false",
                                       "rollout.vllm.max_model_len=128", "algorithm.tis_cap=2.0"]))
    assert cfg.rollout.vllm.kv_cache_gib == 2.0 and cfg.rollout.vllm.enforce_eager is False
    assert cfg.rollout.vllm.max_model_len == 128 and cfg.rollout.vllm.enforce_eager is not None
    assert cfg.algorithm.tis_cap == 2.0
