"""Checkpoints: one ``torch.distributed.checkpoint`` (DCP) folder per step, published atomically.

Layout of ``checkpoint_dir``::

    latest                        "step_00000120": the newest complete checkpoint (replaced atomically)
    step_00000120/
      .metadata, __<r>_<i>.distcp  DCP: every shared component in one state dict {"actor": ..., "trainer": ...}
      rng/rank_00003.pt           per-rank components (torch.save), one file per rank
      hf/                         config.json and tokenizer files (rank 0), for tools/export_hf.py
      manifest.json               step, world size, components, size and CRC32 of every file, caller's extra
    step_00000140.tmp-3f9a1c2e/   a save in progress, or one that crashed: never read, removed by the next save

A save writes into the ``.tmp-`` folder; once every rank's files are on disk (DCP fsyncs its
files), rank 0 writes the manifest, renames the folder to ``step_XXXXXXXX`` and then replaces
``latest`` (temp file, fsync, ``os.replace``). A crash at any point leaves the previous checkpoint
intact and ``latest`` naming it. Loading checks the manifest (every file present, with its size
and, by default, its CRC32) on all ranks and agrees on the verdict before DCP reads anything, so a
damaged checkpoint raises one ``CheckpointError`` naming the file on every rank instead of a
pickling error on some of them and a hang on the others.

Shared components are ``Stateful`` objects (or plain dicts) saved through DCP, which writes each
shard once and reshards on load, so a checkpoint loads on any world size. DCP keeps ONE copy of a
key that several ranks save, so state that differs per rank (RNG) goes to per-rank files instead:
any component with ``per_rank = True`` (``RNGState``). Loaded on a different world size, ranks
without a file keep their state (their seeded RNG) and rank 0 logs it once.

Departures from torchtitan's checkpointer, which this follows (Stateful components in one DCP
state dict, ``get_state_dict``/``set_state_dict``): saves are synchronous, and we add the manifest
with checksums, the atomic ``latest`` pointer and the ``hf/`` folder for export.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import uuid
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

log = logging.getLogger(__name__)

FORMAT = 1
LATEST = "latest"
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"
HF_DIR = "hf"
_STEP_RE = re.compile(r"^step_(\d{8})$")
_TMP_RE = re.compile(r"^step_\d{8}\.tmp-")
_CHUNK = 8 << 20
# What DCP and torch.load raise on damaged or mismatched files. CheckpointException is a
# BaseException: DCP gathers every rank's failure into it, on every rank.
_LOAD_ERRORS = (CheckpointException, RuntimeError, ValueError, KeyError, EOFError, OSError, TypeError,
                AttributeError, IndexError)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do instead."""


# --- components ---------------------------------------------------------------------------------


class ModelOptimizerState(Stateful):
    """A model (FSDP2 or plain) with its optimizer and LR scheduler, keyed by full parameter names.

    ``get_state_dict`` gives the sharded DTensors of this rank; DCP writes and reshards them, so
    the state loads on another world size (and into an unsharded model, e.g. for export).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler=None):
        assert scheduler is None or optimizer is not None, "a scheduler needs its optimizer"
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state_dict["model"])
            return
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state_dict["scheduler"])


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


def _split(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Stateful]]:
    """(components saved through DCP, per-rank components)."""
    shared = {k: v for k, v in state.items() if not getattr(v, "per_rank", False)}
    per_rank = {k: v for k, v in state.items() if getattr(v, "per_rank", False)}
    for name in state:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"checkpoint component name {name!r} must be letters, digits and '_'")
    return shared, per_rank


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns that it runs in one process whenever there is no process group; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank_file(name: str, rank: int) -> str:
    return f"{name}/rank_{rank:05d}.pt"


# --- files --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``CheckpointManager.load`` restored: the step folder, its step, the world that saved it
    and the ``extra`` dict given to ``save``."""

    path: str
    step: int
    world_size: int
    extra: dict = field(default_factory=dict)


def step_folder_name(step: int) -> str:
    return f"step_{step:08d}"


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _describe(path: str, rel: str) -> dict[str, int]:
    full = os.path.join(path, rel)
    return {"bytes": os.path.getsize(full), "crc32": _crc32(full)}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def is_complete(path: str) -> bool:
    """A published step folder: the right name, a manifest and DCP's metadata."""
    return (bool(_STEP_RE.match(os.path.basename(os.path.normpath(path))))
            and os.path.isfile(os.path.join(path, MANIFEST)) and os.path.isfile(os.path.join(path, DCP_METADATA)))


def complete_checkpoints(checkpoint_dir: str) -> list[str]:
    """Complete step folders of ``checkpoint_dir``, oldest step first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    names = sorted(n for n in os.listdir(checkpoint_dir) if _STEP_RE.match(n))
    return [os.path.join(checkpoint_dir, n) for n in names if is_complete(os.path.join(checkpoint_dir, n))]


def newest_checkpoint(checkpoint_dir: str) -> str | None:
    """The folder ``latest`` names; if ``latest`` is missing or broken, the newest complete one."""
    pointer = os.path.join(checkpoint_dir, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        target = os.path.join(checkpoint_dir, name)
        if _STEP_RE.match(name) and is_complete(target):
            return target
        log.warning("%s names %r, which is not a complete checkpoint; using the newest complete one", pointer, name)
    found = complete_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def _hint(path: str) -> str:
    """What to do about a damaged checkpoint: an earlier complete one, or starting over."""
    parent = os.path.dirname(os.path.abspath(os.path.normpath(path)))
    here = os.path.basename(os.path.normpath(path))
    earlier = [p for p in complete_checkpoints(parent) if os.path.basename(p) < here]
    if earlier:
        return f"point trainer.resume at an earlier step folder, e.g. trainer.resume={earlier[-1]}"
    return "point trainer.resume at another checkpoint, or set trainer.resume=never to start over"


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of a step folder; ``CheckpointError`` if the folder is not a usable checkpoint."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory; point trainer.resume at a step folder or checkpoint dir")
    try:
        with open(file) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"not a format-{FORMAT} manifest")
        for key in ("step", "world_size", "components", "per_rank", "extra"):
            if key not in manifest:
                raise KeyError(key)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: {path} is not a complete checkpoint (a save that did not "
                              f"finish?); {_hint(path)}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{file} is unreadable or damaged ({type(err).__name__}: {err}); {_hint(path)}") from None
    return manifest


def read_dcp_metadata(path: str) -> Metadata:
    file = os.path.join(path, DCP_METADATA)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} is missing: {path} is not a complete checkpoint; {_hint(path)}")
    try:
        return FileSystemReader(path).read_metadata()
    except Exception as err:  # unpickling garbage raises almost anything
        raise CheckpointError(f"{file} is damaged ({type(err).__name__}: {err}); {_hint(path)}") from None


def check_files(path: str, manifest: dict[str, Any], names: list[str], checksums: bool = True) -> list[str]:
    """Problems with the listed files of a step folder: missing, wrong size or (if asked) wrong CRC32."""
    problems = []
    for rel in names:
        full, want = os.path.join(path, rel), manifest["files"][rel]
        if not os.path.isfile(full):
            problems.append(f"{full} is missing")
        elif os.path.getsize(full) != want["bytes"]:
            problems.append(f"{full} has {os.path.getsize(full)} bytes, the manifest says {want['bytes']} (truncated?)")
        elif checksums and _crc32(full) != want["crc32"]:
            problems.append(f"{full} does not match its checksum (damaged)")
    return [f"{p}; {_hint(path)}" for p in problems]


# --- loading without a process group -------------------------------------------------------------


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
    problems += [f"{os.path.join(path, f)} is not in {MANIFEST}; {_hint(path)}" for f in files if f not in manifest["files"]]
    if problems:
        raise CheckpointError(problems[0])
    try:
        with _single_process_is_intended():
            dcp.load(targets, checkpoint_id=path, no_dist=True)
    except _LOAD_ERRORS as err:
        raise CheckpointError(f"could not read the weights of {path} ({type(err).__name__}: {err}); {_hint(path)}") from None
    return {fqn[len(prefix):]: tensor for fqn, tensor in targets.items()}


# --- the manager --------------------------------------------------------------------------------


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
             extra: dict | None = None) -> str:
        """Write ``state`` as ``step_XXXXXXXX``, point ``latest`` at it, prune; return its path."""
        if step < 0:
            raise ValueError(f"checkpoint step={step} must be >= 0")
        extra = dict(extra or {})
        try:
            json.dumps(extra)
        except TypeError as err:
            raise ValueError(f"checkpoint extra must be JSON-serialisable ({err})") from None
        shared, per_rank = _split(state)
        final = os.path.join(self.checkpoint_dir, step_folder_name(step))
        tmp = final + ".tmp-" + self._broadcast_from_0(uuid.uuid4().hex[:8])
        files, problem = self._write_local(tmp, per_rank, hf_config, tokenizer)
        self._agree(problem)  # before DCP's collective, so a failed rank does not leave the others waiting
        try:
            with _single_process_is_intended():
                metadata = dcp.save(shared, checkpoint_id=tmp, process_group=self.process_group,
                                    no_dist=not self._distributed)
        except _LOAD_ERRORS as err:
            raise CheckpointError(f"saving {tmp} failed ({type(err).__name__}: {err})") from None
        dcp_files = _dcp_files(tmp, metadata)
        try:  # every rank checksums a share of DCP's files
            files.update({rel: _describe(tmp, rel) for rel in dcp_files[self.rank::self.world_size]})
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
                self._publish(tmp, final, manifest)
                self._prune(final)
            except OSError as err:
                problem = f"publishing checkpoint {final} failed: {err}"
        problem = self._broadcast_from_0(problem)
        if problem:
            raise CheckpointError(problem)
        return final

    def _write_local(self, tmp: str, per_rank: dict[str, Stateful], hf_config,
                     tokenizer) -> tuple[dict[str, dict[str, int]], str | None]:
        """This rank's files (per-rank components; ``hf/`` on rank 0): their descriptions, or a problem."""
        files: dict[str, dict[str, int]] = {}
        try:
            os.makedirs(tmp, exist_ok=True)
            for name, component in per_rank.items():
                files[_rank_file(name, self.rank)] = self._save_per_rank(tmp, name, component, self.rank)
            if self.rank == 0:
                _write_hf(os.path.join(tmp, HF_DIR), hf_config, tokenizer)
        except Exception as err:  # reported on every rank by the caller instead of raised here alone
            return files, f"rank {self.rank} could not write into {tmp} ({type(err).__name__}: {err})"
        return files, None

    @staticmethod
    def _save_per_rank(tmp: str, name: str, component: Stateful, rank: int) -> dict[str, int]:
        rel = _rank_file(name, rank)
        os.makedirs(os.path.join(tmp, name), exist_ok=True)
        with open(os.path.join(tmp, rel), "wb") as f:
            torch.save(component.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        return _describe(tmp, rel)

    def _publish(self, tmp: str, final: str, manifest: dict) -> None:
        """Rank 0: manifest, rename into place, then ``latest``. Each step is durable before the next."""
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(final):  # the same step saved again (e.g. after resuming from an earlier one)
            os.rename(final, f"{final}.tmp-replaced-{uuid.uuid4().hex[:8]}")
        os.rename(tmp, final)
        _fsync_dir(self.checkpoint_dir)
        _write_atomic(os.path.join(self.checkpoint_dir, LATEST), os.path.basename(final) + "\n")

    def _prune(self, latest: str) -> None:
        """Rank 0: remove stale ``.tmp-`` folders and all but the newest ``keep_last`` checkpoints."""
        for name in os.listdir(self.checkpoint_dir):
            full = os.path.join(self.checkpoint_dir, name)
            if _TMP_RE.match(name):
                shutil.rmtree(full, ignore_errors=True)
            elif name.startswith(f"{LATEST}.tmp-"):
                os.remove(full)
        if self.keep_last == 0:
            return
        complete = complete_checkpoints(self.checkpoint_dir)
        keep = set(complete[-self.keep_last:]) | {latest}
        for path in complete:
            if path not in keep:  # renamed first: a half-deleted folder must not look complete
                doomed = f"{path}.tmp-delete-{uuid.uuid4().hex[:8]}"
                os.rename(path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    # --- find -----------------------------------------------------------------------------------

    def resolve(self, resume: str) -> str | None:
        """The step folder to resume from: ``auto`` (this run's newest, None if there is none),
        ``never`` (None) or a PATH (a step folder, or a checkpoint dir with ``latest``)."""
        if resume == "never":
            return None
        if resume == "auto":
            return newest_checkpoint(self.checkpoint_dir)
        path = os.path.normpath(resume)
        if _STEP_RE.match(os.path.basename(path)) and os.path.isdir(path):
            read_manifest(path)  # raises with the reason if it is not complete
            return path
        if os.path.isdir(path):
            found = newest_checkpoint(path)
            if found is not None:
                return found
        raise CheckpointError(f"trainer.resume={resume!r} is neither a step folder (step_XXXXXXXX) nor a directory "
                              "holding complete checkpoints; set trainer.resume=auto, never, or a checkpoint path")

    # --- load -----------------------------------------------------------------------------------

    def load(self, path: str, state: Mapping[str, Any], verify: bool = True) -> CheckpointInfo:
        """Restore ``state`` in place from the step folder ``path`` (any world size).

        Every file is checked first (size always; CRC32 when ``verify``), split across ranks.
        """
        shared, per_rank = _split(state)
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
                                  f"checkpoint of another model or setup? {_hint(path)}") from None
        self._agree(self._load_per_rank(path, per_rank, manifest))
        return CheckpointInfo(path=path, step=int(manifest["step"]), world_size=int(manifest["world_size"]),
                              extra=manifest["extra"])

    def _load_per_rank(self, path: str, per_rank: dict[str, Stateful], manifest: dict) -> str | None:
        rank, world, saved = self.rank, self.world_size, int(manifest["world_size"])
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
            file = os.path.join(path, _rank_file(name, rank))
            try:
                component.load_state_dict(torch.load(file, weights_only=True))
            except Exception as err:  # unpickling garbage raises almost anything
                return f"{file} could not be loaded ({type(err).__name__}: {err}); {_hint(path)}"
        return None


def _dcp_files(path: str, metadata: Metadata | None) -> list[str]:
    """The files DCP wrote into ``path``: from the returned metadata where it lists them (torch
    >= 2.13), else from the folder (torch 2.11 returns metadata without ``storage_data``; every
    rank's files are on disk once the collective ``dcp.save`` has returned)."""
    if metadata is not None and metadata.storage_data:
        return sorted({DCP_METADATA} | {info.relative_path for info in metadata.storage_data.values()})
    return sorted(name for name in os.listdir(path) if name == DCP_METADATA or name.endswith(".distcp"))


def _write_hf(hf_dir: str, hf_config, tokenizer) -> None:
    """config.json and the tokenizer's files, so the step folder exports to a HF directory alone."""
    os.makedirs(hf_dir, exist_ok=True)
    if hf_config is not None:
        hf_config.save_pretrained(hf_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(hf_dir)
