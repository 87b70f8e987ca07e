"""Wall time of a run's phases (class images, model load, setup, validation, ...): what `bench --job` reports."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable


class Phases:
    """Seconds per named phase, summed over its visits. `before`/`after` hooks (the benchmark's peak-memory window)
    run around outermost phases only, so a phase nested in another (validation inside training) keeps its time."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, dict] = {}
        self.before: Callable[[], object] | None = None
        self.after: Callable[[], dict] | None = None
        self._depth = 0

    @contextmanager
    def __call__(self, name: str):
        outer = self._depth == 0
        if outer and self.before is not None:
            self.before()
        self._depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            if outer and self.after is not None:
                peak = self.after()  # the highest of each figure over the phase's visits
                old = self.peaks.get(name, {})
                self.peaks[name] = {k: max(v or 0, old.get(k) or 0) for k, v in peak.items()}
