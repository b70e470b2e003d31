"""FSDP2 for the trainable and frozen models: the one place training parallelism is applied.

Order (torchtitan's): activation checkpointing (every decoder layer, or every k-th), then
``torch.compile`` per decoder layer (optional), then ``fully_shard`` on every decoder layer, then
on the root. On CUDA trainable models keep fp32 master weights and compute in bf16 with fp32
gradient reduction (``MixedPrecisionPolicy``); a frozen model may be held in bf16 itself (no
master copy, no cast per forward). On CPU everything stays fp32. With ``cpu_offload`` the
shards, their gradients (and so the optimizer state) live in host memory under FSDP2's
``CPUOffloadPolicy``: each layer's parameters are copied to the device for its all-gather and its
reduced gradients back. Tensor parallelism for generation lives in ``distributed/tp_plan.py``.

Mixture-of-experts layers (``models/moe.py``) need nothing else: their fused expert weights
``[E, ...]`` shard on the expert dim like any parameter, so each rank stores whole experts, and a
trainable model gets the router's balance loss hooked in.

Vision-language models (``models/vlm.py``): the decoder layers are the language model's; every
vision block and then the whole vision tower (patch embedding, merger) are FSDP units of their
own, so a frozen tower (``model.vision.freeze_vision_tower``) never shares a parameter group with
trainable weights. A LoRA actor (PEFT's wrapper, ``models/lora.py``) is sharded the same way: its
adapters live in the language model's layers, its root is the wrapper.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from .lora import base_model
from .moe import default_router_aux_loss_coef, install_router_aux_loss, moe_blocks
from .vlm import is_vision_language, vision_tower


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a HF causal LM (``model.model.layers`` for Llama/Qwen/Mistral; a
    VL model's ``model.model.language_model.layers``), also under PEFT's wrapper."""
    model = base_model(model)
    if is_vision_language(model.config):
        return list(model.model.language_model.layers)
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    assert layers is not None, f"{type(model).__name__} has no model.layers; add its block list here"
    return list(layers)


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy | None:
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def frozen_dtype(device: torch.device) -> torch.dtype:
    """The dtype a frozen model is held in: bf16 where training computes in bf16 (CUDA), else fp32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def offload_policy(device: torch.device) -> CPUOffloadPolicy:
    """FSDP2's host offload; pinned host memory only where there is an accelerator to copy to."""
    return CPUOffloadPolicy(pin_memory=device.type == "cuda")


def cpu_offloaded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 root whose shards FSDP keeps in host memory (``CPUOffloadPolicy``)."""
    if not isinstance(model, FSDPModule):
        return False
    group = fully_shard.state(model)._fsdp_param_group
    return group is not None and isinstance(group.offload_policy, CPUOffloadPolicy)


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate a model sharded on meta: shards on ``device``, or in host memory where FSDP offloads
    them (it requires that); buffers (rotary tables) always on ``device``, where the forward runs."""
    if not cpu_offloaded(model):
        model.to_empty(device=device)
        return
    model.to_empty(device="cpu")
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)  # keeps persistence as it was


def parallelize(
    model: torch.nn.Module,
    mesh: DeviceMesh,
    device: torch.device,
    activation_checkpointing: bool = False,
    trainable: bool = True,
    checkpoint_every: int = 1,
    compile_layers: bool = False,
    compile_backend: str = "inductor",
    cpu_offload: bool = False,
    router_aux_loss_coef: float | None = None,
    freeze_vision_tower: bool = True,
) -> FSDPModule:
    """Shard ``model`` (full weights on the CPU) over ``mesh`` and move the shards to ``device``.

    With ``activation_checkpointing``, layers ``0, k, 2k, ...`` (``k = checkpoint_every``) recompute
    their activations in backward; the others keep them (less recompute, more memory). A frozen
    model (the reference policy) gets ``requires_grad_(False)`` and keeps nothing for backward.
    ``cpu_offload`` keeps the shards (and gradients) in host memory (``CPUOffloadPolicy``).
    A trainable MoE model adds ``router_aux_loss_coef`` times its routers' balance loss to every
    backward (``models/moe.py``; None: the coefficient of the model's config, 0 if it names none).
    A trainable VL model keeps its vision tower's weights with ``freeze_vision_tower``.
    """
    assert checkpoint_every >= 1
    base = base_model(model)
    if trainable and moe_blocks(base):
        coef = default_router_aux_loss_coef(base.config) if router_aux_loss_coef is None else router_aux_loss_coef
        install_router_aux_loss(base, base.get_decoder(), coef)
    if activation_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for index, layer in enumerate(decoder_layers(model)):
            layer.gradient_checkpointing = index % checkpoint_every == 0
    if compile_layers:
        for layer in decoder_layers(model):
            layer.compile(backend=compile_backend, dynamic=True)  # sequence lengths change every micro-batch
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    elif freeze_vision_tower and is_vision_language(base.config):
        vision_tower(base).requires_grad_(False)
    model.config.use_cache = False
    kwargs = {"mesh": mesh}
    policy = mixed_precision(device)
    if policy is not None:
        kwargs["mp_policy"] = policy
    if cpu_offload:
        kwargs["offload_policy"] = offload_policy(device)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    if is_vision_language(base.config):
        tower = vision_tower(base)
        for block in tower.blocks:
            fully_shard(block, **kwargs)
        fully_shard(tower, **kwargs)
    fully_shard(model, **kwargs)  # also moves buffers, and parameters unless offloaded, to the mesh's device
    return model


@torch.no_grad()
def copy_sharded_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy one FSDP2 model's local shards into another's sharded the same way (no communication)."""
    for (name, src), (tgt_name, tgt) in zip(source.named_parameters(), target.named_parameters(), strict=True):
        assert name == tgt_name, f"parameter order differs: {name} vs {tgt_name}"
        tgt.to_local().copy_(src.to_local())
