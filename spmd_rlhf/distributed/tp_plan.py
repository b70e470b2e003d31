"""The tensor-parallel plan for HF decoder-only causal LMs (Llama, Qwen2, Qwen3, Mistral).

One plan, read from both ends of the weight sync: ``param_shard_dims`` tells the reshard
(``distributed/reshard.py``) which dim of each parameter to split over tp, and
``apply_tensor_parallel`` lays the engine's model out the same way, so every slice the reshard
produces lands, shape for shape, in the matching local tensor.

Megatron layout:
* q/k/v and gate/up are column-parallel (weight and bias split on dim 0): each rank owns whole
  heads / a slice of the intermediate dim, and its outputs stay local;
* o/down are row-parallel (weight split on dim 1, bias whole): partial sums are all-reduced;
* embed_tokens is vocab-parallel (rows split; DTensor masks ids outside this rank's rows and
  all-reduces); lm_head is column-parallel with the logits gathered to every rank;
* norms (including Qwen3's per-head q_norm/k_norm) are replicated.

Local heads. HF attention reshapes projections with ``view(*shape, -1, head_dim)``, so it picks
up the local head count by itself; ``num_key_value_groups`` is the ratio heads / kv-heads, which
is unchanged when both counts divide by tp. Nothing else reads the global head counts in the
eager and SDPA paths, so no module attribute needs rewriting; ``apply_tensor_parallel`` only
asserts the divisibility (``config.layout.check_tp_shapes`` tells the user before any process group).
"""

from __future__ import annotations

import re

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

_LAYER = r"model\.layers\.\d+\."
# (pattern, shard dim); the first match wins.
_RULES: list[tuple[re.Pattern[str], int | None]] = [
    (re.compile(r"model\.embed_tokens\.weight"), 0),
    (re.compile(r"lm_head\.weight"), 0),
    (re.compile(_LAYER + r"self_attn\.[qkv]_proj\.(weight|bias)"), 0),
    (re.compile(_LAYER + r"mlp\.(gate|up)_proj\.(weight|bias)"), 0),
    (re.compile(_LAYER + r"(self_attn\.o_proj|mlp\.down_proj)\.weight"), 1),
    (re.compile(_LAYER + r"(self_attn\.o_proj|mlp\.down_proj)\.bias"), None),
    (re.compile(r"model\.(layers\.\d+\.)?([\w.]*\.)?\w*norm\w*\.(weight|bias)"), None),
]


def _shard_dim(name: str) -> int | None:
    for pattern, dim in _RULES:
        if pattern.fullmatch(name):
            return dim
    raise ValueError(
        f"this model architecture has no tensor-parallel plan (parameter {name!r} matches no rule); "
        "use rollout.weight_sync=full or distributed.tp=1"
    )


def param_shard_dims(model: nn.Module) -> dict[str, int | None]:
    """Tensor-parallel split dim (or None: replicated) for every name in ``named_parameters()``.

    Tied embeddings appear once, as ``model.embed_tokens.weight``: ``named_parameters`` drops
    the duplicate ``lm_head.weight``, and both share the vocab-parallel dim 0 anyway.
    """
    return {name: _shard_dim(name) for name, _ in model.named_parameters()}


def replicated_dims(model: nn.Module) -> dict[str, int | None]:
    """The tp == 1 plan: every parameter whole. Serves any architecture."""
    return {name: None for name, _ in model.named_parameters()}


def _check_heads(config, tp: int) -> None:
    """The invariant ``config.layout.check_tp_shapes`` enforces before any process group."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    assert heads % tp == 0 and kv_heads % tp == 0, (
        f"distributed.tp={tp} must divide num_attention_heads={heads} and num_key_value_heads={kv_heads} "
        "(check_tp_shapes)"
    )


def _layer_plan(prefix: str) -> dict[str, object]:
    return {
        f"{prefix}.self_attn.q_proj": ColwiseParallel(),
        f"{prefix}.self_attn.k_proj": ColwiseParallel(),
        f"{prefix}.self_attn.v_proj": ColwiseParallel(),
        f"{prefix}.self_attn.o_proj": RowwiseParallel(),
        f"{prefix}.mlp.gate_proj": ColwiseParallel(),
        f"{prefix}.mlp.up_proj": ColwiseParallel(),
        f"{prefix}.mlp.down_proj": RowwiseParallel(),
    }


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Lay ``model`` out over the 1-D ``tp_mesh`` in place (no-op for tp == 1); returns it.

    Raises ValueError for architectures without a plan. Tied embeddings are re-tied after the
    split, so the engine keeps one (vocab-sharded) tensor for both ends and ``load_weights``
    fills it once.
    """
    tp = tp_mesh.size()
    if tp == 1:
        return model
    param_shard_dims(model)  # raises for unknown architectures
    _check_heads(model.config, tp)
    plan: dict[str, object] = {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    }
    for index in range(len(model.model.layers)):
        plan.update(_layer_plan(f"model.layers.{index}"))
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    parallelize_module(model, tp_mesh, plan)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
