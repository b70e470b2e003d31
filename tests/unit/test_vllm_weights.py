"""The dtensor weight sync into vLLM's parameter layout, on fake parameters (no vLLM needed).

The fake dicts are shaped like vLLM's on one tp rank: q/k/v fused into ``qkv_proj`` and gate/up
into ``gate_up_proj`` (parts in that order on dim 0), vocab rows padded to a multiple of 64 and
split evenly over tp, the padding at the end. The expected contents are written here the way
vLLM's own loaders fill them from whole tensors; ``copy_tp_slice`` must give exactly that from
the tensor-parallel slices the reshard delivers.
"""

from __future__ import annotations

import pytest
import torch

from spmd_rlhf.distributed.reshard import tp_chunk
from spmd_rlhf.distributed.tp_plan import param_shard_dims
from spmd_rlhf.rollout.vllm_layout import (
    EMBED, LM_HEAD, FusedLayout, copy_tp_slice, expected_writes, vllm_shard_dims, vocab_chunks_align,
)
from tests.distributed.workers.tiny import ARCHS, tiny_config, tiny_model

PAD = 64  # vLLM's vocab padding


def vllm_like(full: dict[str, torch.Tensor], config, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """What vLLM's loaders put in rank ``rank``'s parameters, from whole HF tensors."""
    out: dict[str, torch.Tensor] = {}
    vocab = config.vocab_size
    per_rank = -(-vocab // PAD) * PAD // tp
    start, stop = min(vocab, rank * per_rank), min(vocab, (rank + 1) * per_rank)

    def cols(t: torch.Tensor) -> torch.Tensor:  # Megatron column split: whole heads / rows
        return t.chunk(tp, dim=0)[rank]

    for name, tensor in full.items():
        if name in (EMBED, LM_HEAD):
            rows = torch.zeros(per_rank, *tensor.shape[1:])
            rows[: stop - start] = tensor[start:stop]
            out[name] = rows
        elif ".q_proj." in name:
            k, v = name.replace("q_proj", "k_proj"), name.replace("q_proj", "v_proj")
            out[name.replace("q_proj", "qkv_proj")] = torch.cat([cols(tensor), cols(full[k]), cols(full[v])])
        elif ".gate_proj." in name:
            up = name.replace("gate_proj", "up_proj")
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([cols(tensor), cols(full[up])])
        elif any(p in name for p in (".k_proj.", ".v_proj.", ".up_proj.")):
            continue
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            out[name] = tensor.chunk(tp, dim=1)[rank]
        else:  # norms (q_norm/k_norm included), row-parallel biases
            out[name] = tensor.clone()
    return out


def tp_slices(model, tp: int, rank: int, layout: FusedLayout) -> list[tuple[str, torch.Tensor]]:
    """What ``reshard_stream`` delivers to rank ``rank`` (torch.chunk slices), in parameter order."""
    dims = param_shard_dims(model) if tp > 1 else {n: None for n, _ in model.named_parameters()}
    dims = vllm_shard_dims(dims, layout)
    return [(name, p.detach() if dims[name] is None else tp_chunk(p.detach(), dims[name], tp, rank))
            for name, p in model.named_parameters()]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch, vocab, tied", ARCHS + [("qwen2", 64, False)])
def test_slices_land_exactly_where_vllm_loads_them(arch, vocab, tied, tp):
    config = tiny_config(arch, vocab, tied)
    model = tiny_model(config, seed=1)
    full = {name: p.detach() for name, p in model.named_parameters()}
    per_rank = -(-vocab // PAD) * PAD // tp
    for rank in range(tp):
        aligned = vocab_chunks_align(vocab, per_rank, tp)
        assert aligned == (tp == 1 or vocab % PAD == 0)
        layout = FusedLayout.from_config(config, tp, rank, vocab_whole=not aligned)
        want = vllm_like(full, config, tp, rank)
        params = {name: torch.full_like(t, 7.0) for name, t in want.items()}  # stale engine weights
        written = {}
        for name, piece in tp_slices(model, tp, rank, layout):
            target = copy_tp_slice(params, name, piece, layout)
            written[target] = written.get(target, 0) + 1
        assert written == dict(expected_writes(params)), "every vLLM parameter filled, each part once"
        for name, expected in want.items():
            got = params[name]
            if name in (EMBED, LM_HEAD):  # padding rows are zeroed, as vLLM's own loader does
                real = min(vocab, (rank + 1) * per_rank) - min(vocab, rank * per_rank)
                assert torch.equal(got[:real], expected[:real]), name
                assert torch.equal(got[real:], torch.zeros_like(got[real:])), name
            else:
                assert torch.equal(got, expected), name
        assert (LM_HEAD in params) == (not tied), "tied embeddings are one tensor, loaded once"


def test_qwen3_and_llama_extras_are_covered():
    qwen3 = FusedLayout.from_config(tiny_config("qwen3", 37, False), 2, 0)
    assert (qwen3.q_rows, qwen3.kv_rows, qwen3.mlp_rows) == (2 * 8, 1 * 8, 32)
    assert qwen3.part_rows("qkv_proj", 2) == (16 + 8, 8)
    assert qwen3.part_rows("gate_up_proj", 1) == (32, 32)
    assert FusedLayout.from_config(tiny_config("qwen3", 37, False), 2, 1).vocab_rows(32) == (32, 37)


def test_vocab_alignment():
    assert vocab_chunks_align(151936, 151936 // 2, 2)  # Qwen2.5/Qwen3 vocab: slices travel as slices
    assert vocab_chunks_align(128256, 128256 // 8, 8)  # Llama 3
    assert not vocab_chunks_align(37, 32, 2)  # torch.chunk: 19 + 18 rows; vLLM: 32 + 5 (+ 27 padding)
    assert vocab_chunks_align(37, 64, 1)


def test_misfits_raise_instead_of_copying():
    config = tiny_config("qwen2", 37, True)
    layout = FusedLayout.from_config(config, 2, 0, vocab_whole=True)
    params = {"model.layers.0.self_attn.qkv_proj.weight": torch.zeros(32, 32), EMBED: torch.zeros(32, 32)}
    with pytest.raises(ValueError, match="k_proj"):
        copy_tp_slice(params, "model.layers.0.self_attn.k_proj.weight", torch.ones(9, 32), layout)
    with pytest.raises(ValueError, match="whole vocab"):
        copy_tp_slice(params, EMBED, torch.ones(19, 32), layout)
    with pytest.raises(KeyError, match="rollout.weight_sync=full"):
        copy_tp_slice(params, "model.layers.0.mlp.gate_proj.weight", torch.ones(32, 32), layout)
    with pytest.raises(AssertionError, match="distributed.tp=3 must divide"):
        FusedLayout.from_config(config, 3, 0)
