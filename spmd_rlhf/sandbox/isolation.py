"""OS mechanisms of the sandbox: network namespaces, resource limits, privilege drop, killing process trees.

Linux only. Everything here degrades to "not isolated" (reported, never silently claimed) where the
kernel or the privileges do not allow it.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS = 38
_CAP_VERSION_3 = 0x20080522
_CAP_DAC_READ_SEARCH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> bool:
    return _libc.unshare(flags) == 0


def isolate_network() -> bool:
    """Move this process into a new, empty network namespace (only a loopback that is down).

    Root (CAP_SYS_ADMIN) needs a network namespace only; others need a user namespace too, which the
    kernel may forbid. Returns whether the process is now without network. Call it single-threaded.
    """
    if _unshare(_CLONE_NEWNET):
        return True
    uid, gid = os.getuid(), os.getgid()
    if not _unshare(_CLONE_NEWUSER | _CLONE_NEWNET):
        return False
    try:  # map our own ids into the new user namespace so files keep their owner
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    except OSError:
        pass  # ids show as the overflow id inside; file access still uses the real ids
    return True


def set_subreaper() -> None:
    """Orphaned descendants of this process are re-parented to it (so it can find and kill them)."""
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (cleared by fork and by a change of user id)."""
    _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _set(limit: int, soft: int, hard: int | None = None) -> None:
    _, current_hard = resource.getrlimit(limit)
    hard = soft if hard is None else hard
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(limit, (soft, hard))


def apply_limits(cpu_s: float, memory_mb: int, max_processes: int | None, max_file_mb: int) -> None:
    """Resource limits of a sandboxed process (inherited by its children).

    ``max_processes`` (RLIMIT_NPROC, threads included) counts every task of the process's user: only
    meaningful for a user of the sandbox's own; None leaves it alone.
    """
    cpu = max(1, int(-(-cpu_s // 1)))  # whole seconds, rounded up
    _set(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU at the soft limit, SIGKILL a second later
    _set(resource.RLIMIT_AS, memory_mb << 20)
    _set(resource.RLIMIT_FSIZE, max_file_mb << 20)
    _set(resource.RLIMIT_CORE, 0)
    if max_processes is not None:
        _set(resource.RLIMIT_NPROC, max_processes)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _keep_only_read_search() -> None:
    """Capabilities: CAP_DAC_READ_SEARCH only (lost again by any execve of a non-root user)."""
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)(_CapData(1 << _CAP_DAC_READ_SEARCH, 1 << _CAP_DAC_READ_SEARCH, 0), _CapData(0, 0, 0))
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def drop_privileges(uid: int) -> None:
    """Become ``uid`` (group ``uid`` too, no supplementary groups); only root can.

    The process keeps CAP_DAC_READ_SEARCH so it can still read the interpreter and its libraries
    wherever they are installed (e.g. under a 0700 /root), but it writes, signals and forks as ``uid``.
    No execve can regain privileges (no_new_privs: setuid binaries do not elevate).
    """
    _libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _keep_only_read_search()
    _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads), from /proc."""
    result: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return result
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                result.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return result


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` (children first), from /proc."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        kids = [c for p in frontier for c in children(p)]
        found.extend(kids)
        frontier = kids
    return found


def kill_tree(pid: int, include_root: bool, rounds: int = 100) -> None:
    """SIGKILL every descendant of ``pid`` (and ``pid`` itself when asked).

    The tree is first frozen with SIGSTOP, walking again until no new process appears (a stopped process
    can neither fork nor exit, so orphans cannot slip away to init), then killed. Does not reap: the
    parent of each process must still wait for it.
    """
    frozen: list[int] = []
    seen: set[int] = set()
    for _ in range(rounds):
        found = descendants(pid) + ([pid] if include_root else [])
        new = [p for p in found if p not in seen]
        if not new:
            break
        for victim in new:
            seen.add(victim)
            frozen.append(victim)
            try:
                os.kill(victim, signal.SIGSTOP)
            except ProcessLookupError:
                pass
    for victim in frozen:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
