"""``python -m tests.integration.exit_census OVERRIDES``: the trainer (``spmd_rlhf.train``) as every
rank runs it, plus a look at what is still alive when the interpreter starts to tear down.

Just before Python finalises, each rank writes ``<$EXIT_CENSUS_DIR>/rank<RANK>.json``: its exit
path so far and the names of its threads. A process-group thread alive at that point (gloo's
worker and transport threads) can abort the process during finalisation ("terminate called
without an active exception"), so tests assert there is none: deterministically, where the abort
itself is a race that needs a loaded machine.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
from pathlib import Path

CENSUS_DIR_VAR = "EXIT_CENSUS_DIR"


def native_thread_names() -> list[str]:
    """Every thread of this process, by the name the kernel knows (C++ threads included)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
        except OSError:  # ended meanwhile
            continue
    return sorted(names)


def write_census(directory: Path) -> None:
    census = {"rank": int(os.environ.get("RANK", "0")), "threads": native_thread_names(),
              "python_threads": sorted(t.name for t in threading.enumerate())}
    (directory / f"rank{census['rank']}.json").write_text(json.dumps(census))


def main() -> None:
    directory = Path(os.environ[CENSUS_DIR_VAR])
    directory.mkdir(parents=True, exist_ok=True)
    # Registered before the trainer is imported, so it runs after every exit hook the trainer's
    # libraries register (atexit runs them last-in first-out): the state finalisation will see.
    atexit.register(write_census, directory)
    from spmd_rlhf import train

    sys.argv = ["spmd_rlhf.train", *sys.argv[1:]]
    train.main()


if __name__ == "__main__":
    main()
