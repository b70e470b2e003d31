"""Variable-length (packed-sequence) attention for Hugging Face causal LMs.

A packed micro-batch (``data/packing.py``) is one row ``[1, N]`` of S sequences, positions
restarting at 0 per sequence, ``attention_mask=None``. Two ways to run it, same results:

* ``attn_implementation="sdpa"`` (transformers' own packed path): ``masking_utils`` sees the
  restarting ``position_ids`` (``find_packed_sequence_indices``, only when the 2D mask is None and
  there is no cache) and builds a block-diagonal causal ``[1, 1, N, N]`` boolean mask, used by
  ``F.scaled_dot_product_attention``. Correct, but O(N^2) memory, and a masked SDPA cannot use the
  flash kernel.
* ``attn_implementation=VARLEN`` (this module, after ``use_packed_attention(model)``): the model
  gets ``cu_seqlens`` through transformers' flash-attention keyword arguments
  (``cu_seq_lens_q/k``, ``max_length_q/k``, passed by the model forward down to the attention
  function unchanged), no mask is built, and each layer runs
  - on CUDA in fp16/bf16 (training under FSDP2 mixed precision): torch's own variable-length
    flash kernel, ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10; its keyword arguments
    changed between releases — ``is_causal`` in 2.10, ``window_size=(-1, 0)`` after, ``enable_gqa``
    from 2.12 — so they are chosen from its signature; without ``enable_gqa`` the key/value heads
    are repeated);
  - elsewhere (CPU, fp32 on CUDA, no varlen kernel): ``F.scaled_dot_product_attention`` with
    ``is_causal=True`` per sequence (a Python loop over the S segments; GQA by ``enable_gqa``).
  FlashAttention wheels are not needed.

Non-packed calls on the same model behave exactly as ``sdpa``: the mask function is transformers'
``sdpa_mask`` except for an unpadded single row without cache (no mask needed), and the attention
function hands every call without ``cu_seq_lens_q`` to ``sdpa_attention_forward`` — unless it is a
single unmasked row whose ``position_ids`` restart, in which case the segments are derived from
them (one host sync per layer), so a packed forward without the keyword arguments is still right.
Sliding-window layers are not supported (asserted).

Sequence parallel (``distributed.sp``, ``distributed/ulysses.py``): a call whose keyword arguments
carry ``sp_group`` holds this rank's slice of a packed row; the heads are split over the group by
an all-to-all, the segments above run on the whole row (``cu_seq_lens_q`` are the whole row's),
and the inverse all-to-all gives back this rank's tokens with every head.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..distributed.ulysses import ulysses_attention

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None

VARLEN = "spmd_varlen"
_VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else set()


def varlen_kernel_available(device: torch.device, dtype: torch.dtype, head_dim: int = 128) -> bool:
    """Whether layers on ``device`` in ``dtype`` run torch's variable-length flash kernel."""
    return (varlen_attn is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and head_dim % 8 == 0 and head_dim <= 256)


def _cu_seqlens_from_positions(position_ids_1N: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sequence starts where a position does not continue the previous one (transformers' rule)."""
    pos_N = position_ids_1N[0]
    start_N = torch.ones_like(pos_N, dtype=torch.bool)
    start_N[1:] = pos_N[1:] - pos_N[:-1] != 1
    starts = torch.nonzero(start_N).squeeze(1)
    cu = torch.cat([starts, starts.new_tensor([pos_N.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _kernel(q_NHD, k_NHD, v_NHD, cu_seqlens, max_seqlen: int, scaling: float) -> torch.Tensor:
    """torch's varlen flash kernel, causal, with the keyword arguments this torch accepts."""
    kwargs = {}
    if "enable_gqa" in _VARLEN_PARAMS:
        kwargs["enable_gqa"] = q_NHD.shape[1] != k_NHD.shape[1]
    elif q_NHD.shape[1] != k_NHD.shape[1]:
        groups = q_NHD.shape[1] // k_NHD.shape[1]
        k_NHD, v_NHD = k_NHD.repeat_interleave(groups, dim=1), v_NHD.repeat_interleave(groups, dim=1)
    if "window_size" in _VARLEN_PARAMS:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if "scale" in _VARLEN_PARAMS:
        kwargs["scale"] = scaling
    else:
        assert abs(scaling - q_NHD.shape[-1] ** -0.5) < 1e-12, "this torch's varlen_attn has no scale argument"
    cu = cu_seqlens.to(device=q_NHD.device, dtype=torch.int32)
    return varlen_attn(q_NHD, k_NHD, v_NHD, cu, cu, max_seqlen, max_seqlen, **kwargs)


def _per_sequence(q_1HND, k_1HND, v_1HND, cu_seqlens, scaling: float) -> torch.Tensor:
    """Causal SDPA on each ``cu_seqlens`` segment; returns ``[1, N, H, D]``."""
    bounds = cu_seqlens.tolist()
    gqa = q_1HND.shape[1] != k_1HND.shape[1]
    outs = [
        F.scaled_dot_product_attention(q_1HND[:, :, a:b], k_1HND[:, :, a:b], v_1HND[:, :, a:b], is_causal=True,
                                       scale=scaling, enable_gqa=gqa)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function of ``VARLEN``: query ``[1, H, N, D]``, key/value
    ``[1, Hkv, N, D]`` in, ``([1, N, H, D], None)`` out, causal within each ``cu_seq_lens_q``
    segment. Calls without segments and not recognisably packed go to ``sdpa_attention_forward``.
    With ``sp_group`` (sequence parallel) the tensors hold this rank's tokens of the row."""
    group = kwargs.pop("sp_group", None)
    if group is not None:
        assert kwargs.get("cu_seq_lens_q") is not None, "sequence parallel runs packed rows with their boundaries"
        return ulysses_attention(varlen_attention_forward, group, module, query, key, value, attention_mask,
                                 dropout=dropout, scaling=scaling, **kwargs)
    cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    position_ids = kwargs.get("position_ids")
    if (cu_seqlens is None and attention_mask is None and position_ids is not None and query.shape[0] == 1
            and query.shape[2] == key.shape[2] > 1 and position_ids.shape[-1] == query.shape[2]):
        cu_seqlens, max_seqlen = _cu_seqlens_from_positions(position_ids.reshape(1, -1))
    if cu_seqlens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    assert attention_mask is None, "packed sequences take no attention mask"
    assert query.shape[0] == 1 and query.shape[2] == key.shape[2], "packed: one row, queries = keys"
    assert kwargs.get("cu_seq_lens_k", cu_seqlens) is cu_seqlens or torch.equal(kwargs["cu_seq_lens_k"], cu_seqlens)
    assert kwargs.get("sliding_window") is None, "sliding-window attention is not supported on packed sequences"
    assert kwargs.get("is_causal", True) and getattr(module, "is_causal", True), "packed attention is causal"
    assert dropout == 0.0, "attention dropout is not supported on packed sequences"
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if varlen_kernel_available(query.device, query.dtype, query.shape[-1]):
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        # HF's projections are [N, H, D] in memory already: no copy for q/k/v in practice
        q_NHD, k_NHD, v_NHD = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
        return _kernel(q_NHD, k_NHD, v_NHD, cu_seqlens, int(max_seqlen), scaling).unsqueeze(0), None
    return _per_sequence(query, key, value, cu_seqlens, scaling), None


def varlen_mask(**kwargs) -> torch.Tensor | None:
    """The ``AttentionMaskInterface`` function of ``VARLEN``: no mask for one unpadded row without
    cache (causal per segment, from ``cu_seq_lens_q`` or the positions), else ``sdpa_mask``."""
    plain = (kwargs.get("attention_mask") is None and kwargs["batch_size"] == 1
             and kwargs["q_length"] == kwargs["kv_length"]
             and all(isinstance(kwargs.get(k, 0), int) and kwargs.get(k, 0) == 0 for k in ("q_offset", "kv_offset")))
    return None if plain else sdpa_mask(**kwargs)


def register() -> str:
    """Make ``VARLEN`` a valid ``attn_implementation`` (idempotent); returns the name."""
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, varlen_mask)
    return VARLEN


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a built HF causal LM (FSDP2-wrapped or not) to ``VARLEN``; padded calls keep
    working as under ``sdpa``. Reverse with ``model.set_attn_implementation("sdpa")``."""
    config = model.config
    if config._attn_implementation == VARLEN:  # called before every pass: switch once
        return
    assert "sliding_attention" not in (getattr(config, "layer_types", None) or []), "sliding-window layers"
    model.set_attn_implementation(register())
    assert config._attn_implementation == VARLEN, f"attn_implementation stayed {config._attn_implementation!r}"


def packed_forward_kwargs(packed) -> dict:
    """Keyword arguments that carry a ``PackedBatch``'s segments to the attention function; pass
    them with ``input_ids=packed.input_ids_1N, position_ids=packed.position_ids_1N,
    attention_mask=None``. Harmless under ``sdpa`` (ignored there: the mask comes from the
    positions)."""
    return {
        "cu_seq_lens_q": packed.cu_seqlens,
        "cu_seq_lens_k": packed.cu_seqlens,
        "max_length_q": packed.max_seqlen,
        "max_length_k": packed.max_seqlen,
    }
