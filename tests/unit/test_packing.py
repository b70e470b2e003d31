"""Token-budget plans, packing layout, and packed == padded forwards/gradients on a tiny Qwen2.

Hand example (``hand_batch``), rows as (prompt | response):
  row 0: 5 6 | 7 8 9   (len 5)  loss columns 1, 2, 3
  row 1: 10 | 11       (len 2)  loss column 0
  row 2: 12 13 14 | 15 (len 4)  loss column 2
Packed in the order [2, 0, 1]: 12 13 14 15 5 6 7 8 9 10 11 (N = 11, M = 10).
"""

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, Qwen2Config
from transformers.masking_utils import causal_mask_function, sdpa_mask

from spmd_rlhf.data.batch import collate
from spmd_rlhf.data.packing import _split_heaviest, count_micro_batches, pack, plan_micro_batches
from spmd_rlhf.models.attention import (
    VARLEN,
    packed_forward_kwargs,
    register,
    use_packed_attention,
    varlen_attention_forward,
    varlen_kernel_available,
    varlen_mask,
)

VOCAB = 40


def skewed_lengths(count: int, seed: int) -> list[int]:
    """Mostly short rows with a long tail (lognormal, 4..~400 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(count, generator=gen) * 0.9 + 3.6).exp().clamp(4, 400).long().tolist()


def check_plan(groups: list[list[int]], lengths: list[int], max_tokens: int) -> None:
    assert sorted(i for g in groups for i in g) == list(range(len(lengths))), "every row exactly once"
    for g in groups:
        assert len(g) <= 1 or sum(lengths[i] for i in g) <= max_tokens, (g, max_tokens)


# -- planning ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_tokens", [64, 300, 1000])
def test_plan_respects_budget_and_covers_rows(seed, max_tokens):
    lengths = skewed_lengths(50, seed)
    groups = plan_micro_batches(lengths, max_tokens)
    check_plan(groups, lengths, max_tokens)
    assert all(groups), "no empty group without num_micro"
    assert count_micro_batches(lengths, max_tokens) == len(groups)
    fitting = [n for n in lengths if n <= max_tokens]
    assert len(groups) >= len(lengths) - len(fitting) + -(-sum(fitting) // max_tokens)


def test_plan_oversized_rows_alone_and_deterministic():
    lengths = [500, 20, 700, 30, 10, 90]
    groups = plan_micro_batches(lengths, 100)
    check_plan(groups, lengths, 100)
    assert [0] in groups and [2] in groups
    assert plan_micro_batches(lengths, 100) == groups
    assert plan_micro_batches(skewed_lengths(64, 7), 500) == plan_micro_batches(skewed_lengths(64, 7), 500)


def test_plan_balance_on_skewed_lengths():
    """Greedy into the lightest group bounds the heaviest by mean + (1 - 1/k) * longest row;
    longest-first makes it far tighter on a long-tailed list: within 10% of the mean here."""
    lengths = skewed_lengths(128, 3)
    for max_tokens in (800, 1500, 3000):
        groups = plan_micro_batches(lengths, max_tokens)
        loads = [sum(lengths[i] for i in g) for g in groups]
        k, mean = len(groups), sum(lengths) / len(groups)
        assert max(loads) <= mean + (1 - 1 / k) * max(lengths)
        assert max(loads) <= 1.10 * mean, (max_tokens, loads)


@pytest.mark.parametrize("extra", [1, 3, 10])
def test_plan_forced_count(extra):
    lengths = skewed_lengths(40, 11)
    own = count_micro_batches(lengths, 600)
    groups = plan_micro_batches(lengths, 600, num_micro=own + extra)
    assert len(groups) == own + extra and all(groups)
    check_plan(groups, lengths, 600)
    assert plan_micro_batches(lengths, 600, num_micro=own) == plan_micro_batches(lengths, 600)
    with pytest.raises(AssertionError, match="below this rank's own count"):
        plan_micro_batches(lengths, 600, num_micro=own - 1)


def test_plan_more_groups_than_rows_gives_trailing_empty_groups():
    groups = plan_micro_batches([5, 9, 3], 100, num_micro=5)
    assert groups[3:] == [[], []] and sorted(i for g in groups[:3] for i in g) == [0, 1, 2]
    assert all(len(g) == 1 for g in groups[:3])
    assert plan_micro_batches([], 100, num_micro=2) == [[], []]


def test_split_heaviest_keeps_budget():
    lengths = [30, 30, 20, 20, 5, 40]
    groups = [[0, 1, 2, 3], [4], [5]]
    _split_heaviest(groups, lengths)
    assert len(groups) == 4
    check_plan(groups, lengths, 100)
    assert sorted(sum(lengths[i] for i in g) for g in groups[:1] + groups[3:]) == [50, 50]


# -- packing layout ---------------------------------------------------------------------------

def hand_batch():
    return collate([[5, 6], [10], [12, 13, 14]], [[7, 8, 9], [11], [15]], pad_id=0)


def test_pack_hand_example_layout_and_loss_mask():
    batch = hand_batch()
    p = pack(batch, [2, 0, 1])
    assert p.input_ids_1N.tolist() == [[12, 13, 14, 15, 5, 6, 7, 8, 9, 10, 11]]
    assert p.position_ids_1N.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1]]
    assert p.cu_seqlens.tolist() == [0, 4, 9, 11] and p.cu_seqlens.dtype == torch.int32
    assert p.max_seqlen == 5 and p.width == 4 and p.lengths == [4, 5, 2] and p.num_tokens == 11
    # column i predicts token i+1; columns 3 and 8 would cross into the next sequence
    assert p.loss_mask_1M.tolist() == [[0, 0, 1, 0, 0, 1, 1, 1, 0, 1]]
    assert p.input_ids_1N[0, 1:][p.loss_mask_1M[0].bool()].tolist() == [15, 7, 8, 9, 11]
    assert p.index_K.tolist() == [0, 1, 2, 4, 5, 6, 7, 9]
    assert p.row_K.tolist() == [0, 0, 0, 1, 1, 1, 1, 2] and p.col_K.tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert_close(p.unpack(p.loss_mask_1M), batch.loss_mask_BT[[2, 0, 1]])


def test_pack_unpack_round_trip():
    batch = collate([[1, 2, 3], [4], [5, 6], [7]], [[8, 9], [10, 11, 12, 13], [], [14]], pad_id=0)
    rows = [3, 1, 0, 2]
    p = pack(batch, rows)
    lengths = batch.attention_mask_BT.sum(1)[rows]
    valid_SW = torch.arange(p.width)[None, :] < (lengths - 1)[:, None]
    values_SW = torch.randn(len(rows), p.width)
    packed_1M = p.pack_values(values_SW)
    assert torch.equal(p.unpack(packed_1M), values_SW * valid_SW)
    predicts_1M = torch.zeros_like(packed_1M)
    predicts_1M[0, p.index_K] = 1
    assert torch.equal(p.pack_values(p.unpack(packed_1M)), packed_1M * predicts_1M)
    assert torch.equal(p.unpack(packed_1M, (4, p.width + 3))[:, : p.width], values_SW * valid_SW)
    assert torch.equal(p.pack_values(batch.loss_mask_BT[rows]), p.loss_mask_1M)


def test_pack_rejects_left_padding():
    batch = hand_batch()
    batch.attention_mask_BT[1] = torch.tensor([0, 0, 0, 1, 1])
    with pytest.raises(AssertionError, match="right-padded"):
        pack(batch, [1])


# -- packed forwards on a tiny Qwen2 ----------------------------------------------------------

def tiny_qwen2(kv_heads: int, attn: str) -> torch.nn.Module:
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.uniform_(0.8, 1.2) if "norm" in name else param.normal_(0.0, 0.1)
    if attn == VARLEN:
        use_packed_attention(model)
    return model


def random_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = [(3, 5), (1, 2), (6, 8), (2, 1), (4, 4)]
    prompts = [torch.randint(1, VOCAB, (p,), generator=gen).tolist() for p, _ in shape]
    responses = [torch.randint(1, VOCAB, (r,), generator=gen).tolist() for _, r in shape]
    return collate(prompts, responses, pad_id=0)


def next_logprobs(logits_BTV, ids_BT):
    return torch.log_softmax(logits_BTV[:, :-1].float(), -1).gather(-1, ids_BT[:, 1:, None]).squeeze(-1)


def padded_pass(model, batch, weights_BT):
    lp_BT = next_logprobs(model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT,
                                position_ids=batch.position_ids_BT, use_cache=False).logits, batch.input_ids_BT)
    mask = batch.loss_mask_BT
    return lp_BT, (lp_BT * weights_BT * mask).sum() / mask.sum()


def packed_pass(model, packed, weights_SW, with_kwargs: bool = True):
    extra = packed_forward_kwargs(packed) if with_kwargs else {}
    logits = model(input_ids=packed.input_ids_1N, position_ids=packed.position_ids_1N, attention_mask=None,
                   use_cache=False, **extra).logits
    lp_1M = next_logprobs(logits, packed.input_ids_1N)
    mask = packed.loss_mask_1M
    return lp_1M, (lp_1M * packed.pack_values(weights_SW) * mask).sum() / mask.sum()


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn,kv_heads,with_kwargs,checkpointing", [
    ("sdpa", 2, True, False),
    (VARLEN, 2, True, False),
    (VARLEN, 1, True, False),
    (VARLEN, 2, False, False),
    ("sdpa", 1, True, True),
    (VARLEN, 1, True, True),
])
def test_packed_equals_padded(attn, kv_heads, with_kwargs, checkpointing):
    model = tiny_qwen2(kv_heads, attn)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # dropout is 0: train mode only arms the checkpointing
    batch = random_batch()
    weights_BT = torch.randn(batch.loss_mask_BT.shape, generator=torch.Generator().manual_seed(1))
    rows = [2, 4, 0, 3, 1]
    lp_BT, loss_padded = padded_pass(model, batch, weights_BT)
    want = grads(model, loss_padded)
    packed = pack(batch, rows)
    lp_1M, loss_packed = packed_pass(model, packed, weights_BT[rows], with_kwargs)
    got = grads(model, loss_packed)
    lengths = batch.attention_mask_BT.sum(1)[rows]
    valid_SW = torch.arange(packed.width)[None, :] < (lengths - 1)[:, None]
    assert_close(packed.unpack(lp_1M.detach()), lp_BT.detach()[rows] * valid_SW, atol=1e-5, rtol=0)
    assert_close(loss_packed, loss_padded, atol=1e-6, rtol=0)
    for name in want:
        assert_close(got[name], want[name], atol=1e-5, rtol=0, msg=name)


def test_unpacked_loss_gradient_equals_packed_layout_loss():
    """The actor may unpack logprobs to [S, W] and reuse its padded losses: same gradients."""
    model = tiny_qwen2(2, VARLEN)
    batch = random_batch(3)
    weights_BT = torch.randn(batch.loss_mask_BT.shape, generator=torch.Generator().manual_seed(4))
    rows = [1, 3, 4]
    packed = pack(batch, rows)
    lp_1M, loss_packed = packed_pass(model, packed, weights_BT[rows])
    want = grads(model, loss_packed)
    lp_1M, _ = packed_pass(model, packed, weights_BT[rows])
    mask_SW = batch.loss_mask_BT[rows, : packed.width]
    loss = (packed.unpack(lp_1M) * weights_BT[rows, : packed.width] * mask_SW).sum() / mask_SW.sum()
    got = grads(model, loss)
    for name in want:
        assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)


def test_varlen_padded_forward_is_sdpa():
    batch = random_batch(5)
    sdpa, varlen = tiny_qwen2(2, "sdpa"), tiny_qwen2(2, VARLEN)
    for rows in (slice(None), slice(0, 1), slice(3, 4)):
        micro = batch.select(rows)
        kwargs = dict(input_ids=micro.input_ids_BT, attention_mask=micro.attention_mask_BT,
                      position_ids=micro.position_ids_BT, use_cache=False)
        assert torch.equal(varlen(**kwargs).logits, sdpa(**kwargs).logits)


def test_empty_group_dummy_runs_forward_and_backward():
    model = tiny_qwen2(1, VARLEN)
    batch = random_batch()
    dummy = pack(batch, [])
    assert dummy.num_tokens == 2 and dummy.loss_mask_1M.sum() == 0
    lp_1M, _ = packed_pass(model, dummy, torch.zeros(0, 1))
    values = dummy.unpack(lp_1M, (0, 7))
    assert values.shape == (0, 7) and values.requires_grad
    got = grads(model, values.sum())
    assert all(float(g.abs().max()) == 0.0 for g in got.values())


def test_varlen_mask_skips_only_unpadded_single_rows():
    register()
    common = dict(mask_function=causal_mask_function, dtype=torch.float32, device=torch.device("cpu"))
    assert varlen_mask(batch_size=1, q_length=9, kv_length=9, attention_mask=None, **common) is None
    padded = torch.tensor([[True, True, False], [True, True, True]])
    want = sdpa_mask(batch_size=2, q_length=3, kv_length=3, attention_mask=padded, **common)
    assert want is not None
    assert torch.equal(varlen_mask(batch_size=2, q_length=3, kv_length=3, attention_mask=padded, **common), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_heads", [1, 4])
def test_cuda_varlen_kernel_matches_per_sequence(kv_heads):
    """bf16 on CUDA takes torch's varlen kernel; fp32 takes the per-sequence loop: same values."""
    assert varlen_kernel_available(torch.device("cuda"), torch.bfloat16, 64)
    gen = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, 17, 50, 51, 128], dtype=torch.int32, device="cuda")
    q = torch.randn(1, 8, 128, 64, device="cuda", generator=gen)
    k, v = (torch.randn(1, kv_heads, 128, 64, device="cuda", generator=gen) for _ in range(2))
    module = torch.nn.Module()
    kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=77, max_length_k=77, scaling=0.125)
    inputs = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out, _ = varlen_attention_forward(module, *inputs, None, **kwargs)
    out.float().square().sum().backward()
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    ref, _ = varlen_attention_forward(module, *ref_inputs, None, **kwargs)
    ref.square().sum().backward()
    assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(inputs, ref_inputs):
        assert_close(a.grad.float(), b.grad, atol=5e-2, rtol=5e-2)
