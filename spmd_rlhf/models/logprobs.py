"""Per-token logprobs and entropies of a causal LM without a full-vocabulary fp32 logits tensor.

What it computes, for N selected positions with hidden states h_n, the output embedding W [V, H]
(no bias) and the sampling temperature T (0 and 1 mean "no division", as in the actor):

    z_n      = (h_n @ W.T).float() / T                 # matmul in the input dtype, fp32 after
    logprob  = z_n[target_n] - logsumexp(z_n)           # always <= 0: logsumexp >= max >= z[target]
    entropy  = -sum_v p_nv log p_nv,  p_n = softmax(z_n)

the values of ``log_softmax(logits / T).gather(target)`` and ``entropy_from_logits`` (up to
float summation order).

Memory: the tokens are processed ``chunk_tokens`` at a time, so the temporaries are a few
``[chunk, V]`` blocks (one in the input dtype, two or three in fp32) instead of ``[N, V]`` ones:
O(chunk * V), independent of N. Autograd saves only hidden, weight, targets and two fp32 numbers
per token (logsumexp, entropy). The backward recomputes each chunk's logits (one extra lm_head
matmul per chunk, three in the backward in all) and accumulates the weight gradient in one fp32
``[V, H]`` buffer, cast to the weight's dtype at the end. The entropy's gradient is exact when asked for, and when not it is a detached
output that adds nothing to the backward.

``fused_policy_forward`` runs this inside the forward of an FSDP2-wrapped HF causal LM (the root
module, whose hooks gather the embedding / final norm / lm_head and reduce their gradients).
"""

from __future__ import annotations

import types

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from .vlm import decoder_hidden

DEFAULT_CHUNK_TOKENS = 1024


def _scaled_logits(hidden_CH: Tensor, weight_VH: Tensor, temperature: float) -> Tensor:
    """fp32 logits / T of one chunk; the matmul runs in the input dtype (bf16 on the GPU)."""
    logits_CV = (hidden_CH @ weight_VH.T).float()
    return logits_CV.div_(temperature) if temperature not in (0.0, 1.0) else logits_CV


def _accumulate_weight_grad_(acc_VH: Tensor, grad_CV: Tensor, hidden_CH: Tensor) -> None:
    """acc += grad.T @ hidden with an fp32 accumulator, also for bf16 operands."""
    if grad_CV.dtype == acc_VH.dtype:
        acc_VH.addmm_(grad_CV.T, hidden_CH)
    elif acc_VH.device.type == "cuda":
        torch.addmm(acc_VH, grad_CV.T, hidden_CH, out_dtype=acc_VH.dtype, out=acc_VH)
    else:
        acc_VH.add_((grad_CV.T @ hidden_CH).float())


class _ChunkedLogprobs(torch.autograd.Function):
    """Chunked lm_head + log-softmax whose backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, temperature, chunk_tokens, with_entropy, entropy_grad):
        num = hidden_NH.shape[0]
        logprobs_N = hidden_NH.new_empty(num, dtype=torch.float32)
        lse_N = torch.empty_like(logprobs_N)
        entropy_N = torch.empty_like(logprobs_N) if with_entropy else logprobs_N.new_empty(0)
        for start in range(0, num, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits_CV = _scaled_logits(hidden_NH[rows], weight_VH, temperature)
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            picked_C = logits_CV.gather(1, targets_N[rows, None]).squeeze(1)
            logprobs_N[rows] = picked_C - lse_C
            lse_N[rows] = lse_C
            if with_entropy:
                logp_CV = logits_CV.sub_(lse_C[:, None])  # in place: z - lse = log p, no cancellation
                entropy_N[rows] = -(logp_CV.exp().mul_(logp_CV)).sum(dim=-1)
            del logits_CV
        ctx.temperature, ctx.chunk_tokens, ctx.entropy_grad = temperature, chunk_tokens, entropy_grad
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden_NH, weight_VH, targets_N, lse_N, entropy_N if entropy_grad else None)
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy_N)
        return logprobs_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logprobs_N, grad_entropy_N):
        hidden_NH, weight_VH, targets_N, lse_N, entropy_N = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        use_entropy = ctx.entropy_grad and grad_entropy_N is not None
        if grad_logprobs_N is None:
            grad_logprobs_N = lse_N.new_zeros(lse_N.shape)
        grad_hidden_NH = torch.empty_like(hidden_NH) if need_hidden else None
        grad_weight_VH = weight_VH.new_zeros(weight_VH.shape, dtype=torch.float32) if need_weight else None
        for start in range(0, hidden_NH.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            hidden_CH = hidden_NH[rows]
            g_lp_C1 = grad_logprobs_N[rows, None].float()
            logp_CV = _scaled_logits(hidden_CH, weight_VH, ctx.temperature).sub_(lse_N[rows, None])
            if use_entropy:
                # dH/dz_v = -p_v (log p_v + H);  dlogprob/dz_v = 1[v = target] - p_v
                grad_CV = logp_CV.exp()
                coef_CV = logp_CV.add_(entropy_N[rows, None]).mul_(grad_entropy_N[rows, None].float()).add_(g_lp_C1)
                grad_CV.mul_(coef_CV).neg_()
                del coef_CV, logp_CV
            else:
                grad_CV = logp_CV.exp_().mul_(-g_lp_C1)
            grad_CV.scatter_add_(1, targets_N[rows, None], g_lp_C1)
            if ctx.temperature not in (0.0, 1.0):
                grad_CV.div_(ctx.temperature)
            grad_CV = grad_CV.to(hidden_NH.dtype)
            if need_hidden:
                grad_hidden_NH[rows] = grad_CV @ weight_VH
            if need_weight:
                _accumulate_weight_grad_(grad_weight_VH, grad_CV, hidden_CH)
            del grad_CV
        if need_weight:
            grad_weight_VH = grad_weight_VH.to(weight_VH.dtype)
        return grad_hidden_NH, grad_weight_VH, None, None, None, None, None


def chunked_logprobs(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    targets_N: Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    with_entropy: bool = True,
    entropy_requires_grad: bool = False,
    bias_V: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """fp32 ``(logprobs_N, entropy_N)`` of ``targets_N`` under ``softmax((hidden @ weight.T) / T)``.

    ``entropy_N`` is None without ``with_entropy``, and detached unless ``entropy_requires_grad``.
    """
    assert bias_V is None, "an lm_head bias is not supported (Qwen2/Llama heads have none)"
    assert hidden_NH.dim() == 2 and weight_VH.dim() == 2 and hidden_NH.shape[1] == weight_VH.shape[1]
    assert targets_N.shape == hidden_NH.shape[:1] and not targets_N.dtype.is_floating_point
    assert hidden_NH.dtype == weight_VH.dtype, f"{hidden_NH.dtype} hidden vs {weight_VH.dtype} weight"
    assert chunk_tokens > 0 and temperature >= 0.0
    assert not isinstance(weight_VH, DTensor), "a sharded weight: call inside the FSDP root's forward"
    if entropy_requires_grad:
        assert with_entropy, "entropy_requires_grad needs with_entropy"
    logprobs_N, entropy_N = _ChunkedLogprobs.apply(
        hidden_NH.contiguous(), weight_VH, targets_N.contiguous(), float(temperature), int(chunk_tokens),
        bool(with_entropy), bool(entropy_requires_grad))
    return logprobs_N, (entropy_N if with_entropy else None)


def _policy_head_forward(model: torch.nn.Module, select_BT: Tensor, temperature: float, chunk_tokens: int,
                         with_entropy: bool, entropy_requires_grad: bool, input_ids: Tensor,
                         **decoder_kwargs) -> tuple[Tensor, Tensor | None]:
    """The replacement root forward: decoder body, then chunked_logprobs at the selected positions
    (column t of ``select_BT`` predicts ``input_ids[:, t + 1]`` from the hidden state at t)."""
    batch, length = input_ids.shape
    assert select_BT.shape == (batch, length - 1) and select_BT.dtype == torch.bool, select_BT.shape
    head = model.get_output_embeddings()
    assert getattr(head, "bias", None) is None, "an lm_head bias is not supported"
    for knob in ("final_logit_softcapping", "logit_scale", "logits_scaling"):  # heads that rescale logits
        assert getattr(model.config, knob, None) is None, f"{knob} is not supported"
    hidden_BTH = decoder_hidden(model, input_ids, **decoder_kwargs)
    hidden_NH = hidden_BTH[:, :-1][select_BT]
    targets_N = input_ids[:, 1:][select_BT]
    logprobs_N, entropy_N = chunked_logprobs(hidden_NH, head.weight, targets_N, temperature, chunk_tokens,
                                             with_entropy, entropy_requires_grad)

    def place(values_N: Tensor) -> Tensor:
        return values_N.new_zeros(select_BT.shape).masked_scatter(select_BT, values_N)

    return place(logprobs_N), (place(entropy_N) if entropy_N is not None else None)


def _policy_forward(self, *args, select_BT: Tensor | None = None, temperature: float = 1.0,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS, with_entropy: bool = True,
                    entropy_requires_grad: bool = False, **kwargs):
    if select_BT is None:
        return self._dense_forward(*args, **kwargs)
    assert not args, "call the policy head with keyword arguments"
    return _policy_head_forward(self, select_BT, temperature, chunk_tokens, with_entropy, entropy_requires_grad,
                                **kwargs)


def install_policy_head(model: torch.nn.Module) -> torch.nn.Module:
    """Give ``model`` (an HF causal LM, FSDP2-wrapped or not) a forward that, when called with a
    ``select_BT`` keyword, returns ``(logprobs_BT, entropy_BT)`` instead of logits. Without it the
    forward is the original one. Idempotent; bound methods, so ``copy.deepcopy`` rebinds them."""
    if "_dense_forward" not in model.__dict__:
        model._dense_forward = model.forward
        model.forward = types.MethodType(_policy_forward, model)
    return model


def fused_policy_forward(
    model: torch.nn.Module,
    input_ids_BT: Tensor,
    attention_mask_BT: Tensor | None,
    position_ids_BT: Tensor,
    select_BT: Tensor,
    temperature: float,
    with_entropy: bool = True,
    entropy_requires_grad: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    **decoder_kwargs,
) -> tuple[Tensor, Tensor | None]:
    """fp32 ``(logprobs_BT, entropy_BT)`` ``[B, T-1]`` of the next tokens, zero outside
    ``select_BT`` (e.g. ``loss_mask_BT.bool()``). The call goes through ``model.__call__`` so that
    FSDP2's root hooks gather the head's parameters and reduce their gradients. ``decoder_kwargs``
    (e.g. packed-sequence boundaries for the attention) go to the decoder body unchanged."""
    install_policy_head(model)
    return model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, position_ids=position_ids_BT,
                 select_BT=select_BT.bool(), temperature=temperature, chunk_tokens=chunk_tokens,
                 with_entropy=with_entropy, entropy_requires_grad=entropy_requires_grad, **decoder_kwargs)
