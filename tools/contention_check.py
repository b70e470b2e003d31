"""Run end-to-end tests again and again on a loaded machine, and count how often each fails.

    python tools/contention_check.py                                  # fault + resume tests, 10 runs, 1 busy loop
    python tools/contention_check.py --runs 20 --busy 2 tests/integration/test_faults.py
    python tools/contention_check.py --runs 5 -k preemption tests/integration/test_faults.py

A test that passes alone can fail when its processes compete for the CPU: a thread that is late,
a wall-clock threshold, a race at exit. Beside every run, ``--busy`` processes spin on a core each
(``python -c 'while True: pass'``); they are killed when the check ends, however it ends. Each run
is one ``pytest`` over the given tests; its per-test outcomes come from pytest's JUnit XML, and the
whole output of a run with a failure is kept in ``--out``. The table gives, per test, the runs it
passed and failed and its slowest time; the exit status is 1 if any run failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from tests.launch import busy_loops, kill_tree  # noqa: E402  (the tests' own helpers)
DEFAULT_TESTS = ["tests/integration/test_faults.py", "tests/integration/test_resume.py"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", nargs="*", default=DEFAULT_TESTS, help="pytest paths or node ids")
    parser.add_argument("--runs", type=int, default=10, help="how many times to run the tests (default 10)")
    parser.add_argument("--busy", type=int, default=1, help="busy-loop processes beside them (default 1)")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one run may take (default 3600)")
    parser.add_argument("--out", default=None, help="folder for the JUnit files and failed runs' output")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.busy < 0:
        parser.error("--runs must be >= 1 and --busy >= 0")
    return args


def run_once(args: argparse.Namespace, index: int, out: Path) -> tuple[int, dict[str, tuple[str, float]], float]:
    """One pytest run: (exit status, {test id: (outcome, seconds)}, wall seconds)."""
    junit = out / f"run{index:03d}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args.tests]
    if args.keyword:
        cmd += ["-k", args.keyword]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        output, _ = proc.communicate()
        output += f"\n[contention_check] run {index} killed after {args.timeout:.0f} s\n"
    except BaseException:  # interrupted: leave nothing of the run behind
        kill_tree(proc.pid)
        proc.wait()
        raise
    seconds = time.monotonic() - start
    outcomes = read_junit(junit) if junit.is_file() else {}
    if proc.returncode != 0:
        (out / f"run{index:03d}.log").write_text(output)
    return proc.returncode, outcomes, seconds


def read_junit(path: Path) -> dict[str, tuple[str, float]]:
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        outcomes[name] = (outcome, float(case.get("time", 0.0)))
    return outcomes


def report(results: list[tuple[int, dict[str, tuple[str, float]], float]], busy: int) -> str:
    table: dict[str, dict[str, float]] = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0, "max_s": 0.0})
    for _, outcomes, _ in results:
        for name, (outcome, seconds) in outcomes.items():
            row = table[name]
            row[outcome] += 1
            row["max_s"] = max(row["max_s"], seconds)
    width = max([len(n) for n in table] + [4])
    lines = [f"{'test':<{width}}  passed  failed  skipped  slowest_s"]
    for name, row in sorted(table.items()):
        lines.append(f"{name:<{width}}  {row['passed']:6d}  {row['failed']:6d}  {row['skipped']:7d}  {row['max_s']:9.1f}")
    failed_runs = [i for i, (rc, _, _) in enumerate(results) if rc != 0]
    walls = [s for _, _, s in results]
    which = f" (runs {failed_runs})" if failed_runs else ""
    lines.append(f"{len(results)} runs beside {busy} busy loop(s): {len(failed_runs)} with a failure{which}; "
                 f"run wall time {min(walls):.0f}-{max(walls):.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="contention_check_"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with busy_loops(args.busy):  # killed however the runs end
        for index in range(args.runs):
            rc, outcomes, seconds = run_once(args, index, out)
            failed = sorted(n for n, (o, _) in outcomes.items() if o == "failed")
            print(f"run {index}: exit {rc} in {seconds:.0f} s" + (f", failed: {failed}" if failed else ""), flush=True)
            results.append((rc, outcomes, seconds))
    print(report(results, args.busy))
    print(f"JUnit files and failed runs' output: {out}")
    return 1 if any(rc != 0 for rc, _, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
