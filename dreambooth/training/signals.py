"""Stopping a run cleanly: the first Ctrl-C or SIGTERM finishes the step and writes a checkpoint."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint (path None if none could be written)."""

    def __init__(self, step: int, path: Path | None, signal_name: str):
        super().__init__(f"{signal_name} at step {step}")
        self.step, self.path, self.signal_name = step, path, signal_name


class StopSignals:
    """While active, the first SIGINT/SIGTERM only sets `requested` (the loop finishes its step and checkpoints);
    a second one raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested: str | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing this step and writing a checkpoint "
              "(press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
