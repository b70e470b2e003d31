"""Inside a worker: run one Program in a forked, limited child and collect its outcome."""

from __future__ import annotations

import builtins
import io
import os
import selectors
import signal
import sys
import tempfile
import time
import types
from typing import Any, NoReturn

from .isolation import apply_limits, die_with_parent, drop_privileges, kill_tree

MEMORY_EXIT = 0x6D  # the child's exit code for an uncaught MemoryError (status memory)
_SETUP_EXIT = 0x7E  # the child could not set itself up: limits, user, directory (status sandbox_error)
_CHUNK = 65536
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def _run_main(path: str) -> int:
    """Run the file at ``path`` as ``__main__`` the way ``python path`` would; return the exit code."""
    import traceback

    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv = [path]
    sys.path[0] = os.getcwd()
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        exec(compile(source, path, "exec"), main.__dict__)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except MemoryError:
        code = MEMORY_EXIT
        os.write(2, b"MemoryError\n")
    except BaseException as exc:  # print it as python would, without this function's frame
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    return code


def _child(path: str, workdir: str, limits: dict[str, Any], uid: int | None, fds: tuple[int, int, int]) -> NoReturn:
    """The forked child: become a limited, unprivileged session leader in ``workdir``, then run ``path``."""
    try:
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, 1 << 16)
        os.chdir(workdir)
        max_processes = limits["max_processes"] if uid is not None else None  # the caller's user: not counted
        apply_limits(limits["cpu_s"], limits["memory_mb"], max_processes, limits["max_file_mb"])
        if uid is not None:
            drop_privileges(uid)
        die_with_parent()
        os.environ.clear()
        os.environ.update(_ENV, HOME=workdir, TMPDIR=workdir)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                      errors="backslashreplace", line_buffering=True)
    except BaseException as exc:
        try:
            os.write(2, f"sandbox setup failed: {type(exc).__name__}: {exc}\n".encode())
        finally:
            os._exit(_SETUP_EXIT)
    os._exit(_run_main(path))


class _Streams:
    """The worker's ends of the child's stdin/stdout/stderr, read with a per-stream cap."""

    def __init__(self, stdin: bytes, cap: int) -> None:
        self.child_fds: tuple[int, int, int]
        in_r, self.in_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.err_r, err_w = os.pipe()
        self.child_fds = (in_r, out_w, err_w)
        self.pending = memoryview(stdin)
        self.data = {self.out_r: bytearray(), self.err_r: bytearray()}
        self.cap = cap
        self.truncated = False

    def after_fork(self) -> None:
        for fd in self.child_fds:
            os.close(fd)
        for fd in (self.in_w, self.out_r, self.err_r):
            os.set_blocking(fd, False)

    def read(self, fd: int) -> bool:
        """Read what ``fd`` has; False at end of file. Marks truncation past the cap."""
        try:
            chunk = os.read(fd, _CHUNK)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        buf = self.data[fd]
        buf += chunk
        if len(buf) > self.cap:
            del buf[self.cap:]
            self.truncated = True
        return True

    def write_stdin(self) -> bool:
        """Write more of stdin; False once all is written (or the child closed its end)."""
        try:
            self.pending = self.pending[os.write(self.in_w, self.pending[:_CHUNK]):]
        except BlockingIOError:
            return True
        except BrokenPipeError:
            self.pending = self.pending[:0]
        return bool(self.pending)

    def close_stdin(self) -> None:
        if self.in_w >= 0:
            os.close(self.in_w)
            self.in_w = -1

    def close(self) -> None:
        self.close_stdin()
        for fd in (self.out_r, self.err_r):
            os.close(fd)

    def text(self, fd: int) -> str:
        return self.data[fd].decode("utf-8", errors="replace")


def _pump(pid: int, streams: _Streams, deadline: float) -> str | None:
    """Move data until the child exits, the deadline passes ("timeout") or output overflows ("truncated")."""
    pidfd = os.pidfd_open(pid)
    with selectors.DefaultSelector() as sel:
        sel.register(pidfd, selectors.EVENT_READ)
        sel.register(streams.out_r, selectors.EVENT_READ)
        sel.register(streams.err_r, selectors.EVENT_READ)
        if streams.pending:
            sel.register(streams.in_w, selectors.EVENT_WRITE)
        else:
            streams.close_stdin()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout"
                for key, _ in sel.select(left):
                    fd = key.fd
                    if fd == pidfd:
                        return None
                    if fd == streams.in_w:
                        if not streams.write_stdin():  # all written: end of file for the child
                            sel.unregister(fd)
                            streams.close_stdin()
                    elif not streams.read(fd):
                        sel.unregister(fd)
                    if streams.truncated:
                        return "truncated"
        finally:
            os.close(pidfd)


def _drain(streams: _Streams, timeout_s: float = 1.0) -> None:
    """Read what is left in the output pipes once every writer is dead (end of file, or ``timeout_s``)."""
    open_fds = [streams.out_r, streams.err_r]
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        for fd in open_fds:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and not streams.truncated:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for key, _ in sel.select(left):
                if not streams.read(key.fd):
                    sel.unregister(key.fd)


def reap_all() -> None:
    """Wait for every child of this process (all of them must already be killed)."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _status(stop: str | None, wait_status: int, cpu_used: float, cpu_limit: float) -> tuple[str, int | None]:
    if stop == "truncated":
        return "output_truncated", None
    if stop == "timeout":
        return "timeout", None
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= cpu_limit - 0.05):
            return "timeout", None
        return "error", None
    code = os.WEXITSTATUS(wait_status)
    if code == 0:
        return "ok", 0
    if code == _SETUP_EXIT:
        return "sandbox_error", code
    return ("memory" if code == MEMORY_EXIT else "error"), code


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, 0o700)  # the program may have locked its own directories
        for entry in os.scandir(path):
            _remove(entry.path)
        os.rmdir(path)
    else:
        os.unlink(path)


def _empty(workdir: str) -> None:
    """Remove everything a program left in ``workdir`` (whatever permissions it set)."""
    os.chmod(workdir, 0o700)
    for entry in os.scandir(workdir):
        _remove(entry.path)


def fresh_workdir(base: str, uid: int | None) -> str:
    """An empty directory for one program (owned by the program's user); ``base``/job, reused."""
    workdir = os.path.join(base, "job")
    if os.path.isdir(workdir) and not os.path.islink(workdir):
        try:
            _empty(workdir)
            return workdir
        except (OSError, RecursionError):
            os.rename(workdir, tempfile.mkdtemp(prefix="stale_", dir=base))  # removed with the pool
    os.mkdir(workdir, 0o700)
    if uid is not None:
        os.chown(workdir, uid, uid)
    return workdir


def run_program(request: dict[str, Any], uid: int | None) -> dict[str, Any]:
    """Run ``request`` (code, stdin, limits) in an empty directory; the result message for the pool.

    The directory is emptied after the call (making and removing a directory per call costs
    milliseconds on some file systems; emptying one costs microseconds).
    """
    limits = request["limits"]
    start = time.monotonic()
    workdir = fresh_workdir(os.getcwd(), uid)
    path = os.path.join(workdir, "main.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(request["code"])
    streams = _Streams(request["stdin"].encode(), limits["max_output_bytes"])
    try:
        pid = os.fork()
        if pid == 0:
            _child(path, workdir, limits, uid, streams.child_fds)
        streams.after_fork()
        stop = _pump(pid, streams, start + limits["timeout_s"])
        kill_tree(os.getpid(), include_root=False)  # the child's group, and orphans re-parented to us
        _, wait_status, usage = os.wait4(pid, 0)
        reap_all()
        _drain(streams)
        status, code = _status(stop, wait_status, usage.ru_utime + usage.ru_stime, limits["cpu_s"])
        return {"status": status, "stdout": streams.text(streams.out_r), "stderr": streams.text(streams.err_r),
                "exit_code": code, "duration_s": time.monotonic() - start}
    finally:
        streams.close()
        try:
            _empty(workdir)
        except (OSError, RecursionError):
            pass  # the next call replaces it
