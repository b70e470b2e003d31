"""Checkpoints in one process (no process group): round trip, atomic publication under a crash,
pruning, ``resume`` resolution, damaged files; and the preemption handler's signals."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from spmd_rlhf.tasks.arithmetic import build_tokenizer, tiny_model_config
from spmd_rlhf.trainer.checkpoint import CheckpointError, CheckpointManager, ModelOptimizerState, RNGState
from spmd_rlhf.trainer.checkpoint_files import step_folder_name
from spmd_rlhf.trainer.preemption import PreemptionHandler
from spmd_rlhf.trainer.schedule import build_scheduler
from tests.launch import child_env

TOKENIZER = build_tokenizer()


def tiny_actor(seed: int):
    """A tiny Qwen2 with AdamW and a warmup schedule; nothing trained yet."""
    config = tiny_model_config(len(TOKENIZER), 32, 1, 1, TOKENIZER.pad_token_id, TOKENIZER.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, build_scheduler(optimizer, 3, 10, 0.1)


def train_step(model, optimizer, scheduler, seed: int) -> None:
    ids = torch.randint(0, len(TOKENIZER), (2, 6), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def draws() -> tuple[float, float, list[float]]:
    """The next value of each generator RNGState covers."""
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def state_of(model, optimizer, scheduler, trainer: dict) -> dict:
    return {"actor": ModelOptimizerState(model, optimizer, scheduler), "trainer": trainer, "rng": RNGState()}


def small_state(value: float) -> dict:
    """A state without a model: enough for pruning and resolution."""
    return {"trainer": {"weights": torch.full((4,), value), "step": int(value)}}


def values_in(path: str) -> float:
    box = small_state(-1.0)
    CheckpointManager(os.path.dirname(path), keep_last=0).load(path, box)
    return float(box["trainer"]["weights"][0])


# --- round trip ---------------------------------------------------------------------------------


def test_round_trip_restores_model_optimizer_scheduler_rng_and_extra(tmp_path):
    model, optimizer, scheduler = tiny_actor(seed=0)
    for i in range(2):
        train_step(model, optimizer, scheduler, seed=i)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    path = manager.save(7, state_of(model, optimizer, scheduler, {"epoch": 1, "position": 24}),
                        hf_config=model.config, tokenizer=TOKENIZER, extra={"run": "a"})
    assert path == str(tmp_path / "ckpt" / "step_00000007")
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_00000007"
    assert (tmp_path / "ckpt" / "step_00000007" / "hf" / "config.json").is_file()
    assert (tmp_path / "ckpt" / "step_00000007" / "rng" / "rank_00000.pt").is_file()
    expected_draws = draws()

    fresh, fresh_opt, fresh_sched = tiny_actor(seed=1)
    assert not torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    trainer = {"epoch": 0, "position": 0}
    info = manager.load(manager.resolve("auto"), state_of(fresh, fresh_opt, fresh_sched, trainer))

    assert (info.step, info.world_size, info.extra) == (7, 1, {"run": "a"})
    assert trainer == {"epoch": 1, "position": 24}
    assert draws() == expected_draws
    for (name, want), (_, got) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(want, got), name
    assert fresh_sched.state_dict() == scheduler.state_dict()
    # The restored optimizer continues exactly as the original: same moments, same step count.
    train_step(model, optimizer, scheduler, seed=2)
    train_step(fresh, fresh_opt, fresh_sched, seed=2)
    for (name, want), (_, got) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(want, got), name


def test_missing_component_is_a_checkpoint_error(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=0)
    path = manager.save(1, small_state(1.0))
    with pytest.raises(CheckpointError, match="no component 'critic'"):
        manager.load(path, {**small_state(0.0), "critic": {"w": torch.zeros(2)}})


# --- atomic publication -------------------------------------------------------------------------

CRASHING_SAVE = textwrap.dedent("""
    import os, sys, torch
    from spmd_rlhf.trainer import checkpoint, checkpoint_files
    where, directory = sys.argv[1], sys.argv[2]
    manager = checkpoint.CheckpointManager(directory, keep_last=3)
    manager.save(1, {"trainer": {"weights": torch.full((4,), 1.0), "step": 1}})
    def crash(*args, **kwargs):
        os._exit(17)  # like a kill: no exception handling, no cleanup
    setattr(checkpoint_files, where, crash)
    manager.save(2, {"trainer": {"weights": torch.full((4,), 2.0), "step": 2}})
""")


@pytest.mark.parametrize("where", [
    "_fsync_dir",  # first call: every file and the manifest written, folder not yet renamed
    "_write_atomic",  # folder renamed to step_00000002, latest not yet replaced
])
def test_crash_during_save_leaves_previous_checkpoint_loadable(tmp_path, where):
    directory = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", CRASHING_SAVE, where, str(directory)], env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert (directory / "latest").read_text().strip() == "step_00000001"
    manager = CheckpointManager(directory, keep_last=3)
    resumed = manager.resolve("auto")
    assert resumed == str(directory / "step_00000001")
    assert values_in(resumed) == 1.0
    stale = [n for n in os.listdir(directory) if ".tmp-" in n]
    assert len(stale) == (1 if where == "_fsync_dir" else 0)
    manager.save(3, small_state(3.0))  # the next save clears what the crash left behind
    assert not [n for n in os.listdir(directory) if ".tmp-" in n]
    assert manager.resolve("auto") == str(directory / "step_00000003")


# --- pruning ------------------------------------------------------------------------------------


def test_keep_last_prunes_oldest_and_stale_temporary_folders(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    (tmp_path / "step_00000000.tmp-deadbeef").mkdir()  # left by a crashed save
    (tmp_path / "latest.tmp-deadbeef").write_text("step_00000000")
    for step in (1, 2, 3, 4):
        manager.save(step, small_state(float(step)))
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000003", "step_00000004"]
    assert values_in(str(tmp_path / "step_00000003")) == 3.0


def test_keep_last_zero_keeps_every_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=0)
    for step in (1, 2, 3):
        manager.save(step, small_state(float(step)))
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("step_")) == [step_folder_name(s) for s in (1, 2, 3)]


def test_pruning_never_removes_the_checkpoint_latest_names(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(5, small_state(5.0))
    manager.save(3, small_state(3.0))  # e.g. resumed from an earlier step: step 5 is newer by number
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000003", "step_00000005"]
    assert manager.resolve("auto") == str(tmp_path / "step_00000003")


def test_saving_a_step_again_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=0)
    manager.save(2, small_state(2.0))
    manager.save(2, small_state(20.0))
    assert values_in(manager.resolve("auto")) == 20.0
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000002"]


def test_negative_keep_last_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="keep_last=-1"):
        CheckpointManager(tmp_path, keep_last=-1)


# --- resolve ------------------------------------------------------------------------------------


@pytest.fixture
def three_checkpoints(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=0)
    for step in (10, 20, 30):
        manager.save(step, small_state(float(step)))
    return manager, tmp_path / "ckpt"


def test_resolve_never_and_auto(three_checkpoints, tmp_path):
    manager, directory = three_checkpoints
    assert manager.resolve("never") is None
    assert manager.resolve("auto") == str(directory / "step_00000030")
    assert CheckpointManager(tmp_path / "nothing_yet", keep_last=1).resolve("auto") is None


@pytest.mark.parametrize("latest", [None, "step_00000099\n", "garbage"])
def test_resolve_auto_falls_back_to_newest_complete_folder(three_checkpoints, latest):
    manager, directory = three_checkpoints
    (directory / "latest").unlink()
    if latest is not None:
        (directory / "latest").write_text(latest)
    (directory / "step_00000040").mkdir()  # a folder without manifest: not complete, never chosen
    assert manager.resolve("auto") == str(directory / "step_00000030")


def test_resolve_path(three_checkpoints, tmp_path):
    manager, directory = three_checkpoints
    assert manager.resolve(str(directory / "step_00000020")) == str(directory / "step_00000020")
    assert manager.resolve(str(directory)) == str(directory / "step_00000030")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="trainer.resume="):
        manager.resolve(str(tmp_path / "empty"))
    (directory / "step_00000040").mkdir()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        manager.resolve(str(directory / "step_00000040"))


# --- damaged checkpoints ------------------------------------------------------------------------


@pytest.fixture
def two_actor_checkpoints(tmp_path):
    model, optimizer, scheduler = tiny_actor(seed=0)
    train_step(model, optimizer, scheduler, seed=0)
    manager = CheckpointManager(tmp_path, keep_last=0)
    for step in (1, 2):
        manager.save(step, state_of(model, optimizer, scheduler, {"step": step}))
    return manager, tmp_path / "step_00000002"


def load_fresh(manager, path, verify: bool = True):
    model, optimizer, scheduler = tiny_actor(seed=1)
    return manager.load(str(path), state_of(model, optimizer, scheduler, {"step": 0}), verify=verify)


def data_file(path) -> str:
    names = [n for n in os.listdir(path) if n.endswith(".distcp")]
    assert len(names) == 1
    return os.path.join(path, names[0])


def garble(file: str, offset: int = 0) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        chunk = f.read(64)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in chunk))


def test_garbled_dcp_metadata(two_actor_checkpoints):
    manager, path = two_actor_checkpoints
    garble(str(path / ".metadata"))
    with pytest.raises(CheckpointError, match=r"step_00000002/\.metadata is damaged") as err:
        load_fresh(manager, path)
    assert "trainer.resume=" in str(err.value) and "step_00000001" in str(err.value), "names the earlier step"


def test_truncated_data_file(two_actor_checkpoints):
    manager, path = two_actor_checkpoints
    file = data_file(path)
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    for verify in (True, False):  # sizes are checked even without checksums
        with pytest.raises(CheckpointError, match=rf"{os.path.basename(file)} has \d+ bytes.*truncated"):
            load_fresh(manager, path, verify=verify)


def test_garbled_data_file_fails_its_checksum(two_actor_checkpoints):
    manager, path = two_actor_checkpoints
    file = data_file(path)
    garble(file, offset=os.path.getsize(file) // 2)  # inside tensor bytes: unpickling alone would not notice
    with pytest.raises(CheckpointError, match=rf"{os.path.basename(file)} does not match its checksum"):
        load_fresh(manager, path)


def test_missing_rank_file(two_actor_checkpoints):
    manager, path = two_actor_checkpoints
    os.remove(path / "rng" / "rank_00000.pt")
    with pytest.raises(CheckpointError, match=r"rng/rank_00000\.pt is missing.*step_00000001"):
        load_fresh(manager, path)


def test_garbled_manifest(two_actor_checkpoints):
    manager, path = two_actor_checkpoints
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"manifest\.json is unreadable or damaged"):
        load_fresh(manager, path)
    assert manager.resolve("auto") == str(path), "a damaged folder is still the latest; loading it says why"


def test_manifest_lists_every_file_with_size(two_actor_checkpoints):
    _, path = two_actor_checkpoints
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {".metadata", os.path.basename(data_file(path)), "rng/rank_00000.pt"}
    for rel, info in manifest["files"].items():
        assert info["bytes"] == os.path.getsize(path / rel)
    assert (manifest["step"], manifest["world_size"], manifest["components"], manifest["per_rank"]) == \
        (2, 1, ["actor", "trainer"], ["rng"])


# --- preemption ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_sets_the_flag_and_close_restores_handlers(sig):
    seen = []
    before = signal.signal(sig, lambda s, f: seen.append(s))
    try:
        with PreemptionHandler() as handler:
            assert not handler.requested()
            os.kill(os.getpid(), sig)
            assert handler.requested() and handler.received == sig
            assert seen == [], "the signal went to the preemption handler, not the previous one"
        os.kill(os.getpid(), sig)
        assert seen == [sig], "the previous handler is back after close"
    finally:
        signal.signal(sig, before)
