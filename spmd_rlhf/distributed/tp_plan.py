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

Vision-language models (Qwen2-VL, Qwen2.5-VL): the language model (``model.language_model.*``)
takes the same plan; the vision tower (``model.visual.*``) is replicated, every rank runs it whole.

Mixture of experts (Qwen3-MoE, Qwen2-MoE) is expert-parallel: the fused experts
(``mlp.experts.gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) split on dim 0, so each tp
rank holds whole experts (``distributed/expert_parallel.py``); the router (``mlp.gate``) is
replicated; Qwen2-MoE's shared expert is a dense MLP (column/row-parallel), its gate replicated.

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

from .expert_parallel import shard_experts

_LAYER = r"model\.(language_model\.)?layers\.\d+\."
# (pattern, shard dim); the first match wins.
_RULES: list[tuple[re.Pattern[str], int | None]] = [
    (re.compile(r"model\.visual\..+"), None),  # a VL model's vision tower: replicated
    (re.compile(r"model\.(language_model\.)?embed_tokens\.weight"), 0),
    (re.compile(r"lm_head\.weight"), 0),
    (re.compile(_LAYER + r"self_attn\.[qkv]_proj\.(weight|bias)"), 0),
    (re.compile(_LAYER + r"mlp\.(gate|up)_proj\.(weight|bias)"), 0),
    (re.compile(_LAYER + r"mlp\.experts\.(gate_up_proj|down_proj)"), 0),  # expert parallel: whole experts
    (re.compile(_LAYER + r"mlp\.(gate|shared_expert_gate)\.weight"), None),  # routers
    (re.compile(_LAYER + r"mlp\.shared_expert\.(gate|up)_proj\.(weight|bias)"), 0),
    (re.compile(_LAYER + r"mlp\.shared_expert\.down_proj\.weight"), 1),
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
    config = config.get_text_config()  # a VL model's language model
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    assert heads % tp == 0 and kv_heads % tp == 0, (
        f"distributed.tp={tp} must divide num_attention_heads={heads} and num_key_value_heads={kv_heads} "
        "(check_tp_shapes)"
    )


def _attention_plan(prefix: str) -> dict[str, object]:
    return {
        f"{prefix}.self_attn.q_proj": ColwiseParallel(),
        f"{prefix}.self_attn.k_proj": ColwiseParallel(),
        f"{prefix}.self_attn.v_proj": ColwiseParallel(),
        f"{prefix}.self_attn.o_proj": RowwiseParallel(),
    }


def _mlp_plan(prefix: str) -> dict[str, object]:
    return {f"{prefix}.gate_proj": ColwiseParallel(), f"{prefix}.up_proj": ColwiseParallel(),
            f"{prefix}.down_proj": RowwiseParallel()}


def _moe_block(layer: nn.Module) -> nn.Module | None:
    """The layer's sparse MoE block (router ``gate`` + fused ``experts``), None for a dense MLP."""
    mlp = layer.mlp
    return mlp if isinstance(getattr(mlp, "experts", None), nn.Module) else None


def _layer_plan(prefix: str, layer: nn.Module) -> dict[str, object]:
    """Attention and dense MLPs (a MoE layer's shared expert too); experts are sharded apart."""
    plan = _attention_plan(prefix)
    moe = _moe_block(layer)
    if moe is None:
        plan.update(_mlp_plan(f"{prefix}.mlp"))
    elif isinstance(getattr(moe, "shared_expert", None), nn.Module):
        plan.update(_mlp_plan(f"{prefix}.mlp.shared_expert"))
    return plan


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
    decoder = model.get_decoder()  # model.model; a VL model's model.language_model
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    plan: dict[str, object] = {
        f"{prefix}.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    }
    for index, layer in enumerate(decoder.layers):
        plan.update(_layer_plan(f"{prefix}.layers.{index}", layer))
    tied = model.lm_head.weight is decoder.embed_tokens.weight
    parallelize_module(model, tp_mesh, plan)
    for layer in decoder.layers:
        moe = _moe_block(layer)
        if moe is not None:
            shard_experts(moe.experts, tp, tp_mesh.get_local_rank(), tp_mesh.get_group())
    if tied:
        model.lm_head.weight = decoder.embed_tokens.weight
    return model
