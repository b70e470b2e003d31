"""What a checkpoint holds: the components of a run's state, and the per-rank ones' files.

Shared components are ``Stateful`` objects (or plain dicts) saved through DCP, which writes each
shard once and reshards on load, so a checkpoint loads on any world size. DCP keeps ONE copy of a
key that several ranks save, so state that differs per rank (RNG) goes to per-rank files instead:
any component with ``per_rank = True`` (``RNGState``). Loaded on a different world size, ranks
without a file keep their state (their seeded RNG) and rank 0 logs it once.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from ..models.lora import base_path
from .checkpoint_files import damage_hint, describe_file, rank_file

log = logging.getLogger(__name__)


class ModelOptimizerState(Stateful):
    """A model (FSDP2 or plain) with its optimizer and LR scheduler, keyed by full parameter names.

    ``get_state_dict`` gives the sharded DTensors of this rank; DCP writes and reshards them, so
    the state loads on another world size (and into an unsharded model, e.g. for export).
    A LoRA actor whose frozen base ``model.path`` gives again (``models/lora.base_path``) keeps
    only its adapters (and their optimizer state): the resume reads the base from ``model.path``.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler=None):
        assert scheduler is None or optimizer is not None, "a scheduler needs its optimizer"
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.frozen_saved = base_path(model) is None
        self.options = None if self.frozen_saved else StateDictOptions(strict=False)

    def _saved(self, model_sd: dict[str, Any]) -> dict[str, Any]:
        """The model's entries a checkpoint keeps: all, or the trainable ones (tied copies of frozen
        weights, which ``ignore_frozen_params`` keeps, and buffers come from ``model.path`` too)."""
        if self.frozen_saved:
            return model_sd
        trainable = {name for name, p in self.model.named_parameters(remove_duplicate=False) if p.requires_grad}
        return {name: value for name, value in model_sd.items() if name in trainable}

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": self._saved(get_model_state_dict(self.model, options=self.options))}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.options)
        state = {"model": self._saved(model_sd), "optim": optim_sd}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is None:
            keys = set_model_state_dict(self.model, state_dict["model"], options=self.options)
        else:
            keys = set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                                  optim_state_dict=state_dict["optim"], options=self.options)
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state_dict["scheduler"])
        if not self.frozen_saved:  # not strict: only the frozen base may be missing
            trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
            assert not keys.unexpected_keys and not trainable & set(keys.missing_keys), keys


class RNGState(Stateful):
    """This rank's generators: Python ``random``, NumPy's global one, torch CPU and (if used) CUDA.

    Saved per rank. Stored as tensors and plain Python values only, so ``torch.load`` reads it
    with ``weights_only=True``.
    """

    per_rank = True

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        n = state_dict["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"])


def split_components(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Stateful]]:
    """(components saved through DCP, per-rank components)."""
    shared = {k: v for k, v in state.items() if not getattr(v, "per_rank", False)}
    per_rank = {k: v for k, v in state.items() if getattr(v, "per_rank", False)}
    for name in state:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"checkpoint component name {name!r} must be letters, digits and '_'")
    return shared, per_rank


def save_per_rank(tmp: str, name: str, component: Stateful, rank: int) -> dict[str, int]:
    """Write ``rank``'s file of per-rank component ``name`` into folder ``tmp``; its manifest entry."""
    rel = rank_file(name, rank)
    os.makedirs(os.path.join(tmp, name), exist_ok=True)
    with open(os.path.join(tmp, rel), "wb") as f:
        torch.save(component.state_dict(), f)
        f.flush()
        os.fsync(f.fileno())
    return describe_file(tmp, rel)


def load_per_rank(path: str, per_rank: dict[str, Stateful], manifest: dict, rank: int, world: int) -> str | None:
    """Restore this rank's per-rank components from step folder ``path``; the problem, if any.

    Ranks the saving world did not have keep their state; rank 0 logs which ranks restored what."""
    saved = int(manifest["world_size"])
    if per_rank and rank == 0 and saved != world:
        names = ", ".join(sorted(per_rank))
        if world > saved:
            log.warning("%s was saved by %d ranks and this run has %d: per-rank state (%s) restored on ranks "
                        "0-%d; ranks %d-%d keep their own (seeded) state", path, saved, world, names, saved - 1,
                        saved, world - 1)
        else:
            log.warning("%s was saved by %d ranks and this run has %d: per-rank state (%s) restored on ranks "
                        "0-%d; that of ranks %d-%d is not used", path, saved, world, names, world - 1, world,
                        saved - 1)
    if rank >= saved:
        return None
    for name, component in per_rank.items():
        file = os.path.join(path, rank_file(name, rank))
        try:
            component.load_state_dict(torch.load(file, weights_only=True))
        except Exception as err:  # unpickling garbage raises almost anything
            return f"{file} could not be loaded ({type(err).__name__}: {err}); {damage_hint(path)}"
    return None
