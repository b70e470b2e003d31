"""The actor's LoRA adapters in vLLM, loaded from memory (``model.lora.sync=adapter``).

vLLM's LoRA support (``enable_lora``) runs the base model's layers with adapter slots beside them;
a request names its adapter with a ``LoRARequest``. vLLM loads adapters from directories only. Here
the adapters go in as tensors: ``vllm_compat.add_lora_tensors`` builds vLLM's ``LoRAModel`` from
PEFT's config and the tensors (what vLLM's worker does after reading a directory) and makes it the
engine's only adapter, so a request for its id finds it loaded and never reads a path. (verl
reaches the same end by teaching vLLM's worker LoRA manager a request that carries tensors.)

Each sync loads the new adapter under a new id and drops the old one, so every ``generate`` after
it uses the current adapter (and no cached prefix of the old one). The base weights reach the
engine once, through the ordinary weight sync (``rollout/sync.py``), and again only when the
engine has dropped them (a level-2 sleep).
"""

from __future__ import annotations

import torch

from spmd_rlhf.rollout import vllm_compat as compat


class VLLMAdapters:
    """The adapter an engine generates with: none until ``load``, then the latest one loaded."""

    def __init__(self, llm, rank: int):
        self.llm = llm
        self.rank = rank
        self.lora_id = 0
        self.request = None  # the LoRARequest ``generate`` passes; None: the base model

    @staticmethod
    def engine_kwargs(rank: int) -> dict:
        """``vllm.LLM`` arguments for adapters of rank ``rank``."""
        return compat.lora_engine_kwargs(rank)

    def load(self, peft_config: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the adapter with ``tensors`` (PEFT's saved names, whole) under a new id. vLLM gets
        copies: it scales B by alpha / r in place (``LoRALayerWeights.optimize``)."""
        if peft_config["r"] != self.rank:
            raise ValueError(f"adapters of rank {peft_config['r']} pushed to an engine built for rank {self.rank}")
        self.lora_id += 1
        owned = {name: tensor.detach().clone() for name, tensor in tensors.items()}
        compat.add_lora_tensors(self.llm, self.lora_id, peft_config, owned)
        self.request = compat.lora_request(f"actor-{self.lora_id}", self.lora_id)
