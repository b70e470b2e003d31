"""A sandbox worker process: started by SandboxPool, serves Program and Call requests one at a time.

Run as ``python -m spmd_rlhf.sandbox.worker <request fd> <result fd> <settings json>``. It leaves the
network (when allowed), becomes the reaper of its orphaned descendants, imports the preload modules
and runs the init calls (e.g. loading the user's reward file), then limits the address space of what
calls add (``call_memory_mb`` beyond what it holds then: a module that maps gigabytes at import, as a
CUDA build of torch does, still loads), says hello, then answers requests until its request pipe
closes or its parent dies: for each one an ``accepted`` note as soon as it is read (the pool retries
a job lost before it), then the result.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from .isolation import isolate_network, kill_tree, set_subreaper
from .program import reap_all, run_program
from .protocol import recv, send

_functions: dict[str, Callable[..., Any]] = {}


def _resolve(target: str) -> Callable[..., Any]:
    if target not in _functions:
        module, _, name = target.partition(":")
        _functions[target] = getattr(importlib.import_module(module), name)
    return _functions[target]


def run_call(request: dict[str, Any]) -> dict[str, Any]:
    """Call ``target(**kwargs)`` in this process; kill whatever processes it left behind."""
    start = time.monotonic()
    try:
        value = _resolve(request["target"])(**request["kwargs"])
        json.dumps(value)
        result = {"status": "ok", "value": value}
    except MemoryError:
        result = {"status": "memory", "stderr": "MemoryError"}
    except Exception:
        result = {"status": "error", "stderr": traceback.format_exc()[-4000:]}
    except BaseException:  # SystemExit, KeyboardInterrupt, ...: the caller should stop, not score on
        result = {"status": "aborted", "stderr": traceback.format_exc()[-4000:]}
    kill_tree(os.getpid(), include_root=False)
    reap_all()
    result["duration_s"] = time.monotonic() - start
    return result


def address_space_bytes() -> int:
    """This process's virtual address space now (``VmSize``), what RLIMIT_AS counts."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _watch_parent(parent: int) -> None:
    """End this worker (and its descendants) once the pool's process is gone."""
    while os.getppid() == parent:
        time.sleep(0.25)
    kill_tree(os.getpid(), include_root=False)
    os._exit(1)


def main(argv: list[str]) -> int:
    request_fd, result_fd, settings = int(argv[1]), int(argv[2]), json.loads(argv[3])
    parent = os.getppid()
    set_subreaper()
    network_isolated = False if settings["network"] else isolate_network()
    try:
        for module in settings["preload"]:
            importlib.import_module(module)
        for target, kwargs in settings.get("init", []):
            _resolve(target)(**kwargs)
        if settings["call_memory_mb"]:
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = address_space_bytes() + (settings["call_memory_mb"] << 20)
            soft = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except BaseException:
        send(result_fd, {"hello": False, "stderr": traceback.format_exc()[-4000:]})
        return 1
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    send(result_fd, {"hello": True, "network_isolated": network_isolated, "pid": os.getpid()})
    uid = settings["uid"]
    while True:
        request = recv(request_fd)
        if request is None:
            break
        send(result_fd, {"accepted": True})  # from here on, a death of this worker is the job's doing
        try:
            result = run_program(request, uid) if request["kind"] == "program" else run_call(request)
        except Exception:  # the worker's own failure (no directory, no fork): report it, keep serving
            kill_tree(os.getpid(), include_root=False)
            reap_all()
            result = {"status": "sandbox_error", "stderr": traceback.format_exc()[-4000:]}
        send(result_fd, result)
    kill_tree(os.getpid(), include_root=False)
    reap_all()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
