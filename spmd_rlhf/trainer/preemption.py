"""Preemption: notice SIGTERM or SLURM's warning signal, and stop every rank at the same step.

SLURM sends ``--signal=USR1@120`` two minutes before the time limit, and SIGTERM when it preempts
or cancels a job (then SIGKILL after ``KillWait``). The handlers only set a flag: no I/O, no
collectives, nothing that could deadlock inside a signal handler. The training loop asks
``requested()`` once per step; it all-reduces the flag (MAX), so if any rank was signalled, every
rank sees True at the same step, saves one checkpoint together and exits.

    with PreemptionHandler() as preemption:
        for step in ...:
            train_one_step()
            if preemption.requested():
                checkpoints.save(step, state)
                break
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS,
                 process_group: dist.ProcessGroup | None = None, device: torch.device | None = None):
        """Install the handlers now (main thread only); ``close`` puts the previous ones back.

        ``device``: where the flag is all-reduced; default CUDA's current device under NCCL, else CPU.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler must be created in the main thread (signal handlers live there)")
        self.process_group = process_group
        self.device = device
        self.received: signal.Signals | None = None
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}

    def _on_signal(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)

    def requested(self) -> bool:
        """Whether any rank has been signalled; a collective when a process group is running."""
        local = self.received is not None
        if not (dist.is_available() and dist.is_initialized()):
            return local
        device = self.device
        if device is None:
            nccl = dist.get_backend(self.process_group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        flag = torch.tensor([int(local)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group)
        return bool(flag.item())

    def close(self) -> None:
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the best guess
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
