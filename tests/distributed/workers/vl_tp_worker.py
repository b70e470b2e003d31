"""Run under torchrun (2 ranks, gloo): the tiny Qwen2.5-VL laid out tensor parallel at tp = 2
(``distributed/tp_plan.py``): the language model split, the vision tower replicated; each local
tensor is the slice ``param_shard_dims`` gives the weight sync, and a forward of rows with images
(pixel inputs, M-RoPE positions, padding) gives the whole model's logits. A tp = 2 TorchEngine
loaded by the weight sync's reshard generates greedily from prompts with images, its log-probs
those of plain HF forwards. Rank 0 writes "ok" to ``argv[1]``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from spmd_rlhf.distributed.reshard import reshard_stream, tp_chunk
from spmd_rlhf.distributed.topology import init_distributed, shutdown
from spmd_rlhf.distributed.tp_plan import apply_tensor_parallel, param_shard_dims
from spmd_rlhf.models.parallelize import parallelize
from spmd_rlhf.models.vlm import vision_forward_kwargs
from spmd_rlhf.rollout.base import SamplingConfig
from spmd_rlhf.rollout.torch_engine import TorchEngine
from tests.distributed.workers.tiny_vl import hf_row_logprobs, tiny_vl, vl_batch


def check_engine(full, actor, dims, topo, tokenizer) -> None:
    """Greedy tokens of a tp = 2 engine from rows with images: log-probs within 1e-4 of HF's."""
    engine = TorchEngine(full.config, topo.gen_mesh, topo.device, torch.float32, [tokenizer.eos_token_id], 0)
    engine.load_weights(reshard_stream(actor.named_parameters(), dims, topo.reshard_mesh, 4096))
    batch, prompts, _ = vl_batch(tokenizer, seed=2)
    mine = slice(0, 3) if topo.tp_rank == 0 else slice(3, 6)  # each tp rank its prompts; the engine gathers
    got = engine.generate(prompts[mine], SamplingConfig(max_new_tokens=5, temperature=0.0), vision=batch.vision[mine])
    for prompt, vision, tokens, logprobs in zip(prompts[mine], batch.vision[mine], got.token_ids, got.logprobs):
        assert tokens, "a greedy response"
        torch.testing.assert_close(torch.tensor(logprobs), hf_row_logprobs(full, prompt, tokens, vision),
                                   atol=1e-4, rtol=0)


def main() -> None:
    topo = init_distributed(1, 2, 120)
    full, tokenizer = tiny_vl()
    actor = parallelize(copy.deepcopy(full), topo.fsdp_mesh, topo.device)
    dims = param_shard_dims(actor)
    assert dims["model.language_model.layers.0.self_attn.q_proj.weight"] == 0
    assert dims["model.language_model.layers.1.mlp.down_proj.weight"] == 1
    assert all(dim is None for name, dim in dims.items() if name.startswith("model.visual."))
    model = apply_tensor_parallel(copy.deepcopy(full), topo.gen_mesh["tp"])
    whole = dict(full.named_parameters())
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        expected = whole[name] if dims[name] is None else tp_chunk(whole[name], dims[name], 2, topo.tp_rank)
        assert torch.equal(local, expected), name
    batch, _, _ = vl_batch(tokenizer)
    inputs = vision_forward_kwargs(full.config, batch.input_ids_BT, batch.attention_mask_BT, batch.vision)
    with torch.no_grad():
        want = full(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT, **inputs).logits
        got = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT, **inputs).logits
    mask = batch.attention_mask_BT.bool()
    torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=1e-5)
    check_engine(full, actor, dims, topo, tokenizer)
    if topo.tp_rank == 0:
        Path(sys.argv[1]).write_text("ok")
    shutdown()


if __name__ == "__main__":
    main()
