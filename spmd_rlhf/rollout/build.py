"""``build_engine``: the rollout engine named by ``rollout.engine`` on the generation mesh."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from ..config import Config, ConfigError
from ..distributed.topology import Topology
from .base import RolloutEngine


def engine_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_engine(cfg: Config, topo: Topology, hf_config: PretrainedConfig, eos_ids: list[int],
                 pad_id: int) -> RolloutEngine:
    if cfg.rollout.engine == "torch":
        from .torch_engine import TorchEngine

        engine = TorchEngine(hf_config, topo.gen_mesh, topo.device, engine_dtype(topo.device), eos_ids, pad_id,
                             max_batch_size=cfg.rollout.max_batch_size)
        engine.dtype = engine_dtype(topo.device)
        return engine
    raise ConfigError(f"rollout.engine={cfg.rollout.engine!r} is not available; set rollout.engine=torch")
