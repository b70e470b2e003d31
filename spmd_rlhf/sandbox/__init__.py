"""Run untrusted code in separate, limited processes (a reusable worker pool).

What is isolated (Linux):
- wall clock: each program's session is SIGKILLed at ``timeout_s``; orphans (double forks, setsid)
  are re-parented to the worker (a child subreaper) and killed too, so nothing outlives a call;
- CPU time (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE), no core dumps;
- output: stdout and stderr are capped at ``max_output_bytes`` each; more kills the program;
- files and processes: an empty working directory (also HOME and TMPDIR), emptied after every call
  and removed with the pool.
  Run as root, the program runs as an unprivileged user (65533 minus the worker's index) that keeps
  only CAP_DAC_READ_SEARCH (to read the interpreter wherever it lives) under no_new_privs: it cannot
  write what that user cannot (world-writable places such as /tmp stay writable), cannot signal
  other processes, and RLIMIT_NPROC bounds fork bombs. Not root, it keeps the caller's user and
  permissions and there is no process limit (RLIMIT_NPROC would count all of the caller's threads):
  a fork bomb is only ended by the wall clock, its tree frozen and killed;
- network: workers live in a new network namespace (root: directly; others: through a user
  namespace where the kernel allows it); ``SandboxPool.network_isolated`` says whether that held.
Not isolated: reading files (as root, every file can be read), and there is no
seccomp filter or cgroup. A program runs inside a fork of the worker (a bare Python interpreter with
this package imported), not a fresh interpreter, which is what makes a call take milliseconds; the
memory limit counts that interpreter too (about 60-100 MB of address space). Needs Linux >= 5.3
(pidfd).

A Call (trusted code that may stall, crash or leave processes behind: math-verify, a user's reward
function) runs in the worker itself, under the address-space limit when the pool sets one; past its
timeout the worker is killed with its whole tree and replaced; processes it leaves are killed after it.
"""

from .pool import SandboxPool
from .types import Call, Outcome, Program, SandboxLimits, Status

__all__ = ["Call", "Outcome", "Program", "SandboxLimits", "SandboxPool", "Status"]
