"""chunked_logprobs / fused_policy_forward against the full-vocabulary fp32 path they replace.

Reference: ``log_softmax((h @ W.T).float() / T)`` gathered at the targets, entropy
``-sum p log p`` of the full softmax, gradients by autograd through those.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, Qwen2Config

from spmd_rlhf.algorithms.losses import entropy_from_logits, logprobs_from_logits
from spmd_rlhf.data.batch import collate
from spmd_rlhf.models.logprobs import chunked_logprobs, fused_policy_forward
from spmd_rlhf.models.parallelize import decoder_layers, parallelize

TOL = dict(atol=1e-5, rtol=1e-5)


def reference(hidden_NH, weight_VH, targets_N, temperature):
    logits_NV = (hidden_NH @ weight_VH.T).float()
    if temperature not in (0.0, 1.0):
        logits_NV = logits_NV / temperature
    logp_NV = F.log_softmax(logits_NV, dim=-1)
    return logp_NV.gather(1, targets_N[:, None]).squeeze(1), -(logp_NV.exp() * logp_NV).sum(-1)


def inputs(num, vocab=50, hidden=16, scale=0.5, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden_NH = torch.randn(num, hidden, generator=gen).to(dtype).requires_grad_()
    weight_VH = (scale * torch.randn(vocab, hidden, generator=gen)).to(dtype).requires_grad_()
    targets_N = torch.randint(0, vocab, (num,), generator=gen)
    coefs = torch.randn(2, num, generator=gen)
    return hidden_NH, weight_VH, targets_N, coefs


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_two_token_vocabulary_by_hand():
    """logits [ln 3, 0]: p = [3/4, 1/4]; with T = 1/2 logits [2 ln 3, 0]: p = [9/10, 1/10]."""
    hidden_NH = torch.ones(2, 1)
    weight_VH = torch.tensor([[math.log(3.0)], [0.0]])
    lp, ent = chunked_logprobs(hidden_NH, weight_VH, torch.tensor([0, 1]), chunk_tokens=1)
    assert_close(lp, torch.tensor([math.log(0.75), math.log(0.25)]))
    assert_close(ent, torch.full((2,), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    lp, ent = chunked_logprobs(hidden_NH, weight_VH, torch.tensor([0, 1]), temperature=0.5)
    assert_close(lp, torch.tensor([math.log(0.9), math.log(0.1)]))
    assert_close(ent, torch.full((2,), -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("num, chunk", [(13, 4), (12, 4), (13, 13), (13, 64), (1, 4)])
def test_values_and_gradients_equal_the_full_path(temperature, num, chunk):
    h, w, t, (a, b) = inputs(num)
    lp, ent = chunked_logprobs(h, w, t, temperature, chunk_tokens=chunk, entropy_requires_grad=True)
    ref_lp, ref_ent = reference(h, w, t, temperature)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (num,)
    assert_close(lp, ref_lp, **TOL)
    assert_close(ent, ref_ent, **TOL)
    got = grads((a * lp + b * ent).sum(), h, w)
    want = grads((a * ref_lp + b * ref_ent).sum(), h, w)
    for g, r in zip(got, want):
        assert_close(g, r, **TOL)


def test_entropy_only_loss_has_exact_gradients():
    h, w, t, (_, b) = inputs(9, seed=3)
    _, ent = chunked_logprobs(h, w, t, 0.7, chunk_tokens=4, entropy_requires_grad=True)
    _, ref_ent = reference(h, w, t, 0.7)
    for g, r in zip(grads((b * ent).sum(), h, w), grads((b * ref_ent).sum(), h, w)):
        assert_close(g, r, **TOL)


def test_entropy_without_grad_is_detached_and_leaves_the_logprob_gradients_exact():
    h, w, t, (a, _) = inputs(11, seed=1)
    lp, ent = chunked_logprobs(h, w, t, 0.7, chunk_tokens=4, entropy_requires_grad=False)
    assert not ent.requires_grad and ent.grad_fn is None
    ref_lp, ref_ent = reference(h, w, t, 0.7)
    assert_close(ent, ref_ent.detach(), **TOL)
    loss = (a * lp).sum() + ent.sum()  # the entropy term is a constant here
    ref_loss = (a * ref_lp).sum() + ref_ent.detach().sum()
    for g, r in zip(grads(loss, h, w), grads(ref_loss, h, w)):
        assert_close(g, r, **TOL)
    lp_only, none = chunked_logprobs(h, w, t, 0.7, chunk_tokens=4, with_entropy=False)
    assert none is None
    assert_close(lp_only, lp, atol=0.0, rtol=0.0)


def test_no_selected_token_gives_empty_outputs_and_zero_gradients():
    h, w, t, _ = inputs(0)
    lp, ent = chunked_logprobs(h, w, t, 0.7, entropy_requires_grad=True)
    assert lp.shape == ent.shape == (0,)
    gh, gw = grads(lp.sum() + ent.sum(), h, w)
    assert gh.shape == h.shape and gw.shape == w.shape and not gw.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 300.0, 3e4])
def test_logprobs_are_never_positive_and_always_finite(dtype, scale):
    """Large logits (|z| up to ~1e5): the fp32 logsumexp still bounds every picked logit."""
    h, w, _, _ = inputs(64, vocab=97, scale=scale, seed=2, dtype=dtype)
    argmax_N = (h @ w.T).float().argmax(-1)
    targets_N = torch.cat([argmax_N[:32], torch.randint(0, 97, (32,))])  # likeliest tokens too
    for temperature in (1.0, 0.7):
        lp, ent = chunked_logprobs(h, w, targets_N, temperature, chunk_tokens=10)
        assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
        assert (lp <= 0).all(), lp.max()
        assert (ent >= 0).all() and (ent <= math.log(97) + 1e-4).all()


def test_bfloat16_matches_the_bf16_logits_path_and_keeps_dtypes():
    """Same numerics as today's GPU path: bf16 matmul, fp32 log-softmax of the rounded logits."""
    h, w, t, (a, b) = inputs(20, seed=4, dtype=torch.bfloat16)
    lp, ent = chunked_logprobs(h, w, t, 0.7, chunk_tokens=8, entropy_requires_grad=True)
    ref_lp, ref_ent = reference(h, w, t, 0.7)
    assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    got = grads((a * lp + b * ent).sum(), h, w)
    want = grads((a * ref_lp + b * ref_ent).sum(), h, w)
    for g, r in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert_close(g.float(), r.float(), atol=2e-2, rtol=2e-2)


# --- the FSDP2 model path --------------------------------------------------------------------------


def tiny_qwen2(mesh, tied: bool, bf16_compute: bool = False, checkpointing: bool = False):
    """A 2-layer Qwen2 (vocab 37) under FSDP2; ``mesh=None``: the plain module."""
    config = Qwen2Config(vocab_size=37, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    if mesh is None:
        return model
    if not bf16_compute:
        return parallelize(model.train(), mesh, torch.device("cpu"), activation_checkpointing=checkpointing)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)  # the GPU setting
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def token_logits(model, batch, temperature):
    """The actor's dense path: fp32 full-vocabulary logits / T at every predicting position."""
    out = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT,
                position_ids=batch.position_ids_BT, use_cache=False)
    logits = out.logits[:, :-1].float()
    return logits / temperature if temperature not in (0.0, 1.0) else logits


def padded_batch():
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 36, (n,), generator=gen).tolist() for n in (3, 5, 2)]
    responses = [torch.randint(1, 36, (n,), generator=gen).tolist() for n in (4, 1, 6)]
    return collate(prompts, responses, pad_id=0)


def full_grads(model):
    out = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("tied, checkpointing", [(True, False), (False, False), (True, True)])
def test_fsdp2_model_path_equals_token_logits_path(world_of_one, tied, checkpointing):
    model = tiny_qwen2(world_of_one, tied, checkpointing=checkpointing)
    assert model.model.gradient_checkpointing == checkpointing
    batch, temperature = padded_batch(), 0.7
    mask = batch.loss_mask_BT
    assert (batch.attention_mask_BT == 0).any() and mask.sum() == 11
    a, b = torch.randn(2, *mask.shape, generator=torch.Generator().manual_seed(6))

    logits = token_logits(model, batch, temperature)
    ref_lp = logprobs_from_logits(logits, batch.input_ids_BT[:, 1:])
    ref_ent = entropy_from_logits(logits)
    (mask * (a * ref_lp + b * ref_ent)).sum().backward()
    want = full_grads(model)

    lp, ent = fused_policy_forward(model, batch.input_ids_BT, batch.attention_mask_BT, batch.position_ids_BT,
                                   mask.bool(), temperature, entropy_requires_grad=True, chunk_tokens=4)
    assert lp.shape == ent.shape == mask.shape
    assert_close(lp, ref_lp.detach() * mask, **TOL)
    assert_close(ent, ref_ent.detach() * mask, **TOL)
    (mask * (a * lp + b * ent)).sum().backward()
    got = full_grads(model)
    assert got.keys() == want.keys()
    for name in want:
        assert_close(got[name], want[name], **TOL, msg=lambda m: f"{name}: {m}")
    assert want["model.embed_tokens.weight"].abs().sum() > 0


def test_fsdp2_model_keeps_its_logits_forward_and_scores_without_grad(world_of_one):
    model = tiny_qwen2(world_of_one, tied=True)
    batch = padded_batch()
    with torch.no_grad():
        before = token_logits(model, batch, 1.0)
        lp, ent = fused_policy_forward(model, batch.input_ids_BT, batch.attention_mask_BT, batch.position_ids_BT,
                                       batch.loss_mask_BT.bool(), 1.0, with_entropy=False)
        after = token_logits(model, batch, 1.0)
    model.reshard()
    assert ent is None and not lp.requires_grad
    assert_close(after, before, atol=0.0, rtol=0.0)
    ref_lp = logprobs_from_logits(before, batch.input_ids_BT[:, 1:]) * batch.loss_mask_BT
    assert_close(lp, ref_lp, **TOL)


def test_fsdp2_bf16_compute_gives_bf16_head_gradients_close_to_the_dense_path(world_of_one):
    """FSDP2 with bf16 parameters (the GPU policy): the head runs in bf16, its weight gradient is
    accumulated in fp32, handed to FSDP in bf16 and reduced into the fp32 master weights."""
    model = tiny_qwen2(world_of_one, tied=True, bf16_compute=True)
    batch, mask = padded_batch(), padded_batch().loss_mask_BT
    a, b = torch.randn(2, *mask.shape, generator=torch.Generator().manual_seed(7))
    logits = token_logits(model, batch, 0.7)
    ref_lp, ref_ent = logprobs_from_logits(logits, batch.input_ids_BT[:, 1:]), entropy_from_logits(logits)
    (mask * (a * ref_lp + b * ref_ent)).sum().backward()
    want = full_grads(model)
    lp, ent = fused_policy_forward(model, batch.input_ids_BT, batch.attention_mask_BT, batch.position_ids_BT,
                                   mask.bool(), 0.7, entropy_requires_grad=True, chunk_tokens=4)
    assert_close(lp, ref_lp.detach() * mask, **TOL)  # same bf16 logits, same fp32 reductions
    assert_close(ent, ref_ent.detach() * mask, **TOL)
    (mask * (a * lp + b * ent)).sum().backward()
    for name, got in full_grads(model).items():
        assert got.dtype == torch.float32
        assert (got - want[name]).norm() <= 1e-2 * want[name].norm(), name


def test_decoder_keywords_pass_through_and_no_attention_mask_is_allowed():
    """Unpadded rows with ``attention_mask=None`` (the packed layout's call) on a plain module; an
    extra decoder keyword reaches the decoder body."""
    model = tiny_qwen2(None, tied=True)
    seen = {}
    model.model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    ids_BT = torch.randint(1, 36, (2, 6), generator=torch.Generator().manual_seed(8))
    positions_BT, select_BT = torch.arange(6).expand(2, 6), torch.rand(2, 5, generator=torch.Generator().manual_seed(9)) < 0.7
    with torch.no_grad():
        lp, _ = fused_policy_forward(model, ids_BT, None, positions_BT, select_BT, 0.7, output_hidden_states=False)
        logits = model(input_ids=ids_BT, position_ids=positions_BT).logits[:, :-1].float() / 0.7
    assert seen["attention_mask"] is None and seen["output_hidden_states"] is False
    assert_close(lp, logprobs_from_logits(logits, ids_BT[:, 1:]) * select_BT, **TOL)
