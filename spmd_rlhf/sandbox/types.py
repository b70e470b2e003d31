"""What a sandbox call takes (limits, a program or a function call) and what it gives back."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed program (each one enforced by the OS, see ``spmd_rlhf.sandbox``)."""

    timeout_s: float = 10.0  # wall clock; the program's process group is killed after it
    cpu_s: float | None = None  # CPU seconds (RLIMIT_CPU); None = timeout_s
    memory_mb: int = 1024  # address space (RLIMIT_AS) of each process
    max_output_bytes: int = 1 << 20  # per stream; more kills the program (status output_truncated)
    max_processes: int = 32  # tasks (threads too) of the sandbox user (RLIMIT_NPROC; only when run as root)
    max_file_mb: int = 64  # largest file the program may write (RLIMIT_FSIZE)

    def validate(self, prefix: str = "sandbox") -> None:
        """Raise ValueError naming ``<prefix>.<field>`` for a limit that cannot work."""
        checks = [("timeout_s", self.timeout_s), ("memory_mb", self.memory_mb),
                  ("max_output_bytes", self.max_output_bytes), ("max_processes", self.max_processes),
                  ("max_file_mb", self.max_file_mb)]
        if self.cpu_s is not None:
            checks.append(("cpu_s", self.cpu_s))
        for name, value in checks:
            if not value > 0:
                raise ValueError(f"{prefix}.{name}={value} must be > 0")

    @property
    def cpu_seconds(self) -> float:
        return float(self.cpu_s if self.cpu_s is not None else self.timeout_s)


class Status(str, enum.Enum):
    """How a sandboxed program or call ended."""

    OK = "ok"  # exit code 0 / the function returned
    ERROR = "error"  # non-zero exit, uncaught exception, killed by a signal
    TIMEOUT = "timeout"  # wall clock or CPU time ran out
    MEMORY = "memory"  # MemoryError under the address-space limit
    OUTPUT_TRUNCATED = "output_truncated"  # stdout or stderr passed max_output_bytes; the program was killed
    ABORTED = "aborted"  # a Call raised a BaseException that is no Exception (SystemExit, KeyboardInterrupt, ...)
    SANDBOX_ERROR = "sandbox_error"  # the worker itself failed (crashed, could not start); it is replaced


@dataclass(frozen=True)
class Program:
    """Python source run as ``__main__`` in a fresh, limited process with ``stdin`` as its input."""

    code: str
    stdin: str = ""
    limits: SandboxLimits | None = None  # None = the pool's limits


@dataclass(frozen=True)
class Call:
    """``module:function`` called with ``kwargs`` inside a worker (trusted code that may stall or crash).

    The result must be JSON-serialisable. A call past ``timeout_s`` gets its worker killed and replaced.
    """

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 5.0
    preload: tuple[str, ...] = ()  # modules a pool started for this call imports up front (slow imports)


@dataclass(frozen=True)
class Outcome:
    """The result of a Program (stdout/stderr as text, at most max_output_bytes each) or of a Call (value)."""

    status: Status
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    exit_code: int | None = None  # None when killed by a signal or for a Call
    value: Any = None  # a Call's return value

    @property
    def ok(self) -> bool:
        return self.status is Status.OK
