"""One request's work: the settings its images share (Shape) and one Item per image, plus the answer's future."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shape:
    """What images must share to be made in one pipeline call."""
    width: int
    height: int
    steps: int
    guidance: float
    sampler: str
    adapter: str | None = None
    adapter_scale: float = 1.0


@dataclass(frozen=True)
class Item:
    """One image: its prompt, negative prompt and seed."""
    prompt: str
    negative: str
    seed: int


class Cancelled(Exception):
    """The job was given up (its client timed out or left, or the server stopped) before its images were made."""


@dataclass(eq=False)
class Job:
    """A request's images in order; `future` resolves to the list of images, or to the error that stopped it."""
    shape: Shape
    items: list[Item]
    future: Future = field(default_factory=Future)
    taken: int = 0     # items handed to a batch so far (the worker's, under its lock)
    batches: int = 0   # pipeline calls that made some of its images
    scheduler: str = ""  # the scheduler class that made its images, set by the worker
    images: list = field(default_factory=list)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.images = [None] * len(self.items)

    def cancel(self, error: Exception | None = None) -> None:
        """Give the job up: the worker skips what it has not started and stops a batch whose jobs all gave up."""
        self._cancelled.set()
        self.fail(error or Cancelled("the request was given up"))

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def fail(self, error: Exception) -> None:
        self._cancelled.set()
        if not self.future.done():
            try:
                self.future.set_exception(error)
            except Exception:  # InvalidStateError: the other thread resolved it in between
                pass

    def finish(self, index: int, image) -> None:
        """Record image `index`; the future resolves when the last one arrives."""
        self.images[index] = image
        if all(im is not None for im in self.images) and not self.future.done():
            try:
                self.future.set_result(list(self.images))
            except Exception:
                pass

    def settings(self, index: int) -> dict:
        """What made image `index`, as `generate` writes it into a PNG (JumpStart's names)."""
        s, item = self.shape, self.items[index]
        out = {"prompt": item.prompt, "negative_prompt": item.negative or None, "width": s.width, "height": s.height,
               "num_inference_steps": s.steps, "guidance_scale": s.guidance, "seed": item.seed,
               "scheduler": self.scheduler}
        if s.adapter:
            out |= {"adapter": s.adapter, "adapter_scale": s.adapter_scale}
        return out
