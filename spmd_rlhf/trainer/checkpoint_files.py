"""The files of a checkpoint directory: step folders, atomic publication, ``latest``, pruning,
the manifest and its checks, and which folder ``trainer.resume`` means.

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
``latest`` (temp file, fsync, ``os.replace``): ``publish``. A crash at any point leaves the
previous checkpoint intact and ``latest`` naming it. Everything here runs in one process; the
collectives are ``checkpoint.CheckpointManager``'s.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
import zlib
from typing import Any

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

log = logging.getLogger(__name__)

FORMAT = 1
LATEST = "latest"
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"
HF_DIR = "hf"
_STEP_RE = re.compile(r"^step_(\d{8})$")
_TMP_RE = re.compile(r"^step_\d{8}\.tmp-")
_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do instead."""


def step_folder_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(name: str, rank: int) -> str:
    """Where per-rank component ``name`` of ``rank`` lives inside a step folder."""
    return f"{name}/rank_{rank:05d}.pt"


# --- writing ------------------------------------------------------------------------------------


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def describe_file(path: str, rel: str) -> dict[str, int]:
    """The manifest entry of file ``rel`` of folder ``path``: its size and CRC32."""
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


def dcp_files(path: str, metadata: Metadata | None) -> list[str]:
    """The files DCP wrote into ``path``: from the returned metadata where it lists them (torch
    >= 2.13), else from the folder (torch 2.11 returns metadata without ``storage_data``; every
    rank's files are on disk once the collective ``dcp.save`` has returned)."""
    if metadata is not None and metadata.storage_data:
        return sorted({DCP_METADATA} | {info.relative_path for info in metadata.storage_data.values()})
    return sorted(name for name in os.listdir(path) if name == DCP_METADATA or name.endswith(".distcp"))


# what a vision-language model directory holds beside config.json and the tokenizer
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def write_hf(hf_dir: str, hf_config, tokenizer, source_dir: str | None = None) -> None:
    """config.json, the tokenizer's files and the image processor's (copied from ``source_dir``, the
    model directory the run read, where it has them), so the step folder exports to a HF directory
    alone."""
    os.makedirs(hf_dir, exist_ok=True)
    if hf_config is not None:
        hf_config.save_pretrained(hf_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(hf_dir)
    for name in PROCESSOR_FILES if source_dir else ():
        if os.path.isfile(os.path.join(source_dir, name)):
            shutil.copy2(os.path.join(source_dir, name), os.path.join(hf_dir, name))


def publish(checkpoint_dir: str, tmp: str, final: str, manifest: dict) -> None:
    """Rank 0: manifest, rename into place, then ``latest``. Each step is durable before the next."""
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):  # the same step saved again (e.g. after resuming from an earlier one)
        os.rename(final, f"{final}.tmp-replaced-{uuid.uuid4().hex[:8]}")
    os.rename(tmp, final)
    _fsync_dir(checkpoint_dir)
    _write_atomic(os.path.join(checkpoint_dir, LATEST), os.path.basename(final) + "\n")


def prune(checkpoint_dir: str, keep_last: int, latest: str) -> None:
    """Rank 0: remove stale ``.tmp-`` folders and all but the newest ``keep_last`` checkpoints
    (0: keep every one); ``latest`` is always kept."""
    for name in os.listdir(checkpoint_dir):
        full = os.path.join(checkpoint_dir, name)
        if _TMP_RE.match(name):
            shutil.rmtree(full, ignore_errors=True)
        elif name.startswith(f"{LATEST}.tmp-"):
            os.remove(full)
    if keep_last == 0:
        return
    complete = complete_checkpoints(checkpoint_dir)
    keep = set(complete[-keep_last:]) | {latest}
    for path in complete:
        if path not in keep:  # renamed first: a half-deleted folder must not look complete
            doomed = f"{path}.tmp-delete-{uuid.uuid4().hex[:8]}"
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


# --- finding ------------------------------------------------------------------------------------


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


def resolve_resume(checkpoint_dir: str, resume: str) -> str | None:
    """The step folder to resume from: ``auto`` (the newest in ``checkpoint_dir``, None if there is
    none), ``never`` (None) or a PATH (a step folder, or a checkpoint dir with ``latest``)."""
    if resume == "never":
        return None
    if resume == "auto":
        return newest_checkpoint(checkpoint_dir)
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


# --- checking -----------------------------------------------------------------------------------


def damage_hint(path: str) -> str:
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
                              f"finish?); {damage_hint(path)}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{file} is unreadable or damaged ({type(err).__name__}: {err}); "
                              f"{damage_hint(path)}") from None
    return manifest


def read_dcp_metadata(path: str) -> Metadata:
    file = os.path.join(path, DCP_METADATA)
    if not os.path.isfile(file):
        raise CheckpointError(f"{file} is missing: {path} is not a complete checkpoint; {damage_hint(path)}")
    try:
        return FileSystemReader(path).read_metadata()
    except Exception as err:  # unpickling garbage raises almost anything
        raise CheckpointError(f"{file} is damaged ({type(err).__name__}: {err}); {damage_hint(path)}") from None


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
    return [f"{p}; {damage_hint(path)}" for p in problems]
