"""``build_models``: the policy (trainable) and, when KL is used, the frozen reference, both FSDP2."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from ..config import Config, compile_layers
from ..distributed.topology import Topology
from .load import build_causal_lm
from .lora import add_lora
from .parallelize import copy_sharded_weights, cpu_offloaded, frozen_dtype, materialize, parallelize
from .vlm import is_vision_language, model_class


@dataclass
class Models:
    actor: torch.nn.Module
    hf_config: PretrainedConfig


def build_models(cfg: Config, topo: Topology, hf_config: PretrainedConfig) -> Models:
    """The sharded actor: every rank builds the same weights, then keeps its shard (in host memory
    under ``trainer.cpu_offload``). With ``model.lora.rank > 0`` it is a PEFT model whose adapters
    alone train (added before sharding; same seed on every rank, so the same adapters)."""
    model = build_causal_lm(cfg, hf_config, seed=cfg.trainer.seed)
    if cfg.model.lora.rank > 0:
        torch.manual_seed(cfg.trainer.seed)
        model = add_lora(model, cfg.model.lora)
    m = cfg.model
    model = parallelize(model, topo.fsdp_mesh, topo.device, m.activation_checkpointing, trainable=True,
                        checkpoint_every=m.activation_checkpointing_every,
                        compile_layers=compile_layers(cfg, topo.device.type, is_vision_language(hf_config)),
                        cpu_offload=cfg.trainer.cpu_offload,
                        router_aux_loss_coef=m.moe.router_aux_loss_coef,
                        freeze_vision_tower=m.vision.freeze_vision_tower)
    return Models(actor=model, hf_config=hf_config)


@torch.no_grad()
def build_reference(actor: torch.nn.Module, hf_config: PretrainedConfig, topo: Topology) -> torch.nn.Module:
    """A frozen copy of ``actor`` as it is now: built on meta, sharded alike, shards copied in.

    Nothing is read from disk twice; non-persistent buffers (rotary tables) are copied too. On CUDA
    the copy is held in bf16, the dtype the actor computes in: its forwards equal the actor's
    bf16 compute of the same weights, at half the memory and with no fp32 -> bf16 cast per pass.
    Where the actor is offloaded (``trainer.cpu_offload``) the reference is too, under the same
    policy: in host memory between its passes, one layer at a time on the device during them.
    """
    with torch.device("meta"):
        ref = model_class(hf_config).from_config(hf_config, dtype=frozen_dtype(topo.device), attn_implementation="sdpa")
    ref = parallelize(ref, topo.fsdp_mesh, topo.device, activation_checkpointing=False, trainable=False,
                      cpu_offload=cpu_offloaded(actor))
    materialize(ref, topo.device)
    copy_sharded_weights(actor, ref)
    actor_buffers = dict(actor.named_buffers())
    for name, buffer in ref.named_buffers():
        buffer.copy_(actor_buffers[name])
    return ref
