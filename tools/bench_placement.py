"""Wall time per step of the embedded default, split placement against colocated, on CPU.

    python tools/bench_placement.py [--steps 12] [-- extra overrides ...]

Runs ``torchrun -m spmd_rlhf.train`` for: colocated on 2 and on 3 ranks, split with 1 generation
and 2 training ranks at ``trainer.max_staleness`` 0 and 1 (TIS on). Every run has the same global
batch (48 prompts x 8 samples, 2 mini-batches: divisible over 2 and 3 ranks), a short warm start
and no evaluation. A step's wall time is the gap between consecutive step records of rank 0's
metrics.jsonl (everything a step costs, the split weight push included); the table gives the
median over the steps after the first, and the phase times rank 0 logged (medians).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import torch

COMMON = ["trainer.batch_size=48", "trainer.mini_batch_size=24", "trainer.sft.steps=50",
          "trainer.sft.batch_size=48", "trainer.eval_before=false", "trainer.eval_after=false",
          "logging.progress_bar=false", "logging.console=false"]
SPLIT = ["distributed.placement=split", "distributed.generation_ranks=1"]
RUNS = [("colocate", 2, []), ("colocate", 3, []), ("split 1 gen + 2 train, k=0", 3, SPLIT),
        ("split 1 gen + 2 train, k=1", 3, [*SPLIT, "trainer.max_staleness=1", "algorithm.tis_cap=2.0"])]
PHASES = ("timing/generate", "timing/reference", "timing/update", "timing/reshard")


def run(name: str, ranks: int, overrides: list[str], steps: int, root: str) -> dict:
    run_dir = os.path.join(root, name.replace(" ", "_").replace(",", "").replace("=", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "spmd_rlhf.train", f"hydra.run.dir={run_dir}", f"trainer.total_steps={steps}", *COMMON, *overrides]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    records = [r for r in records if "rollout/reward" in r]
    gaps = [b["time"] - a["time"] for a, b in zip(records, records[1:])]
    phases = {k: statistics.median(r[k] for r in records[1:] if k in r) for k in PHASES
              if any(k in r for r in records[1:])}
    return {"name": name, "ranks": ranks, "step_s": statistics.median(gaps), **phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        rows = [run(name, ranks, [*extra, *args.overrides], args.steps, root) for name, ranks, extra in RUNS]
    print(f"embedded default, batch 48 x 8, {args.steps} steps; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    header = ["placement", "ranks", "s/step", *[k.split("/")[1] for k in PHASES]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [row["name"], str(row["ranks"]), f"{row['step_s']:.3f}"]
        cells += [f"{row[k]:.3f}" if k in row else "-" for k in PHASES]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
