"""Which ranks train and which generate, as pure arithmetic on the config and the world size W.

``distributed.placement=colocate``: every rank trains and generates. ``split``: the last
G = ``distributed.generation_ranks`` ranks (W-G .. W-1) only generate, with tensor parallel
``distributed.tp`` within them (G/tp engine replicas); the first T = W-G ranks only train (rank 0
always trains). The functions assume a validated config (``validate`` checks 1 <= G <= W-1 and
that tp divides the generating ranks).
"""

from __future__ import annotations

import math

from .schema import Config, ConfigError


def is_split(cfg: Config) -> bool:
    """True when training and generation run on disjoint ranks."""
    return cfg.distributed.placement == "split"


def training_world(cfg: Config, world_size: int) -> int:
    """T, the number of ranks that train (FSDP2 over them): W colocated, W - G split."""
    return world_size - cfg.distributed.generation_ranks if is_split(cfg) else world_size


def generation_world(cfg: Config, world_size: int) -> int:
    """The number of ranks that run the rollout engine: W colocated, G split."""
    return cfg.distributed.generation_ranks if is_split(cfg) else world_size


def generation_replicas(cfg: Config, world_size: int) -> int:
    """Independent engine replicas (each of ``distributed.tp`` ranks) the prompts of a step are dealt over."""
    return generation_world(cfg, world_size) // cfg.distributed.tp


def dedicated_generation_ranks(cfg: Config) -> int:
    """``init_distributed``'s ``generation_ranks``: G split, 0 colocated (every rank generates)."""
    return cfg.distributed.generation_ranks if is_split(cfg) else 0


def check_tp_shapes(cfg: Config, heads: int, kv_heads: int, intermediate_size: int, num_experts: int = 0) -> None:
    """Raise ``ConfigError`` unless ``distributed.tp`` splits the policy's shapes as the engine needs.

    The one owner of the heads-versus-tp rule, called before any process group with the numbers
    of the model's config. Every generation rank holds 1/tp of the attention heads. The torch
    engine and vLLM's ``dtensor`` weight sync slice q/k/v (and, for vLLM, the MLP) with
    ``torch.chunk``, so tp must divide each; vLLM with ``rollout.weight_sync=full`` loads whole
    tensors itself and may replicate key/value heads instead (tp a multiple of them).
    A mixture of experts runs expert-parallel at tp > 1: tp must divide ``num_experts`` (0: dense).
    The sequence-parallel rule (``check_sp_shapes``) is checked first, with the same numbers.
    """
    check_sp_shapes(cfg, heads, kv_heads)
    tp, engine, sync = cfg.distributed.tp, cfg.rollout.engine, cfg.rollout.weight_sync
    if num_experts and num_experts % tp:
        below = max(d for d in range(1, tp + 1) if num_experts % d == 0)
        raise ConfigError(f"distributed.tp={tp} must divide the model's num_experts={num_experts} (each generation "
                          f"rank holds whole experts, 1/tp of them); set distributed.tp={below} or another divisor")
    whole_tensors = engine == "vllm" and sync == "full"
    kv_ok = kv_heads % tp == 0 or (whole_tensors and tp % kv_heads == 0)
    mlp_ok = engine != "vllm" or intermediate_size % tp == 0
    if heads % tp == 0 and kv_ok and mlp_ok:
        return
    shapes = f"num_attention_heads={heads}, num_key_value_heads={kv_heads}"
    if engine == "vllm":
        shapes += f" and intermediate_size={intermediate_size}"
    common = math.gcd(heads, kv_heads, intermediate_size) if engine == "vllm" else math.gcd(heads, kv_heads)
    below = max(d for d in range(1, tp + 1) if common % d == 0)
    fix = f"set distributed.tp to a divisor of all of them (e.g. distributed.tp={below})"
    if engine == "vllm" and sync != "full" and heads % tp == 0 and tp % kv_heads == 0 and mlp_ok:
        fix += ", or rollout.weight_sync=full (vLLM then replicates the key/value heads)"
    raise ConfigError(f"distributed.tp={tp} must divide the model's {shapes} (every generation rank holds 1/tp "
                      f"of them); {fix}")


def check_sp_shapes(cfg: Config, heads: int, kv_heads: int) -> None:
    """Raise ``ConfigError`` unless ``distributed.sp`` divides the policy's attention and key/value
    heads: around attention, each of the sp ranks holds 1/sp of them for the whole sequence."""
    sp = cfg.distributed.sp
    if heads % sp == 0 and kv_heads % sp == 0:
        return
    common = math.gcd(heads, kv_heads)
    below = max(d for d in range(1, sp + 1) if common % d == 0)
    raise ConfigError(f"distributed.sp={sp} must divide the model's num_attention_heads={heads} and "
                      f"num_key_value_heads={kv_heads} (sequence parallel gives each of the sp ranks 1/sp of the heads "
                      f"in attention); set distributed.sp to a divisor of both (e.g. distributed.sp={below})")
