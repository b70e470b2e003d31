"""Mixture-of-experts policies (Qwen3-MoE, Qwen2-MoE): which modules route, and the router's
auxiliary load-balancing loss in training.

Hugging Face keeps a sparse block's experts fused: ``mlp.experts.gate_up_proj [E, 2I, H]`` and
``mlp.experts.down_proj [E, H, I]``, with the router ``mlp.gate.weight [E, H]``. FSDP2 shards
those on dim 0, so each rank holds whole experts (``ceil(E / dp_shard)`` of them) between passes.

The auxiliary loss is the Switch-Transformer balance term of Hugging Face's
``load_balancing_loss_func``, per MoE layer and averaged over layers::

    aux_l = E * sum_e f_e * P_e     f_e: share of the top-k assignments that go to expert e (x k),
                                    P_e: mean router probability of expert e, over the tokens

(HF pools every layer's counts before the product; the mean of per-layer terms keeps each layer's
routing balanced on its own and needs no logits kept across layers). It counts every token of
the forward that the attention mask keeps (prompt and response, no padding), and it is added to
the loss without touching the loss code: the router's scores carry it into the backward
(``_AddAuxGrad``, Megatron's ``MoEAuxLossAutoScaler``), so every micro-batch forward with
gradients adds ``coef * mean_l aux_l`` of its own tokens, and FSDP averages it over ranks like the
policy loss. Forwards without gradients (log-probs, reference, rollout) are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def is_moe_block(module: torch.nn.Module) -> bool:
    """A Hugging Face sparse MoE block: a router ``gate`` module and fused ``experts``."""
    return isinstance(getattr(module, "experts", None), torch.nn.Module) and isinstance(
        getattr(module, "gate", None), torch.nn.Module)


def moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every sparse MoE block of ``model`` (empty for a dense model)."""
    return [m for m in model.modules() if is_moe_block(m)]


def default_router_aux_loss_coef(hf_config) -> float:
    """The weight the model's own config gives its balance loss (Qwen3-MoE: 0.001); 0 if none."""
    return float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0)


def balance_loss(router_logits_NE: Tensor, top_k: int, keep_N: Tensor | None = None) -> Tensor:
    """``E * sum_e f_e * P_e`` of one layer over the kept tokens (fp32, 0-dim); ``k`` at perfect balance."""
    num_experts = router_logits_NE.shape[-1]
    probs_NE = torch.softmax(router_logits_NE.float(), dim=-1)
    chosen_NK = probs_NE.topk(top_k, dim=-1).indices
    weight_N = probs_NE.new_ones(probs_NE.shape[0]) if keep_N is None else keep_N.to(probs_NE.dtype)
    count = weight_N.sum().clamp(min=1.0)
    assigned_E = probs_NE.new_zeros(num_experts).scatter_add_(0, chosen_NK.reshape(-1), weight_N.repeat_interleave(top_k))
    mean_prob_E = (probs_NE * weight_N[:, None]).sum(dim=0)
    return num_experts * (assigned_E / count * mean_prob_E / count).sum()


class _AddAuxGrad(torch.autograd.Function):
    """Identity on ``scores``; the backward also sends gradient 1 into ``aux`` (already weighted)."""

    @staticmethod
    def forward(ctx, scores, aux):
        ctx.save_for_backward(aux)
        return scores.view_as(scores)

    @staticmethod
    def backward(ctx, grad_scores):
        (aux,) = ctx.saved_tensors
        return grad_scores, torch.ones_like(aux)


@dataclass
class RouterAuxLoss:
    """The balance loss hooks of one model: ``coef`` per layer mean; ``last`` holds the most recent
    training forward's per-layer values (detached), for metrics."""

    coef: float
    num_layers: int
    top_k: int
    keep_N: Tensor | None = None
    last: list[Tensor] = field(default_factory=list)

    def remember_mask(self, module, args, kwargs) -> None:
        """Decoder pre-hook: the padding mask ``[B, T]`` of this forward, if it has one (packed rows have none)."""
        mask = kwargs.get("attention_mask")
        self.keep_N = mask.reshape(-1).bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None
        self.last = []

    def add_to_scores(self, module, args, output):
        """Router forward hook: ``(logits, scores, indices)`` with the balance loss riding on the scores."""
        if self.coef == 0.0 or not (torch.is_grad_enabled() and module.training):
            return output
        router_logits_NE, scores_NK, indices_NK = output
        keep_N = self.keep_N if self.keep_N is not None and self.keep_N.numel() == router_logits_NE.shape[0] else None
        aux = balance_loss(router_logits_NE, self.top_k, keep_N)
        self.last.append(aux.detach())
        weighted = (aux * (self.coef / self.num_layers)).to(scores_NK.dtype)
        return router_logits_NE, _AddAuxGrad.apply(scores_NK, weighted), indices_NK


def install_router_aux_loss(model: torch.nn.Module, decoder: torch.nn.Module, coef: float) -> RouterAuxLoss | None:
    """Hook the balance loss into ``model``'s routers (``decoder``: its HF decoder body, whose
    ``attention_mask`` keyword says which tokens count). None for a dense model."""
    assert coef >= 0.0, coef
    blocks = moe_blocks(model)
    if not blocks:
        return None
    aux = RouterAuxLoss(coef=coef, num_layers=len(blocks), top_k=int(model.config.num_experts_per_tok))
    decoder.register_forward_pre_hook(aux.remember_mask, with_kwargs=True)
    for block in blocks:
        block.gate.register_forward_hook(aux.add_to_scores)
    return aux
