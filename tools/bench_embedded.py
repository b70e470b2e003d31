"""Wall time and held-out accuracy of the embedded default, per rank count and algorithm.

    python tools/bench_embedded.py --ranks 1 2 4 [-- extra overrides ...]
    python tools/bench_embedded.py --ranks 2 --algorithms grpo ppo rloo dapo [-- overrides ...]

Each run is ``python -m spmd_rlhf.train`` (1 rank) or ``torchrun --nproc-per-node N -m
spmd_rlhf.train`` in a fresh run directory; the table gives the wall time of the whole command
(imports, warm start, GRPO, both evaluations) and the held-out accuracy before and after GRPO,
read from the run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


def run(ranks: int, overrides: list[str], root: str, algorithm: str | None = None) -> dict:
    run_dir = os.path.join(root, f"ranks{ranks}_{algorithm or 'default'}")
    chosen = [f"algorithm={algorithm}"] if algorithm else []
    args = ["-m", "spmd_rlhf.train", f"hydra.run.dir={run_dir}", "logging.progress_bar=false", *chosen, *overrides]
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *args]
    env = dict(os.environ, WANDB_MODE="disabled")
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{ranks} ranks failed:\n{proc.stderr[-4000:]}")
    evals = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if "eval/accuracy" in line]
    return {"ranks": ranks, "algorithm": algorithm or "(default)", "seconds": seconds,
            "before": evals[0]["eval/accuracy"], "after": evals[-1]["eval/accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--algorithms", nargs="+", default=[None], help="config group choices, e.g. ppo rloo")
    parser.add_argument("overrides", nargs="*", help="trainer overrides, e.g. rollout.engine=vllm")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bench_embedded_")
    print(f"# {time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"overrides: {' '.join(args.overrides) or '(none)'}")
    print("| algorithm | ranks | wall time | held-out before | after | change |")
    print("| --- | --- | --- | --- | --- | --- |")
    for algorithm in args.algorithms:
        for ranks in args.ranks:
            r = run(ranks, args.overrides, root, algorithm)
            print(f"| {r['algorithm']} | {r['ranks']} | {r['seconds'] / 60:.1f} min | {r['before']:.3f} | "
                  f"{r['after']:.3f} | {100 * (r['after'] - r['before']):+.1f} pts |", flush=True)


if __name__ == "__main__":
    main()
