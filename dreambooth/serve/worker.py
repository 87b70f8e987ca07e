"""One model, one worker thread: a bounded queue of jobs, batched by shape, stopped gracefully."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable

from dreambooth.serve.jobs import Cancelled, Job

log = logging.getLogger(__name__)


class Busy(Exception):
    """The queue is full, or the model is not ready: answered 503 with Retry-After seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Worker:
    """Loads the engine in its own thread, then makes images for jobs in arrival order.

    A batch starts with the oldest job and adds items of waiting jobs of the same shape, up to `max_batch` images;
    each image keeps its own seed, so a job's images do not depend on what it was batched with."""

    def __init__(self, load: Callable[[], object], max_queue: int = 32, max_batch: int = 4):
        self.load, self.max_queue, self.max_batch = load, max_queue, max_batch
        self.engine = None
        self.state = "new"  # loading -> ready -> draining -> stopped; or failed
        self.error: BaseException | None = None
        self.images_made = 0
        self.batches_run = 0
        self._seconds_per_image = 1.0
        self._jobs: list[Job] = []  # waiting (or partly taken) jobs, oldest first
        self._deadline = math.inf   # while draining: when unfinished jobs are given up
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._main, name="dreambooth-serve-worker", daemon=True)

    # ------------------------------------------------------------------ called from the server's threads
    def start(self) -> None:
        self.state = "loading"
        self._thread.start()

    def submit(self, job: Job) -> Job:
        """Queue a job, or raise Busy (model loading, queue full, shutting down)."""
        with self._cond:
            if self.state == "loading":
                raise Busy("the model is still loading: retry shortly", 5)
            if self.state != "ready":
                raise Busy("the server is shutting down", 30)
            if len(self._jobs) >= self.max_queue:
                raise Busy(f"the queue is full ({self.max_queue} requests waiting): retry later",
                           self._retry_after())
            self._jobs.append(job)
            self._cond.notify()
        return job

    def queued(self) -> int:
        with self._cond:
            return len(self._jobs)

    def drain(self, grace_s: float) -> None:
        """Accept nothing new; finish queued and running jobs for up to `grace_s` seconds, then give them up."""
        with self._cond:
            if self.state in ("loading", "ready", "new"):
                self.state = "draining"
            self._deadline = min(self._deadline, time.monotonic() + grace_s)
            self._cond.notify_all()

    def past_deadline(self) -> bool:
        """Draining and out of grace: requests still waiting are answered now, whatever the engine is doing."""
        return time.monotonic() >= self._deadline

    def stop(self, grace_s: float = 0.0, join_s: float = 30.0) -> None:
        self.drain(grace_s)
        if self._thread.is_alive():
            self._thread.join(join_s + grace_s)

    def _retry_after(self) -> int:
        waiting = sum(len(j.items) - j.taken for j in self._jobs)
        return max(1, math.ceil(waiting * self._seconds_per_image))

    # ------------------------------------------------------------------ the worker thread
    def _main(self) -> None:
        started = time.perf_counter()
        try:
            self.engine = self.load()
        except BaseException as e:  # the server reports it and exits
            self.error = e
            with self._cond:
                self.state = "failed"
            self._give_up_all(Cancelled("the model failed to load"))
            return
        with self._cond:
            if self.state == "loading":
                self.state = "ready"
        log.info("model ready in %.1f s: /ping answers 200", time.perf_counter() - started)
        while (batch := self._take()) is not None:
            self._run(batch)
            batch = None  # not kept (with its images) while waiting for the next one
        with self._cond:
            self.state = "stopped"

    def _take(self) -> list[tuple[Job, int]] | None:
        """The next batch of (job, item index), or None once draining has nothing left."""
        with self._cond:
            while True:
                self._jobs = [j for j in self._jobs if not j.cancelled]
                if time.monotonic() >= self._deadline:
                    self._give_up_all(Cancelled("the server shut down before this request was served"))
                if self._jobs:
                    break
                if self.state != "ready":
                    return None
                self._cond.wait(None if math.isinf(self._deadline) else max(0.0, self._deadline - time.monotonic()))
            head, batch = self._jobs[0], []
            for job in list(self._jobs):
                if job.shape != head.shape:
                    continue
                while job.taken < len(job.items) and len(batch) < self.max_batch:
                    batch.append((job, job.taken))
                    job.taken += 1
                if job.taken == len(job.items):
                    self._jobs.remove(job)
                if len(batch) >= self.max_batch:
                    break
            return batch

    def _give_up_all(self, error: Exception) -> None:
        with self._cond:
            jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.cancel(error)

    def _run(self, batch: list[tuple[Job, int]]) -> None:
        jobs = list(dict.fromkeys(job for job, _ in batch))

        def should_stop() -> bool:  # polled by the engine between denoising steps
            return all(j.cancelled for j in jobs) or time.monotonic() >= self._deadline

        started = time.perf_counter()
        try:
            images, scheduler = self.engine.run(jobs[0].shape, [job.items[i] for job, i in batch], should_stop)
        except Cancelled:
            error = Cancelled("the server shut down before this request was served")
            for job in jobs:
                job.fail(error)
            return
        except Exception as e:  # one bad batch (out of memory, a library error) fails its jobs, not the server
            log.exception("generation failed")
            for job in jobs:
                job.fail(e)
            return
        elapsed = time.perf_counter() - started
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * elapsed / len(batch)
        self.images_made += len(batch)
        self.batches_run += 1
        for job in jobs:
            job.batches += 1
            job.scheduler = scheduler
        for (job, i), image in zip(batch, images):
            job.finish(i, image)
