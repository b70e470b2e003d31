"""A run from ``model.path`` keeps no copy of its frozen reference in its checkpoints (a resume
rebuilds it from ``model.path``), and a resumed run is still bit-identical to one that never
stopped: the KL to the reference after the resume is the straight run's."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from spmd_rlhf.trainer.checkpoint import load_model_weights
from spmd_rlhf.trainer.checkpoint_files import step_folder_name
from tests.integration.jobs import Job, assert_clean_exit, train_records, training_metrics
from tests.integration.test_readme_path import make_tiny_model

# The embedded task on a tiny Qwen2 read from disk (no warm start: the reference is model.path's weights).
COMMON = ["trainer.sft.steps=0", "data.arithmetic.num_val=16", "trainer.batch_size=8", "trainer.mini_batch_size=4",
          "trainer.total_steps=4", "trainer.save_every=2", "trainer.lr=1e-2", "logging.progress_bar=false",
          "algorithm.entropy_coef=0.01"]  # a gradient even where every reward is 0: the actor leaves the reference
JOB_TIMEOUT = 300  # a hang guard


def run_to_end(args: list[str], log: Path) -> str:
    job = Job(args, 2, log)
    rc = job.wait(JOB_TIMEOUT)
    assert rc == 0, f"exit {rc}\n{job.output()[-6000:]}"
    assert_clean_exit(job)
    return job.output()


def test_a_resume_from_model_path_rebuilds_the_reference_and_stays_bit_identical(tmp_path: Path) -> None:
    model = tmp_path / "model"
    make_tiny_model(model)
    common = [*COMMON, f"model.path={model}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_to_end([*common, f"hydra.run.dir={straight}", f"trainer.checkpoint_dir={straight / 'ckpt'}"],
               tmp_path / "straight.log")
    half = straight / "ckpt" / step_folder_name(2)
    manifest = json.loads((half / "manifest.json").read_text())
    assert "actor" in manifest["components"] and "reference" not in manifest["components"], manifest["components"]

    out = run_to_end([*common, f"hydra.run.dir={resumed}", f"trainer.checkpoint_dir={resumed / 'ckpt'}",
                      f"trainer.resume={half}"], tmp_path / "resumed.log")
    assert f"resumed from {half} (step 2" in out

    a, b = train_records(straight), train_records(resumed)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        ma, mb = training_metrics(a[step]), training_metrics(b[step])
        assert ma["actor/kl_loss"] > 0, "the policy moved away from the reference"
        differ = {k: (ma[k], mb[k]) for k in ma if ma.get(k) != mb.get(k)}
        assert sorted(ma) == sorted(mb) and not differ, f"step {step}: {differ}"
    wa = load_model_weights(str(straight / "ckpt" / step_folder_name(4)))
    wb = load_model_weights(str(resumed / "ckpt" / step_folder_name(4)))
    assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
