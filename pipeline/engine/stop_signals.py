"""SIGTERM and SIGUSR1 as requests to checkpoint and exit cleanly, rather than deaths.

Schedulers announce the end of a job with a signal: Slurm sends SIGTERM at the time limit or preemption (and the
signal chosen with `--signal`, conventionally SIGUSR1, ahead of it), Kubernetes SIGTERM before deleting a pod,
torchrun forwards the SIGTERM it gets to its workers. The handler only records the request; the trainer agrees on it
across ranks at the next optimizer step (a checkpoint is collective, so every rank must stop at the same step),
saves, and exits with status 0.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def install(self) -> "StopSignals":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
