"""The sandbox pool: limits enforced by the OS, nothing outliving a call, workers replaced, clean close."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from spmd_rlhf.sandbox import Program, SandboxLimits, SandboxPool, Status

IS_ROOT = os.geteuid() == 0


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_dead(pids: list[int], timeout_s: float = 2.0) -> list[int]:
    """The pids still alive after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.02)
    return [p for p in pids if alive(p)]


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2, limits=SandboxLimits(timeout_s=5.0, memory_mb=256)) as p:
        yield p


def test_stdin_stdout_exit_codes(pool: SandboxPool) -> None:
    ok = pool.run("a, b = map(int, input().split())\nprint(a + b)", stdin="2 3\n")
    assert ok.status is Status.OK and ok.stdout == "5\n" and ok.exit_code == 0
    failed = pool.run("import sys\nprint('partial')\nsys.exit(3)")
    assert failed.status is Status.ERROR and failed.exit_code == 3 and failed.stdout == "partial\n"
    raised = pool.run("def f():\n    raise ValueError('bad input')\nf()")
    assert raised.status is Status.ERROR and raised.exit_code == 1
    assert raised.stderr.startswith("Traceback") and "ValueError: bad input" in raised.stderr
    assert "main.py" in raised.stderr and "spmd_rlhf" not in raised.stderr
    assert pool.run("if __name__ == '__main__':\n    print('main')").stdout == "main\n"


def test_many_programs_in_order(pool: SandboxPool) -> None:
    outcomes = pool.run_many([Program(f"print({i} * {i})") for i in range(40)])
    assert [o.stdout for o in outcomes] == [f"{i * i}\n" for i in range(40)]


def test_timeout_kills_the_program_and_its_grandchildren(pool: SandboxPool) -> None:
    code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '1000'])\n"
        "if os.fork() == 0:\n"  # a daemon: new session, parent gone
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(1000)\n"
        "    os._exit(0)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(1000)\n"
    )
    start = time.monotonic()
    outcome = pool.run(code, limits=SandboxLimits(timeout_s=0.5))
    elapsed = time.monotonic() - start
    assert outcome.status is Status.TIMEOUT
    assert 0.5 <= elapsed < 3.0
    sleeper = int(outcome.stdout.split()[0])
    assert wait_dead([sleeper]) == []
    for worker in pool.worker_pids():  # no descendant of any worker is left
        assert [p for p in _descendants(worker) if alive(p)] == []


def _descendants(pid: int) -> list[int]:
    from spmd_rlhf.sandbox.isolation import descendants
    return descendants(pid)


def test_child_that_outlives_its_parent_is_killed(pool: SandboxPool) -> None:
    code = "import os, time\npid = os.fork()\nif pid == 0:\n    time.sleep(1000)\nprint(pid)\n"
    start = time.monotonic()
    outcome = pool.run(code)
    assert outcome.status is Status.OK and time.monotonic() - start < 2.0  # not waiting for the child
    assert wait_dead([int(outcome.stdout)]) == []


def test_cpu_limit_stops_a_busy_loop(pool: SandboxPool) -> None:
    start = time.monotonic()
    outcome = pool.run("while True:\n    pass", limits=SandboxLimits(timeout_s=30.0, cpu_s=1.0))
    assert outcome.status is Status.TIMEOUT
    assert time.monotonic() - start < 15.0  # CPU seconds, well before the 30 s wall clock


def test_memory_limit(pool: SandboxPool) -> None:
    outcome = pool.run("x = bytearray(1 << 30)\nprint('allocated')")
    assert outcome.status is Status.MEMORY and outcome.stdout == "" and "MemoryError" in outcome.stderr
    small = pool.run("x = bytearray(16 << 20)\nprint(len(x))")  # well under 256 MB
    assert small.status is Status.OK and small.stdout == f"{16 << 20}\n"


def test_infinite_output_is_truncated(pool: SandboxPool) -> None:
    start = time.monotonic()
    limits = SandboxLimits(timeout_s=20.0, max_output_bytes=10_000)
    outcome = pool.run("while True:\n    print('x' * 999)", limits=limits)
    assert outcome.status is Status.OUTPUT_TRUNCATED
    assert outcome.stdout == ("x" * 999 + "\n") * 10
    assert time.monotonic() - start < 5.0  # killed at the cap, not at the timeout


def test_fresh_directory_for_every_call(pool: SandboxPool) -> None:
    litter = ("import os\nos.makedirs('d/e')\nopen('d/e/f.txt', 'w').write('x')\nopen('out.txt', 'w').write('x')\n"
              "os.chmod('d/e', 0)\nos.chmod('d', 0)\nprint(os.getcwd())")
    looks = "import os\nprint(sorted(os.listdir('.')), os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR'])"
    outcomes = pool.run_many([Program(litter)] * 2 + [Program(looks)] * 4)
    assert [o.status for o in outcomes[:2]] == [Status.OK] * 2  # the second one could make d/e again
    assert [o.stdout for o in outcomes[2:]] == ["['main.py'] True\n"] * 4
    workdir = outcomes[0].stdout.strip()
    assert os.path.isdir(workdir) and os.listdir(workdir) == []  # emptied after the call


def test_close_removes_the_directories() -> None:
    with SandboxPool(workers=1) as pool:
        workdir = pool.run("import os\nopen('x', 'w').write('x')\nprint(os.getcwd())").stdout.strip()
    assert not os.path.exists(workdir) and not os.path.exists(os.path.dirname(os.path.dirname(workdir)))


@pytest.mark.skipif(not IS_ROOT, reason="programs keep the caller's user (and its permissions) when not root")
def test_cannot_write_outside_its_directory(pool: SandboxPool, tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    target = tmp_path / "escaped.txt"
    outcome = pool.run(f"open({str(target)!r}, 'w').write('x')")
    assert outcome.status is Status.ERROR and "PermissionError" in outcome.stderr
    assert not target.exists()


@pytest.mark.skipif(not IS_ROOT, reason="RLIMIT_NPROC binds only a dedicated (non-root) user")
def test_fork_bomb_is_bounded_and_cleaned_up(pool: SandboxPool) -> None:
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    outcome = pool.run(code, limits=SandboxLimits(timeout_s=1.0, max_processes=20))
    assert outcome.status is Status.TIMEOUT
    leftovers = [p for w in pool.worker_pids() for p in _descendants(w) if alive(p)]
    assert leftovers == []
    assert pool.run("print('still serving')").stdout == "still serving\n"
    counted = ("import os, time\nstarted = 0\nfor _ in range(40):\n    try:\n        pid = os.fork()\n"
               "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(100)\n    started += 1\n"
               "print(started)\n")
    outcome = pool.run(counted, limits=SandboxLimits(timeout_s=5.0, max_processes=10))
    assert outcome.stdout == "9\n"  # the program itself is the 10th task of its user


def test_no_network(pool: SandboxPool) -> None:
    if not pool.network_isolated:
        pytest.skip("this kernel/user cannot create a network namespace; network is not isolated here")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    print('connected')\nexcept OSError as e:\n    print('blocked')\n")
    try:
        assert pool.run(code).stdout == "blocked\n"
    finally:
        server.close()


def test_crashing_worker_is_replaced(pool: SandboxPool) -> None:
    before = pool.worker_pids()
    crashed = pool.call("ctypes:string_at", {"ptr": 0})  # a segfault inside the worker
    assert crashed.status is Status.SANDBOX_ERROR
    after = pool.worker_pids()
    assert len(set(before) - set(after)) == 1 and wait_dead(list(set(before) - set(after))) == []
    assert [o.stdout for o in pool.run_many([Program("print(7)")] * 4)] == ["7\n"] * 4


def test_worker_killed_while_idle_is_replaced(pool: SandboxPool) -> None:
    victim = pool.worker_pids()[0]
    os.kill(victim, 9)
    assert wait_dead([victim]) == []
    deadline = time.monotonic() + 5.0  # every thread gone and its pipes closed (a zombie leader can come first)
    while time.monotonic() < deadline and os.path.exists(f"/proc/{victim}/fd") and os.listdir(f"/proc/{victim}/fd"):
        time.sleep(0.02)
    # a job handed to the dead worker before the pool saw it die runs again on a fresh worker
    outcomes = pool.run_many([Program("print(1)")] * 4)
    assert [o.stdout for o in outcomes] == ["1\n"] * 4, outcomes
    assert victim not in pool.worker_pids()
    # the race made certain: a worker frozen before it reads its job, then killed
    victim = pool.worker_pids()[0]
    os.kill(victim, signal.SIGSTOP)
    results: list = []
    thread = threading.Thread(target=lambda: results.extend(pool.run_many([Program("print(2)")] * 4)))
    thread.start()
    time.sleep(0.5)  # the job sits unread in the frozen worker's pipe
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=30)
    assert [o.stdout for o in results] == ["2\n"] * 4, results
    assert victim not in pool.worker_pids()


def test_job_that_kills_its_worker_is_not_retried(pool: SandboxPool, tmp_path: Path) -> None:
    """A Call that kills its own worker reports sandbox_error once; it is not run a second time."""
    log = tmp_path / "runs.txt"
    code = f"open({str(log)!r}, 'a').write('x')\nimport os\nos.kill(os.getpid(), 9)"  # a Call runs in the worker
    crashed = pool.call("timeit:timeit", {"stmt": code, "number": 1}, timeout_s=5.0)
    assert crashed.status is Status.SANDBOX_ERROR and "worker died" in crashed.stderr, crashed
    assert log.read_text() == "x"
    assert pool.run("print(3)").stdout == "3\n"


def test_call_returns_value_and_times_out(pool: SandboxPool) -> None:
    assert pool.call("math:gcd", {}).value == 0
    assert pool.call("json:dumps", {"obj": [1, 2]}).value == "[1, 2]"
    assert pool.call("json:loads", {"s": "{"}).status is Status.ERROR
    start = time.monotonic()
    stuck = pool.call("subprocess:run", {"args": ["sleep", "1000"]}, timeout_s=0.5)
    assert stuck.status is Status.TIMEOUT and time.monotonic() - start < 3.0
    assert [p for w in pool.worker_pids() for p in _descendants(w) if alive(p)] == []
    assert pool.run("print(2)").stdout == "2\n"


def test_close_leaves_no_process() -> None:
    pool = SandboxPool(workers=2, limits=SandboxLimits(timeout_s=30.0))
    workers = pool.worker_pids()
    # a program still running while the pool closes (sent from a thread that then loses its pool)
    results = []
    thread = threading.Thread(target=lambda: results.append(pool.run("import time\ntime.sleep(1000)")))
    thread.start()
    time.sleep(0.5)
    tree = workers + [p for w in workers for p in _descendants(w)]
    assert len(tree) > len(workers)  # the sleeping program is part of it
    pool.close()
    thread.join(timeout=5)
    assert not thread.is_alive() and results[0].status is Status.SANDBOX_ERROR  # ended by close, not timeout
    assert wait_dead(tree) == []
    with pytest.raises(RuntimeError, match="closed"):
        pool.run("print(1)")


def test_stdin_without_final_newline_and_large(pool: SandboxPool) -> None:
    assert pool.run("import sys\nprint(len(sys.stdin.read()))", stdin="12").stdout == "2\n"
    big = "x" * (1 << 20)  # more than a pipe holds: written while the program reads
    assert pool.run("import sys\nprint(len(sys.stdin.read()))", stdin=big).stdout == f"{1 << 20}\n"
    unread = pool.run("print('ignored stdin')", stdin=big)  # the program never reads it
    assert unread.status is Status.OK and unread.stdout == "ignored stdin\n"


def test_descriptors_past_1024() -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("cannot open 1100 descriptors here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]  # the pool's pipes land past 1024
    try:
        with SandboxPool(workers=1) as pool:
            assert pool.run("print(5)").stdout == "5\n"
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_worker_start_failure_is_reported_and_cleaned_up() -> None:
    before = set(_descendants(os.getpid()))
    with pytest.raises(RuntimeError, match="no_such_module_for_the_sandbox"):
        SandboxPool(workers=2, preload=["no_such_module_for_the_sandbox"])
    assert wait_dead(list(set(_descendants(os.getpid())) - before)) == []
