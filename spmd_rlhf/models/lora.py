"""LoRA on the actor through PEFT: the adapters, the reference they hide, and their merged weights.

``add_lora`` wraps an HF causal LM in a ``PeftModel`` (before FSDP2: ``parallelize`` shards the
PEFT model's decoder layers); only the ``lora_A``/``lora_B`` matrices train. Adapters go on the
language model's projections only (``target_modules``): a vision-language policy's vision tower has
modules of the same names (gate_proj, up_proj, down_proj) and keeps none. The reference policy
is the same model with the adapters disabled (``reference_mode``): no second copy. ``base_model``
is the HF model under the wrapper, for code that reaches into the model's parts.

``MergedWeights`` is the view the weight sync streams: the base model's HF names (no
``base_model.model.`` prefix, no ``.base_layer``, no ``lora_`` tensors) and, per parameter, its
FSDP block merged on the fly, ``W + (alpha / r) B A``: FSDP2 shards ``W [out, in]`` and
``B [out, r]`` alike on dim 0 (torch.chunk of the same ``out`` rows), so the merged block is
``W_local + s * B_local @ A`` with ``A [r, in]`` gathered (small). Nothing merged outlives its
bucket; the model is never merged in place.

``base_path``: where the frozen base can be read again (``model.path``), recorded with the
adapters' settings; a checkpoint then keeps only the adapters (``trainer/checkpoint_state.py``).
``adapter_state``: PEFT's config and the adapters' whole tensors, what ``model.lora.sync=adapter``
hands to vLLM.
"""

from __future__ import annotations

from collections.abc import Iterator

import os
import re

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch.distributed.tensor import DTensor

from ..config.schema import LoraConfig

PREFIX = "base_model.model."
ADAPTER = "default"
CONFIG_KEY = "spmd_rlhf_lora"  # the adapters' settings, kept in the model's config (checkpoints' hf/config.json)


def add_lora(model: torch.nn.Module, lora: LoraConfig) -> PeftModel:
    """``model`` with LoRA adapters (PEFT's init: A random, B zero, so the output is unchanged);
    every base parameter frozen, only the adapters trainable. The settings are recorded in
    ``model.config`` (``CONFIG_KEY``), so a checkpoint's config tells the export how to merge, and
    where the base came from (``base_path``: the directory ``from_pretrained`` read; None for a
    model built from a config)."""
    source = model.config._name_or_path or None
    if source is not None and os.path.isdir(source):
        source = os.path.abspath(source)
    targets = target_modules(model, lora.target_modules)
    setattr(model.config, CONFIG_KEY, {"r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
                                       "target_modules": targets,
                                       "base_model_name_or_path": source, "sync": lora.sync})
    config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def target_modules(model: torch.nn.Module, names: list[str] | tuple[str, ...]) -> list[str] | str:
    """What PEFT adapts in ``model`` (an HF model): the modules ``names`` (e.g. ``q_proj``) of its
    language model (``get_decoder()``) only. Where every module so named lies in the language model
    (a text policy) that is ``names`` itself; where others share the names (a vision-language
    policy's vision tower: ``mlp.gate_proj``...), a PEFT regex (full match) of the language
    model's modules so named (``model\\.language_model\\..*\\.(q_proj|v_proj)``)."""
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    if not prefix:  # the model is its decoder
        return list(names)

    def named(module_name: str) -> bool:  # PEFT's list matching: the name or a dotted suffix of it
        return any(module_name == t or module_name.endswith(f".{t}") for t in names)

    outside = [n for n, _ in model.named_modules() if named(n) and not n.startswith(f"{prefix}.")]
    if not outside:
        return list(names)
    return rf"{re.escape(prefix)}\..*\.({'|'.join(re.escape(t) for t in names)})"


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` (FSDP-wrapped or not) carries PEFT adapters."""
    return isinstance(model, PeftModel)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model under PEFT's wrapper (its adapted layers in place), or ``model`` itself."""
    return model.get_base_model() if is_lora(model) else model


def base_path(model: torch.nn.Module) -> str | None:
    """Where a LoRA actor's frozen base is read from again (``model.path``), so a checkpoint needs
    only its adapters; None where only a checkpoint has it (a built or warm-started base)."""
    if not is_lora(model):
        return None
    return getattr(model.config, CONFIG_KEY)["base_model_name_or_path"]


def adapter_sync(model: torch.nn.Module) -> bool:
    """Whether the engine gets the adapters themselves (``model.lora.sync=adapter``), not merged weights."""
    return is_lora(model) and getattr(model.config, CONFIG_KEY)["sync"] == "adapter"


@torch.no_grad()
def adapter_state(model: torch.nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT's adapter config (as ``adapter_config.json`` holds it) and the adapters' whole tensors
    under the names PEFT saves them (``...q_proj.lora_A.weight``); collective over the training mesh."""
    assert is_lora(model)
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in model.peft_config[ADAPTER].to_dict().items()}
    tensors = {name.replace(f".{ADAPTER}.", "."): _full(param) for name, param in model.named_parameters()
               if ".lora_" in name}
    return config, tensors


def reference_mode(model: torch.nn.Module):
    """A context in which ``model`` computes as its base model (adapters disabled): the reference."""
    assert is_lora(model)
    return model.disable_adapter()


def base_name(name: str) -> str | None:
    """The HF name of a PEFT parameter in the merged model; None for adapter tensors."""
    if ".lora_" in name:
        return None
    assert name.startswith(PREFIX), name
    return name[len(PREFIX):].replace(".base_layer.", ".")


def _on_mesh_device(param: torch.Tensor) -> torch.Tensor:
    """A DTensor moved to its mesh's device (shards FSDP offloads live in host memory)."""
    if isinstance(param, DTensor) and param.device.type != param.device_mesh.device_type:
        return param.to(param.device_mesh.device_type)
    return param


def _full(param: torch.Tensor) -> torch.Tensor:
    param = _on_mesh_device(param)
    return (param.full_tensor() if isinstance(param, DTensor) else param).detach()


class MergedWeights:
    """The merged model's parameters, named as the base model's, merged bucket by bucket."""

    def __init__(self, model: torch.nn.Module):
        assert is_lora(model)
        self._params: list[tuple[str, torch.Tensor]] = []
        self._adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}  # weight name -> (A, B, scale)
        for module_name, module in model.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                name = base_name(f"{module_name}.base_layer.weight")
                self._adapters[name] = (module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight,
                                        float(module.scaling[ADAPTER]))
        for name, param in model.named_parameters():
            merged = base_name(name)
            if merged is not None:
                self._params.append((merged, param))

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """``(HF name, base parameter)``: the shapes, dtypes and placements of the merged weights."""
        return list(self._params)

    @torch.no_grad()
    def local_block(self, name: str, param: DTensor) -> torch.Tensor:
        """This rank's FSDP block of the merged ``name``: ``W_local + s * B_local @ A`` (collective for
        adapted weights: every rank must ask for the same names in the same order)."""
        block = param._local_tensor
        if name not in self._adapters:
            return block
        a, b, scale = self._adapters[name]
        assert isinstance(b, DTensor) and b.placements == param.placements, "B is sharded like W (rows)"
        a_full = _full(a)
        b_local = b._local_tensor.to(a_full.device)
        return block.to(a_full.device) + scale * (b_local @ a_full).to(block.dtype)

    @torch.no_grad()
    def full_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(HF name, whole merged tensor)``, one at a time (collective over the training mesh)."""
        for name, param in self._params:
            full = _full(param)
            if name in self._adapters:
                a, b, scale = self._adapters[name]
                full = full + scale * (_full(b) @ _full(a)).to(full.dtype)
            yield name, full


@torch.no_grad()
def fold_adapters(model: torch.nn.Module) -> None:
    """Merge the adapters into the (sharded) base weights in place and zero every B: the model
    computes the same, and disabling the adapters now gives it (the reference after a warm start).
    The base is then no longer the one read from disk: checkpoints keep it (``base_path`` is None)."""
    merged = MergedWeights(model)
    for name, param in merged.named_parameters():
        if name in merged._adapters:
            block = merged.local_block(name, param)
            param._local_tensor.copy_(block.to(param._local_tensor.device))
    for _, b, _ in merged._adapters.values():
        b._local_tensor.zero_()
    getattr(model.config, CONFIG_KEY)["base_model_name_or_path"] = None  # the base is no longer model.path's
