"""Sandbox throughput: calls per second for N short programs on K workers, against starting a fresh
interpreter per program, plus the code and math rewards per scored row.

    python tools/bench_sandbox.py --programs 512 --workers 1 2 4 --out sandbox.json

Each program reads one line of stdin and prints a small computation on it (a typical stdin/stdout
test case). Pool start-up is timed separately: the figure is the steady state a training step sees.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time

from spmd_rlhf.rewards.registry import RewardScorer
from spmd_rlhf.sandbox import Program, SandboxPool, Status

PROGRAM = "n = int(input())\nprint(sum(i * i for i in range(n)))\n"
SOLUTION = f"```python\n{PROGRAM}```"


def bench_pool(programs: int, workers: int) -> dict[str, float]:
    """Start-up seconds and programs per second of a pool of ``workers``."""
    start = time.perf_counter()
    pool = SandboxPool(workers)
    started = time.perf_counter() - start
    try:
        jobs = [Program(PROGRAM, stdin=f"{i % 100}\n") for i in range(programs)]
        pool.run_many(jobs[: workers * 4])  # warm
        start = time.perf_counter()
        outcomes = pool.run_many(jobs)
        elapsed = time.perf_counter() - start
    finally:
        pool.close()
    wrong = sum(o.status is not Status.OK or o.stdout != f"{sum(k * k for k in range(i % 100))}\n"
                for i, o in enumerate(outcomes))
    assert wrong == 0, f"{wrong} wrong outcomes"
    return {"workers": workers, "programs": programs, "startup_s": started, "seconds": elapsed,
            "calls_per_s": programs / elapsed}


def bench_fresh_interpreter(programs: int) -> dict[str, float]:
    """Programs per second when each one starts its own interpreter (one at a time)."""
    start = time.perf_counter()
    for i in range(programs):
        subprocess.run([sys.executable, "-c", PROGRAM], input=f"{i % 100}\n", capture_output=True, text=True,
                       check=True)
    elapsed = time.perf_counter() - start
    return {"programs": programs, "seconds": elapsed, "calls_per_s": programs / elapsed}


def bench_rewards(rows: int, workers: int) -> dict[str, float]:
    """Rows per second of the code reward (4 tests a row) and the math reward, pools already started."""
    scorer = RewardScorer(None, timeout_s=10.0, sandbox_workers=workers)
    truth = json.dumps({"inputs": ["3\n", "4\n", "5\n", "6\n"], "outputs": ["5\n", "14\n", "30\n", "55\n"]})
    result: dict[str, float] = {"workers": workers, "rows": rows}
    cases = [("code", "codecontests", SOLUTION, truth), ("math", "math", "so \\boxed{\\frac{1}{2}}", "0.5")]
    if importlib.util.find_spec("math_verify") is None:
        cases = cases[:1]  # no math-verify installed here
    try:
        for name, source, response, gt in cases:
            scorer.score([source] * workers, [response] * workers, [gt] * workers, [None] * workers)  # start
            start = time.perf_counter()
            scores, _ = scorer.score([source] * rows, [response] * rows, [gt] * rows, [None] * rows)
            elapsed = time.perf_counter() - start
            assert scores == [1.0] * rows, scores[:8]
            result[f"{name}_rows_per_s"] = rows / elapsed
    finally:
        scorer.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--fresh", type=int, default=64, help="programs for the fresh-interpreter baseline")
    parser.add_argument("--reward-rows", type=int, default=128)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results = {"pool": [bench_pool(args.programs, k) for k in args.workers]}
    for row in results["pool"]:
        print(f"sandbox pool: {row['workers']} workers, {row['programs']} programs: {row['calls_per_s']:.0f} calls/s "
              f"(start-up {row['startup_s']:.2f} s)")
    results["fresh_interpreter"] = bench_fresh_interpreter(args.fresh)
    print(f"fresh interpreter per program: {results['fresh_interpreter']['calls_per_s']:.0f} calls/s")
    results["rewards"] = bench_rewards(args.reward_rows, max(args.workers))
    r = results["rewards"]
    math_rate = f"{r['math_rows_per_s']:.0f} rows/s" if "math_rows_per_s" in r else "not run (no math-verify)"
    print(f"rewards on {r['workers']} workers: code {r['code_rows_per_s']:.0f} rows/s (4 tests a row), math {math_rate}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
