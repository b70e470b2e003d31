"""Where a trainer tensor-parallel slice lands in vLLM's own parameters (``rollout.weight_sync=dtensor``).

The trainer streams this rank's tp slices in HF naming (``reshard_stream`` with the plan of
``distributed/tp_plan.py``); ``copy_tp_slice`` writes each into vLLM's parameter: q/k/v into
``qkv_proj`` (that order on dim 0), gate/up into ``gate_up_proj``, vocab rows at the offset of
this rank's vocab shard (padding rows zeroed; logits are cut to the true vocab), everything else
as is. Plans: Qwen2, Qwen3 (q_norm/k_norm), Llama, and their MoE variants: a fused-experts slice
(``mlp.experts.gate_up_proj`` / ``down_proj``, whole experts: the plan's dim 0) lands as it is in
vLLM's ``w13_weight`` / ``w2_weight`` (under ``routed_experts.`` in vLLM 0.32), which has that
layout ([gate; up] on dim 1) when vLLM runs the experts expert-parallel (``enable_expert_parallel``,
linear placement; at tp = 1 every expert); Qwen2-MoE's shared expert fuses like a dense MLP. vLLM pads the vocab to a multiple of 64 and
splits the padded rows evenly, so torch.chunk's slices are its shards only when the vocab is a
multiple of 64 (true of Qwen2.5/Qwen3/Llama 3); otherwise the two vocab tensors travel whole
(``vllm_shard_dims``) and are cut here. Pure: no vLLM needed.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
# HF projection -> (vLLM fused parameter, part index)
_FUSED_PARTS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_FUSED_NAME = re.compile(r"(?P<prefix>.*\.)(?P<part>q_proj|k_proj|v_proj|gate_proj|up_proj)\.(?P<kind>weight|bias)")
_PARTS_PER_FUSED = {"qkv_proj": 3, "gate_up_proj": 2}
_EXPERTS_NAME = re.compile(r"(?P<prefix>.*\.mlp\.experts\.)(?P<part>gate_up_proj|down_proj)")
_VLLM_EXPERTS = {"gate_up_proj": "w13_weight", "down_proj": "w2_weight"}


@dataclass(frozen=True)
class FusedLayout:
    """Row counts of this rank's parts of vLLM's fused and vocab-parallel parameters."""

    tp_size: int
    tp_rank: int
    q_rows: int  # num_attention_heads / tp * head_dim
    kv_rows: int  # num_key_value_heads / tp * head_dim
    mlp_rows: int  # intermediate_size / tp
    vocab_size: int  # the true vocabulary (vLLM pads its rows)
    vocab_whole: bool = False  # vocab tensors arrive whole, not as torch.chunk slices
    shared_rows: int = 0  # Qwen2-MoE: shared_expert_intermediate_size / tp

    @classmethod
    def from_config(cls, config: PretrainedConfig, tp_size: int, tp_rank: int, vocab_whole: bool = False) -> FusedLayout:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        # config.layout.check_tp_shapes refuses these shapes before any process group
        assert not (heads % tp_size or kv_heads % tp_size or config.intermediate_size % tp_size), (
            f"distributed.tp={tp_size} must divide num_attention_heads={heads}, num_key_value_heads={kv_heads} "
            f"and intermediate_size={config.intermediate_size} for rollout.weight_sync=dtensor (check_tp_shapes)"
        )
        shared = getattr(config, "shared_expert_intermediate_size", None) or 0
        return cls(tp_size, tp_rank, heads // tp_size * head_dim, kv_heads // tp_size * head_dim,
                   config.intermediate_size // tp_size, config.vocab_size, vocab_whole, shared // tp_size)

    def part_rows(self, fused: str, part: int, shared_expert: bool = False) -> tuple[int, int]:
        """``(offset, rows)`` of part ``part`` in this rank's fused parameter."""
        mlp = self.shared_rows if shared_expert else self.mlp_rows
        sizes = [self.q_rows, self.kv_rows, self.kv_rows] if fused == "qkv_proj" else [mlp, mlp]
        return sum(sizes[:part]), sizes[part]

    def vocab_rows(self, padded_rows_per_rank: int) -> tuple[int, int]:
        """``[start, stop)`` of the true vocab rows in this rank's vLLM shard."""
        start = min(self.vocab_size, self.tp_rank * padded_rows_per_rank)
        return start, min(self.vocab_size, start + padded_rows_per_rank)


def vocab_chunks_align(vocab_size: int, padded_rows_per_rank: int, tp_size: int) -> bool:
    """Whether torch.chunk's vocab slices (``ceil(V / tp)`` rows each) are exactly vLLM's vocab
    shards (``padded / tp`` rows each, the padding at the end) on every tp rank."""
    chunk = -(-vocab_size // tp_size)
    for rank in range(tp_size):
        ours = (min(vocab_size, rank * chunk), min(vocab_size, rank * chunk + chunk))
        theirs = (min(vocab_size, rank * padded_rows_per_rank), min(vocab_size, (rank + 1) * padded_rows_per_rank))
        if ours != theirs:
            return False
    return True


def vllm_shard_dims(dims: dict[str, int | None], layout: FusedLayout) -> dict[str, int | None]:
    """The trainer's tensor-parallel plan as this engine receives it: vocab tensors whole when
    torch.chunk's vocab slices are not vLLM's vocab shards."""
    if not layout.vocab_whole:
        return dims
    return {name: (None if name in (EMBED, LM_HEAD) else dim) for name, dim in dims.items()}


@torch.no_grad()
def copy_tp_slice(params: dict[str, torch.Tensor], name: str, piece: torch.Tensor, layout: FusedLayout) -> str:
    """Copy one tensor-parallel slice (HF name) into vLLM's parameters; returns the target name.

    ``params`` is vLLM's ``named_parameters()`` on this rank (fused q/k/v and gate/up, vocab
    rows padded per rank). Shapes are checked; a mismatch raises instead of copying.
    """
    experts = _EXPERTS_NAME.fullmatch(name)
    if experts:
        return _copy_experts(params, name, piece, experts["prefix"], _VLLM_EXPERTS[experts["part"]])
    match = _FUSED_NAME.fullmatch(name)
    if match:
        fused, part = _FUSED_PARTS[match["part"]]
        target = f"{match['prefix']}{fused}.{match['kind']}"
        offset, rows = layout.part_rows(fused, part, shared_expert=match["prefix"].endswith(".shared_expert."))
        dest = _param(params, target, name)
        _check(piece.shape[0] == rows and piece.shape[1:] == dest.shape[1:] and offset + rows <= dest.shape[0],
               name, piece, f"rows [{offset}, {offset + rows}) of {target} {tuple(dest.shape)}")
        dest[offset:offset + rows].copy_(piece)
        return target
    dest = _param(params, name, name)
    if name in (EMBED, LM_HEAD):
        start, stop = layout.vocab_rows(dest.shape[0])
        if layout.vocab_whole:
            _check(piece.shape[0] == layout.vocab_size, name, piece, f"the whole vocab ({layout.vocab_size} rows)")
            piece = piece[start:stop]
        _check(piece.shape == (stop - start, *dest.shape[1:]), name, piece,
               f"vocab rows [{start}, {stop}) of {name} {tuple(dest.shape)}")
        dest[: stop - start].copy_(piece)
        dest[stop - start :].zero_()  # vLLM's own loader zero-fills the padding rows: match it
        return name
    _check(piece.shape == dest.shape, name, piece, f"{name} {tuple(dest.shape)}")
    dest.copy_(piece)
    return name


def _copy_experts(params: dict[str, torch.Tensor], name: str, piece: torch.Tensor, prefix: str, vllm_name: str) -> str:
    """This rank's whole experts into vLLM's fused-MoE weight (``routed_experts.`` in vLLM 0.32)."""
    target = next((t for t in (f"{prefix}routed_experts.{vllm_name}", f"{prefix}{vllm_name}") if t in params),
                  f"{prefix}{vllm_name}")
    dest = _param(params, target, name)
    _check(piece.shape == dest.shape, name, piece,
           f"{target} {tuple(dest.shape)} (whole experts per rank: run vLLM with enable_expert_parallel at tp > 1, "
           "or set rollout.weight_sync=full)")
    dest.copy_(piece)
    return target


def _param(params: dict[str, torch.Tensor], target: str, source: str) -> torch.Tensor:
    if target not in params:
        raise KeyError(f"the vLLM model has no parameter {target!r} for {source!r}; use rollout.weight_sync=full")
    param = params[target]
    return param.data if isinstance(param, torch.nn.Parameter) else param


def _check(ok: bool, name: str, piece: torch.Tensor, want: str) -> None:
    if not ok:
        raise ValueError(f"weight sync: slice of {name} {tuple(piece.shape)} does not fit {want}")


def expected_writes(params: dict[str, torch.Tensor]) -> Counter:
    """How many slices each of vLLM's parameters takes in one sync (fused ones one per part)."""
    expected: Counter = Counter()
    for name in params:
        fused = next((f for f in _PARTS_PER_FUSED if f".{f}." in name), None)
        expected[name] = _PARTS_PER_FUSED[fused] if fused else 1
    return expected
