"""The checks of rank layout and batch sizes: placement, generation ranks, staleness, and every
size that must divide over the training ranks or the generation replicas (``layout`` has the
arithmetic). Part of ``validate``; pure, before any process group.
"""

from __future__ import annotations

import math

from .checks import choice, divides, positive
from .layout import generation_replicas, is_split, training_world
from .schema import PLACEMENTS, Config, ConfigError


def validate_layout(cfg: Config, world_size: int) -> None:
    """Raise ``ConfigError`` when the ranks cannot be laid out or the batch sizes cannot be dealt over them."""
    _validate_placement(cfg, world_size)
    _validate_staleness(cfg, world_size)
    _validate_training_ranks(cfg, world_size)
    _validate_sequence_parallel(cfg, world_size)
    _validate_batch_sizes(cfg, world_size)


def _validate_placement(cfg: Config, world_size: int) -> None:
    d = cfg.distributed
    choice(d.placement, "distributed.placement", PLACEMENTS)
    gen = d.generation_ranks
    positive(gen, "distributed.generation_ranks", allow_zero=True)
    if not is_split(cfg):
        if gen != 0:
            raise ConfigError(f"distributed.generation_ranks={gen} needs distributed.placement=split (colocated, every "
                              "rank generates); set distributed.placement=split, or distributed.generation_ranks=0")
        return
    if not 1 <= gen <= world_size - 1:
        more = "launch at least 2 processes, or set distributed.placement=colocate" if world_size < 2 else (
            f"set distributed.generation_ranks to between 1 and {world_size - 1}")
        raise ConfigError(f"distributed.placement=split needs 1 <= distributed.generation_ranks <= world size - 1 = "
                          f"{world_size - 1} (at least one rank generates and one trains), got "
                          f"distributed.generation_ranks={gen}; {more}")
    if gen % d.tp != 0:
        raise ConfigError(f"distributed.generation_ranks={gen} is not a multiple of distributed.tp={d.tp} (split: the "
                          "generation ranks form engine replicas of distributed.tp ranks each); set "
                          f"distributed.generation_ranks to a multiple of {d.tp}, or distributed.tp to a divisor of "
                          f"{gen}")
    for key, on in [("algorithm.dynamic_sampling.enable", cfg.algorithm.dynamic_sampling.enable),
                    ("trainer.offload_actor_during_rollout", cfg.trainer.offload_actor_during_rollout)]:
        if on:
            raise ConfigError(f"{key}=true is not supported with distributed.placement=split; set {key}=false, or "
                              "distributed.placement=colocate")


def _validate_staleness(cfg: Config, world_size: int) -> None:
    k = cfg.trainer.max_staleness
    positive(k, "trainer.max_staleness", allow_zero=True)
    if k == 0:
        return
    if not is_split(cfg):
        example = cfg.distributed.tp if world_size > cfg.distributed.tp else "G"
        raise ConfigError(
            f"trainer.max_staleness={k} generates the next batch while the current one trains, which colocated ranks "
            f"cannot (they take turns); set distributed.placement=split distributed.generation_ranks={example} (the "
            "last ranks only generate), or trainer.max_staleness=0")
    if cfg.algorithm.tis_cap <= 0:
        raise ConfigError(
            f"trainer.max_staleness={k} trains on samples of an older policy and corrects with truncated importance "
            "sampling against it; set algorithm.tis_cap > 0 (e.g. algorithm.tis_cap=2.0), or trainer.max_staleness=0")


def _validate_training_ranks(cfg: Config, world_size: int) -> None:
    """HSDP over the training ranks; colocated, tensor parallel within each data-parallel shard group."""
    d = cfg.distributed
    if not is_split(cfg):
        divides(d.dp_replicate, world_size, "distributed.dp_replicate", "world size",
                " (the number of launched processes)")
        dp_shard = world_size // d.dp_replicate
        if dp_shard % d.tp != 0:
            raise ConfigError(
                f"distributed.tp={d.tp} does not divide the {dp_shard} ranks of a data-parallel shard group (world "
                f"size {world_size} / distributed.dp_replicate={d.dp_replicate}); set distributed.tp to a divisor of "
                f"{dp_shard}")
        return
    train = training_world(cfg, world_size)
    if train % d.dp_replicate != 0:
        raise ConfigError(
            f"distributed.dp_replicate={d.dp_replicate} does not divide the {train} training ranks (world size "
            f"{world_size} - distributed.generation_ranks={d.generation_ranks}); set distributed.dp_replicate to a "
            f"divisor of {train}, or change distributed.generation_ranks")


def _validate_sequence_parallel(cfg: Config, world_size: int) -> None:
    """``distributed.sp`` ranks share each packed row: they divide the training ranks, and rows are packed."""
    sp = cfg.distributed.sp
    if sp < 1:
        raise ConfigError(f"distributed.sp={sp} must be >= 1 (1: no sequence parallel); set distributed.sp=1")
    if sp == 1:
        return
    train = training_world(cfg, world_size)
    if train % sp != 0:
        raise ConfigError(f"distributed.sp={sp} does not divide the {train} training ranks (each packed row is split "
                          f"over distributed.sp ranks); set distributed.sp to a divisor of {train}, or launch a "
                          "multiple of it")
    tokens = cfg.trainer.max_tokens_per_micro_batch
    if tokens is None:
        import torch  # null packs on CUDA only (config.device_defaults)

        tokens = 0 if not torch.cuda.is_available() else None
    if tokens == 0:
        raise ConfigError(f"distributed.sp={sp} splits packed micro-batches, but trainer.max_tokens_per_micro_batch "
                          "is 0 here (padded rows); set trainer.max_tokens_per_micro_batch to a token budget per "
                          "packed row (e.g. 4096), or distributed.sp=1")


def _validate_batch_sizes(cfg: Config, world_size: int) -> None:
    """Prompts per step and per mini-batch deal evenly over the training ranks (colocated, the world)."""
    t = cfg.trainer
    if t.mini_batch_size > t.batch_size:
        raise ConfigError(f"trainer.mini_batch_size={t.mini_batch_size} exceeds trainer.batch_size={t.batch_size}; "
                          "set trainer.mini_batch_size <= trainer.batch_size")
    divides(t.mini_batch_size, t.batch_size, "trainer.mini_batch_size", "trainer.batch_size")
    if is_split(cfg):
        _validate_split_batch_sizes(cfg, world_size)
        return
    divides(world_size, t.batch_size, "the world size", "trainer.batch_size",
            " so every data-parallel rank gets the same number of prompts")
    divides(world_size, t.mini_batch_size, "the world size", "trainer.mini_batch_size")
    if t.sft.steps > 0:
        divides(world_size, t.sft.batch_size, "the world size", "trainer.sft.batch_size")


def _validate_split_batch_sizes(cfg: Config, world_size: int) -> None:
    """Split: the same over the T training ranks, and the prompts of a step over the G/tp generation replicas."""
    t, d = cfg.trainer, cfg.distributed
    train, replicas = training_world(cfg, world_size), generation_replicas(cfg, world_size)
    ranks = f"the {train} training ranks (world size {world_size} - distributed.generation_ranks={d.generation_ranks})"
    engines = (f"the {replicas} generation replicas (distributed.generation_ranks={d.generation_ranks} / "
               f"distributed.tp={d.tp})")
    both = math.lcm(train, replicas)
    checks = [("trainer.batch_size", t.batch_size, train, ranks, both),
              ("trainer.batch_size", t.batch_size, replicas, engines, both),
              ("trainer.mini_batch_size", t.mini_batch_size, train, ranks, train)]
    if t.sft.steps > 0:
        checks.append(("trainer.sft.batch_size", t.sft.batch_size, train, ranks, train))
    for key, value, count, over, multiple in checks:
        if value % count != 0:
            raise ConfigError(f"{key}={value} does not divide evenly over {over}; choose {key} as a multiple of "
                              f"{multiple}")
