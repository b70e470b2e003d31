"""Run untrusted code in separate, limited processes (a reusable worker pool).

What is isolated (Linux):
- wall clock: each program's session is SIGKILLed at ``timeout_s``; orphans (double forks, setsid)
  are re-parented to the worker (a child subreaper) and killed too, so nothing outlives a call;
- CPU time (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE), no core dumps;
- output: stdout and stderr are capped at ``max_output_bytes`` each; more kills the program;
- files and processes: a fresh working directory (also HOME and TMPDIR), removed after the call.
  Run as root, the program runs as an unprivileged user (65533 minus the worker's index) that keeps
  only CAP_DAC_READ_SEARCH (to read the interpreter wherever it lives) under no_new_privs: it cannot
  write what that user cannot (world-writable places such as /tmp stay writable), cannot signal
  other processes, and RLIMIT_NPROC bounds fork bombs. Not root, it keeps the caller's user and
  permissions, and RLIMIT_NPROC counts all of that user's processes (a bound, not an exact count);
- network: workers live in a new network namespace (root: directly; others: through a user
  namespace where the kernel allows it); ``SandboxPool.network_isolated`` says whether that held.
Not isolated: reading files (as root, every file can be read), and there is no
seccomp filter or cgroup. A program runs inside a fork of the worker (a bare Python interpreter with
this package imported), not a fresh interpreter, which is what makes a call take milliseconds.
"""

from .pool import SandboxPool
from .types import Call, Outcome, Program, SandboxLimits, Status

__all__ = ["Call", "Outcome", "Program", "SandboxLimits", "SandboxPool", "Status"]
