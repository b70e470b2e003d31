"""Checkpoints: one ``torch.distributed.checkpoint`` (DCP) folder per step, saved and loaded by
every rank together.

``CheckpointManager`` orchestrates: the files and their publication are ``checkpoint_files``'s,
the components (model + optimizer, RNG, per-rank files) ``checkpoint_state``'s. Loading checks
the manifest (every file present, with its size and, by default, its CRC32) on all ranks and
agrees on the verdict before DCP reads anything, so a damaged checkpoint raises one
``CheckpointError`` naming the file on every rank instead of a pickling error on some of them and
a hang on the others.

Departures from torchtitan's checkpointer, which this follows (Stateful components in one DCP
state dict, ``get_state_dict``/``set_state_dict``): saves are synchronous, and we add the manifest
with checksums, the atomic ``latest`` pointer and the ``hf/`` folder for export.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful

from .checkpoint_files import (
    FORMAT,
    HF_DIR,
    MANIFEST,
    CheckpointError,
    check_files,
    damage_hint,
    dcp_files,
    describe_file,
    publish,
    prune,
    read_dcp_metadata,
    read_manifest,
    rank_file,
    resolve_resume,
    step_folder_name,
    write_hf,
)
from .checkpoint_state import ModelOptimizerState, RNGState  # noqa: F401  (re-exported: the components of a state)
from .checkpoint_state import load_per_rank, save_per_rank, split_components

# What DCP and torch.load raise on damaged or mismatched files. CheckpointException is a
# BaseException: DCP gathers every rank's failure into it, on every rank.
_LOAD_ERRORS = (CheckpointException, RuntimeError, ValueError, KeyError, EOFError, OSError, TypeError,
                AttributeError, IndexError)


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``CheckpointManager.load`` restored: the step folder, its step, the world that saved it
    and the ``extra`` dict given to ``save``."""

    path: str
    step: int
    world_size: int
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns that it runs in one process whenever there is no process group; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_model_weights(path: str, component: str = "actor", checksums: bool = True) -> dict[str, torch.Tensor]:
    """The full weights of ``component``'s model from a step folder, on the CPU, in one process.

    Reads only the ``<component>.model.*`` tensors (not the optimizer); no process group needed.
    """
    manifest = read_manifest(path)
    if component not in manifest["components"]:
        raise CheckpointError(f"{path} has no component {component!r} (it has {manifest['components']})")
    metadata = read_dcp_metadata(path)
    prefix = f"{component}.model."
    targets = {fqn: torch.empty(md.size, dtype=md.properties.dtype) for fqn, md in metadata.state_dict_metadata.items()
               if fqn.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    if not targets:
        raise CheckpointError(f"{path}: component {component!r} holds no model weights")
    files = sorted({metadata.storage_data[idx].relative_path for idx in metadata.storage_data if idx.fqn in targets})
    problems = check_files(path, manifest, [f for f in files if f in manifest["files"]], checksums)
    problems += [f"{os.path.join(path, f)} is not in {MANIFEST}; {damage_hint(path)}"
                 for f in files if f not in manifest["files"]]
    if problems:
        raise CheckpointError(problems[0])
    try:
        with _single_process_is_intended():
            dcp.load(targets, checkpoint_id=path, no_dist=True)
    except _LOAD_ERRORS as err:
        raise CheckpointError(f"could not read the weights of {path} ({type(err).__name__}: {err}); "
                              f"{damage_hint(path)}") from None
    return {fqn[len(prefix):]: tensor for fqn, tensor in targets.items()}


class CheckpointManager:
    """Saves, finds and loads the checkpoints of one run. ``save`` and ``load`` are collectives:
    every rank of ``process_group`` (default: the world, or a world of one without a process
    group) calls them with the same arguments."""

    def __init__(self, checkpoint_dir: str, keep_last: int, process_group: dist.ProcessGroup | None = None):
        if keep_last < 0:
            raise ValueError(f"keep_last={keep_last} must be >= 0 (0 keeps every checkpoint)")
        self.checkpoint_dir = str(checkpoint_dir)
        self.keep_last = keep_last
        self.process_group = process_group

    # collectives that degrade to a world of one
    @property
    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group) if self._distributed else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group) if self._distributed else 1

    def _all_gather(self, obj: Any) -> list[Any]:
        if not self._distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.process_group)
        return out

    def _broadcast_from_0(self, obj: Any) -> Any:
        if not self._distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, group=self.process_group, group_src=0)
        return box[0]

    def _agree(self, problem: str | None) -> None:
        """Raise the first rank's problem on every rank, or return on every rank."""
        problems = [p for p in self._all_gather(problem) if p]
        if problems:
            raise CheckpointError(problems[0])

    # --- save -----------------------------------------------------------------------------------

    def save(self, step: int, state: Mapping[str, Any], hf_config=None, tokenizer=None,
             extra: dict | None = None, model_dir: str | None = None) -> str:
        """Write ``state`` as ``step_XXXXXXXX``, point ``latest`` at it, prune; return its path.
        ``model_dir`` (the run's ``model.path``) lends its image processor files to ``hf/``."""
        if step < 0:
            raise ValueError(f"checkpoint step={step} must be >= 0")
        extra = dict(extra or {})
        try:
            json.dumps(extra)
        except TypeError as err:
            raise ValueError(f"checkpoint extra must be JSON-serialisable ({err})") from None
        shared, per_rank = split_components(state)
        final = os.path.join(self.checkpoint_dir, step_folder_name(step))
        tmp = final + ".tmp-" + self._broadcast_from_0(uuid.uuid4().hex[:8])
        files, problem = self._write_local(tmp, per_rank, hf_config, tokenizer, model_dir)
        self._agree(problem)  # before DCP's collective, so a failed rank does not leave the others waiting
        try:
            with _single_process_is_intended():
                metadata = dcp.save(shared, checkpoint_id=tmp, process_group=self.process_group,
                                    no_dist=not self._distributed)
        except _LOAD_ERRORS as err:
            raise CheckpointError(f"saving {tmp} failed ({type(err).__name__}: {err})") from None
        written = dcp_files(tmp, metadata)
        try:  # every rank checksums a share of DCP's files
            files.update({rel: describe_file(tmp, rel) for rel in written[self.rank::self.world_size]})
        except OSError as err:
            problem = f"rank {self.rank} could not read back {tmp}: {err}"
        gathered = self._all_gather((files, problem))
        if any(p for _, p in gathered):
            raise CheckpointError(next(p for _, p in gathered if p))
        problem = None
        if self.rank == 0:
            manifest = {"format": FORMAT, "step": step, "world_size": self.world_size, "components": sorted(shared),
                        "per_rank": sorted(per_rank), "files": {k: v for part, _ in gathered for k, v in part.items()},
                        "extra": extra}
            try:
                publish(self.checkpoint_dir, tmp, final, manifest)
                prune(self.checkpoint_dir, self.keep_last, final)
            except OSError as err:
                problem = f"publishing checkpoint {final} failed: {err}"
        problem = self._broadcast_from_0(problem)
        if problem:
            raise CheckpointError(problem)
        return final

    def _write_local(self, tmp: str, per_rank: dict[str, Stateful], hf_config, tokenizer,
                     model_dir: str | None = None) -> tuple[dict[str, dict[str, int]], str | None]:
        """This rank's files (per-rank components; ``hf/`` on rank 0): their descriptions, or a problem."""
        files: dict[str, dict[str, int]] = {}
        try:
            os.makedirs(tmp, exist_ok=True)
            for name, component in per_rank.items():
                files[rank_file(name, self.rank)] = save_per_rank(tmp, name, component, self.rank)
            if self.rank == 0:
                write_hf(os.path.join(tmp, HF_DIR), hf_config, tokenizer, model_dir)
        except Exception as err:  # reported on every rank by the caller instead of raised here alone
            return files, f"rank {self.rank} could not write into {tmp} ({type(err).__name__}: {err})"
        return files, None

    # --- find -----------------------------------------------------------------------------------

    def resolve(self, resume: str) -> str | None:
        """The step folder to resume from: ``auto`` (this run's newest, None if there is none),
        ``never`` (None) or a PATH (a step folder, or a checkpoint dir with ``latest``)."""
        return resolve_resume(self.checkpoint_dir, resume)

    # --- load -----------------------------------------------------------------------------------

    def load(self, path: str, state: Mapping[str, Any], verify: bool = True) -> CheckpointInfo:
        """Restore ``state`` in place from the step folder ``path`` (any world size).

        Every file is checked first (size always; CRC32 when ``verify``), split across ranks.
        """
        shared, per_rank = split_components(state)
        rank, world = self.rank, self.world_size
        manifest, problem = None, None
        try:
            manifest = read_manifest(path)
            read_dcp_metadata(path)
            missing = sorted(set(shared) - set(manifest["components"])) + sorted(set(per_rank) - set(manifest["per_rank"]))
            if missing:
                raise CheckpointError(f"{path} has no component {missing[0]!r} (it has "
                                      f"{manifest['components'] + manifest['per_rank']}); resume from a checkpoint "
                                      "of the same setup, or set trainer.resume=never")
            problems = check_files(path, manifest, sorted(manifest["files"])[rank::world], verify)
            problem = problems[0] if problems else None
        except CheckpointError as err:
            problem = str(err)
        self._agree(problem)
        try:
            with _single_process_is_intended():
                dcp.load(shared, checkpoint_id=path, process_group=self.process_group, no_dist=not self._distributed)
        except _LOAD_ERRORS as err:
            raise CheckpointError(f"could not load {path} into this run's state ({type(err).__name__}: {err}); a "
                                  f"checkpoint of another model or setup? {damage_hint(path)}") from None
        self._agree(load_per_rank(path, per_rank, manifest, rank, world))
        return CheckpointInfo(path=path, step=int(manifest["step"]), world_size=int(manifest["world_size"]),
                              extra=manifest["extra"])
