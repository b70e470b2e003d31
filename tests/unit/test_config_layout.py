"""Placement (colocate | split), generation ranks and staleness: the rank arithmetic of
``spmd_rlhf.config.layout`` on hand-computed cases, and every mistake naming its key and a fix."""

from __future__ import annotations

import re

import pytest

from spmd_rlhf.config import (Config, ConfigError, check_tp_shapes, dedicated_generation_ranks, generation_replicas,
                              generation_world, is_split, training_world, validate)


def _config(placement: str = "colocate", generation_ranks: int = 0, tp: int = 1, **trainer: object) -> Config:
    cfg = Config()
    cfg.distributed.placement, cfg.distributed.generation_ranks, cfg.distributed.tp = placement, generation_ranks, tp
    for name, value in trainer.items():
        setattr(cfg.trainer, name, value)
    return cfg


def _raises(cfg: Config, world_size: int, key: str, fix: str) -> str:
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        validate(cfg, world_size)
    message = str(info.value)
    assert re.search(fix, message), f"message suggests no fix ({fix!r}): {message}"
    return message


# (placement, G, tp, W) -> (is_split, T training ranks, generating ranks, replicas, init_distributed's G)
LAYOUTS = [
    (("colocate", 0, 1, 1), (False, 1, 1, 1, 0)),
    (("colocate", 0, 2, 4), (False, 4, 4, 2, 0)),
    (("split", 1, 1, 3), (True, 2, 1, 1, 1)),
    (("split", 2, 2, 8), (True, 6, 2, 1, 2)),
    (("split", 4, 2, 8), (True, 4, 4, 2, 4)),
    (("split", 6, 3, 8), (True, 2, 6, 2, 6)),
]


@pytest.mark.parametrize("layout, want", LAYOUTS, ids=[f"{p}-G{g}-tp{t}-W{w}" for (p, g, t, w), _ in LAYOUTS])
def test_rank_arithmetic(layout, want) -> None:
    placement, gen, tp, world = layout
    cfg = _config(placement, gen, tp)
    got = (is_split(cfg), training_world(cfg, world), generation_world(cfg, world), generation_replicas(cfg, world),
           dedicated_generation_ranks(cfg))
    assert got == want


# (id, config, world size, key the error must name, regex of the suggested fix)
MISTAKES = [
    ("unknown_placement", _config("spread"), 4, "distributed.placement", r"set distributed\.placement=<one of them>"),
    ("colocate_with_generation_ranks", _config("colocate", 1), 4, "distributed.generation_ranks",
     r"set distributed\.placement=split, or distributed\.generation_ranks=0"),
    ("split_without_generation_ranks", _config("split", 0), 4, "distributed.generation_ranks",
     r"set distributed\.generation_ranks to between 1 and 3"),
    ("split_all_generate", _config("split", 4), 4, "distributed.generation_ranks", r"between 1 and 3"),
    ("split_one_process", _config("split", 1), 1, "distributed.generation_ranks",
     r"launch at least 2 processes, or set distributed\.placement=colocate"),
    ("generation_ranks_vs_tp", _config("split", 3, tp=2), 4, "distributed.generation_ranks",
     r"multiple of 2, or distributed\.tp to a divisor of 3"),
    ("batch_vs_training_ranks", _config("split", 1, batch_size=8, mini_batch_size=8), 4, "trainer.batch_size",
     r"3 training ranks.*multiple of 3"),
    ("batch_vs_generation_replicas", _config("split", 2, batch_size=9, mini_batch_size=9), 5, "trainer.batch_size",
     r"2 generation replicas.*multiple of 6"),
    ("mini_batch_vs_training_ranks", _config("split", 1, batch_size=8, mini_batch_size=1), 3,
     "trainer.mini_batch_size", r"2 training ranks.*multiple of 2"),
    ("negative_staleness", _config(max_staleness=-1), 1, "trainer.max_staleness",
     r"set trainer\.max_staleness=<a non-negative"),
    ("staleness_colocated", _config(max_staleness=1), 4, "trainer.max_staleness",
     r"set distributed\.placement=split distributed\.generation_ranks=1 .*or trainer\.max_staleness=0"),
    ("staleness_colocated_one_rank", _config(max_staleness=2), 1, "trainer.max_staleness",
     r"set distributed\.placement=split distributed\.generation_ranks=G"),
    ("staleness_without_tis", _config("split", 1, max_staleness=1), 3, "algorithm.tis_cap",
     r"set algorithm\.tis_cap > 0"),
]


@pytest.mark.parametrize("cfg, world_size, key, fix", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_layout_mistake_names_key_and_fix(cfg: Config, world_size: int, key: str, fix: str) -> None:
    _raises(cfg, world_size, key, fix)


def test_split_hsdp_replicas_divide_training_ranks() -> None:
    cfg = _config("split", 1)
    cfg.distributed.dp_replicate = 2
    _raises(cfg, 4, "distributed.dp_replicate", r"3 training ranks.*set distributed\.dp_replicate to a divisor of 3")
    validate(cfg, 5)  # 4 training ranks: 2 replicas of 2


def test_split_sft_batch_divides_training_ranks() -> None:
    cfg = _config("split", 1)
    cfg.trainer.sft.steps, cfg.trainer.sft.batch_size = 1, 3
    _raises(cfg, 3, "trainer.sft.batch_size", r"2 training ranks.*multiple of 2")


@pytest.mark.parametrize("key", ["algorithm.dynamic_sampling.enable", "trainer.offload_actor_during_rollout"])
def test_split_refuses_unsupported_features(key: str) -> None:
    cfg = _config("split", 1)
    if key.startswith("algorithm"):
        cfg.algorithm.dynamic_sampling.enable = True
    else:
        cfg.trainer.offload_actor_during_rollout = True
    _raises(cfg, 3, key, rf"set {re.escape(key)}=false, or distributed\.placement=colocate")
    cfg.distributed.placement, cfg.distributed.generation_ranks = "colocate", 0
    validate(cfg, 2)  # colocated, the feature stays


@pytest.mark.parametrize("gen, tp, world, batch, mini", [
    (1, 1, 3, 32, 16),  # the CPU layout: 1 generation + 2 training ranks
    (2, 2, 3, 32, 32),  # tp applies within the generation ranks: 2 ranks, one replica; 1 training rank
    (4, 2, 8, 32, 16),  # 4 training ranks, 2 replicas of tp 2
    (2, 1, 5, 6, 3),  # 3 training ranks and 2 replicas: 6 prompts deal over both
])
def test_valid_split_configs(gen: int, tp: int, world: int, batch: int, mini: int) -> None:
    cfg = _config("split", gen, tp, batch_size=batch, mini_batch_size=mini)
    validate(cfg, world)
    cfg.trainer.max_staleness, cfg.algorithm.tis_cap = 1, 2.0
    validate(cfg, world)


def test_split_leaves_colocated_tp_rule_to_generation_ranks() -> None:
    # colocated, tp must divide the data-parallel shard group of the world; split, only the generation ranks
    _raises(_config("colocate", 0, tp=2), 3, "distributed.tp", r"set distributed\.tp to a divisor of 3")
    validate(_config("split", 2, tp=2), 3)


# --- distributed.tp against the policy's shapes ---------------------------------------------------


def _engine(engine: str = "torch", weight_sync: str = "dtensor", tp: int = 1) -> Config:
    cfg = _config(tp=tp)
    cfg.rollout.engine, cfg.rollout.weight_sync = engine, weight_sync
    return cfg


@pytest.mark.parametrize("engine, sync, tp, heads, kv, mlp", [
    ("torch", "dtensor", 1, 7, 1, 5),
    ("torch", "dtensor", 2, 4, 2, 6),
    ("torch", "dtensor", 4, 4, 4, 6),  # the torch engine's plan splits only heads evenly
    ("vllm", "dtensor", 2, 14, 2, 4864),  # Qwen2.5-0.5B at tp 2
    ("vllm", "full", 4, 12, 2, 8960),  # vLLM replicates the 2 key/value heads of Qwen2.5-1.5B at tp 4
])
def test_tp_shapes_that_split(engine: str, sync: str, tp: int, heads: int, kv: int, mlp: int) -> None:
    check_tp_shapes(_engine(engine, sync, tp), heads, kv, mlp)


@pytest.mark.parametrize("engine, sync, tp, heads, kv, mlp, fix", [
    ("torch", "dtensor", 2, 3, 3, 8, r"num_attention_heads=3.*distributed\.tp=1\b"),
    ("torch", "dtensor", 4, 6, 6, 8, r"e\.g\. distributed\.tp=3\b"),
    ("torch", "dtensor", 4, 12, 2, 8960, r"num_key_value_heads=2.*distributed\.tp=2\b"),
    ("vllm", "dtensor", 4, 12, 2, 8960, r"num_key_value_heads=2.*or rollout\.weight_sync=full"),
    ("vllm", "auto", 4, 12, 2, 8960, r"num_key_value_heads=2.*or rollout\.weight_sync=full"),
    ("vllm", "full", 4, 4, 4, 6, r"intermediate_size=6.*distributed\.tp=2\b"),
    ("vllm", "full", 4, 12, 3, 8960, r"num_key_value_heads=3.*distributed\.tp=1\b"),  # 4: no multiple of 3 either
])
def test_tp_shapes_that_do_not_split(engine: str, sync: str, tp: int, heads: int, kv: int, mlp: int, fix: str) -> None:
    with pytest.raises(ConfigError, match=r"distributed\.tp=") as info:
        check_tp_shapes(_engine(engine, sync, tp), heads, kv, mlp)
    assert re.search(fix, str(info.value)), str(info.value)


def test_tp_must_divide_the_experts_of_a_mixture() -> None:
    check_tp_shapes(_engine("torch", tp=2), 4, 2, 64, num_experts=128)  # Qwen3-30B-A3B's 128 experts at tp 2
    with pytest.raises(ConfigError, match=r"distributed\.tp=4 must divide the model's num_experts=6") as info:
        check_tp_shapes(_engine("vllm", tp=4), 4, 4, 64, num_experts=6)
    assert "distributed.tp=3" in str(info.value)
