"""`dreambooth serve` without HTTP: request bodies into jobs, and the worker's queue, batching and shutdown."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")

from dreambooth.errors import UserError  # noqa: E402
from dreambooth.serve.jobs import Cancelled, Item, Job, Shape  # noqa: E402
from dreambooth.serve.options import Limits  # noqa: E402
from dreambooth.serve.schemas import (ApiError, Context, JumpStartBody, Txt2ImgBody, jumpstart_job,  # noqa: E402
                                      parse, txt2img_job)
from dreambooth.serve.worker import Busy, Worker  # noqa: E402

CTX = Context(Limits(), ["cat"], None, size=32, steps=2)
S1, S2 = Shape(32, 32, 2, 7.5, "default"), Shape(32, 32, 3, 7.5, "default")


def jumpstart(body: dict, ctx: Context = CTX) -> Job:
    return jumpstart_job(parse(JumpStartBody, body), ctx)


def a1111(body: dict, ctx: Context = CTX) -> Job:
    return txt2img_job(parse(Txt2ImgBody, body), ctx)


def refused(fn, body: dict) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(body)
    return e.value


def test_jumpstart_body_into_images_with_counting_seeds():
    job = jumpstart({"prompt": ["a", "b"], "negative_prompt": ["x", "y"], "num_images_per_prompt": 2, "seed": 10,
                     "width": 48, "guidance_scale": 1.0})
    assert [(i.prompt, i.negative, i.seed) for i in job.items] == [("a", "x", 10), ("a", "x", 11), ("b", "y", 12),
                                                                    ("b", "y", 13)]
    assert job.shape == Shape(48, 32, 2, 1.0, "default")  # unset height and steps: the model's size, the default
    assert jumpstart({"text_inputs": "a"}).items[0].prompt == "a"  # JumpStart's other name for the prompt
    assert 0 <= jumpstart({"prompt": "a"}).items[0].seed < 2**32  # no seed: a random one


@pytest.mark.parametrize("body, field, words", [
    ({"prompt": ["a", "b"], "negative_prompt": "x"}, "negative_prompt", "list with a list prompt"),
    ({"prompt": ["a", "b"], "negative_prompt": ["x"]}, "negative_prompt", "1 entries for 2 prompts"),
    ({"prompt": "a", "width": 36}, "width", "multiple of 8"),
    ({"prompt": "a", "height": 1032}, "height", "--max-side 1024"),
    ({"prompt": "a", "num_inference_steps": 151}, "num_inference_steps", "between 1 and 150"),
    ({"prompt": ["a", "b", "c"], "num_images_per_prompt": 3}, "num_images_per_prompt", "9 images"),
    ({"prompt": "a", "num_inference_step": 3}, "num_inference_step", "did you mean 'num_inference_steps'"),
    ({"prompt": "a", "seed": -5}, "seed", "between 0 and"),
    ({"prompt": "a", "guidance_scale": "high"}, "guidance_scale", "valid number"),
    ({"prompt": "a", "adapter": "dog"}, "adapter", "choose one of none, cat"),
    ({"prompt": "a", "scheduler": "heun"}, "scheduler", "not available"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": ["a", 3]}, "prompt", "list of strings"),
])
def test_jumpstart_mistakes_name_their_field(body, field, words):
    e = refused(jumpstart, body)
    assert (e.status, e.field) == (422, field) and words in e.message, e.message


def test_a1111_body_into_images():
    job = a1111({"prompt": "a <lora:cat:0.5> cat", "seed": 7, "batch_size": 2, "n_iter": 2, "steps": 3,
                 "sampler_name": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": 5, "restore_faces": False,
                 "styles": [], "override_settings": {}})  # fields A1111 clients send by habit are accepted
    assert [i.seed for i in job.items] == [7, 8, 9, 10] and {i.prompt for i in job.items} == {"a  cat"}
    assert job.shape == Shape(32, 32, 3, 5.0, "dpm++-karras", "cat", 0.5)
    assert a1111({"sampler_index": "Euler a"}).shape.sampler == "euler-a"  # the older field name
    assert a1111({"sampler_name": "unipc", "seed": -1}).shape.sampler == "unipc"


@pytest.mark.parametrize("body, field", [
    ({"sampler_name": "Heun"}, "sampler_name"), ({"enable_hr": True}, "enable_hr"),
    ({"prompt": "<lora:dog:1>"}, "adapter"), ({"prompt": "<lora:cat:strong>"}, "prompt"),
    ({"batch_size": 3, "n_iter": 3}, "batch_size"), ({"steps": 0}, "steps"), ({"width": "wide"}, "width"),
])
def test_a1111_mistakes_name_their_field(body, field):
    assert refused(a1111, body).field == field


# --- the worker ---------------------------------------------------------------------------------------------------

class FakeEngine:
    """Records each batch's seeds; holds the first batch until `gate` is set, stopping if asked to."""
    native_size = 32

    def __init__(self):
        self.calls, self.gate = [], threading.Event()

    def run(self, shape, items, should_stop):
        self.calls.append([i.seed for i in items])
        while not self.gate.wait(0.005):
            if should_stop():
                raise Cancelled("stopped")
        return [f"image{i.seed}" for i in items], "FakeScheduler"


def job(shape: Shape, *seeds: int) -> Job:
    return Job(shape, [Item("p", "", s) for s in seeds])


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.fixture
def held():
    """A ready worker (max_batch 4, max_queue 3) whose engine holds its first batch, job 0, until released."""
    engine = FakeEngine()
    worker = Worker(lambda: engine, max_queue=3, max_batch=4)
    worker.start()
    wait_until(lambda: worker.state == "ready")
    first = worker.submit(job(S1, 0))
    wait_until(lambda: engine.calls)
    yield worker, engine, first
    engine.gate.set()
    worker.stop(0.0, join_s=10)
    assert worker.state == "stopped"


def test_waiting_jobs_of_one_shape_share_a_batch(held):
    worker, engine, first = held
    a, b, c = worker.submit(job(S2, 10, 11, 12)), worker.submit(job(S1, 20, 21)), worker.submit(job(S2, 30, 31))
    engine.gate.set()
    assert c.future.result(10) == ["image30", "image31"] and a.future.result(10) == ["image10", "image11", "image12"]
    assert b.future.result(10) == ["image20", "image21"] and first.future.result(10) == ["image0"]
    # The oldest job leads each batch; waiting jobs of its shape fill it up to max_batch.
    assert engine.calls == [[0], [10, 11, 12, 30], [20, 21], [31]]
    assert (a.batches, c.batches, a.scheduler) == (1, 2, "FakeScheduler")


def test_a_full_queue_is_busy_with_retry_after(held):
    worker, engine, first = held
    for n in range(3):
        worker.submit(job(S1, n))
    with pytest.raises(Busy, match="queue is full") as e:
        worker.submit(job(S1, 9))
    assert e.value.retry_after >= 1


def test_given_up_jobs_are_skipped_and_stop_their_batch(held):
    worker, engine, first = held
    waiting = worker.submit(job(S1, 5))
    waiting.cancel()
    first.cancel()  # the running batch's only job: the engine is told to stop between steps
    with pytest.raises(Cancelled):
        first.future.result(10)
    later = worker.submit(job(S2, 7))
    engine.gate.set()
    assert later.future.result(10) == ["image7"]
    assert engine.calls == [[0], [7]]


def test_drain_finishes_within_grace_then_gives_up(held):
    worker, engine, first = held
    queued = worker.submit(job(S1, 1))
    worker.drain(10.0)
    with pytest.raises(Busy, match="shutting down"):
        worker.submit(job(S1, 2))
    engine.gate.set()
    assert first.future.result(10) == ["image0"] and queued.future.result(10) == ["image1"]
    wait_until(lambda: worker.state == "stopped")


def test_drain_past_grace_cancels_running_and_queued(held):
    worker, engine, first = held
    queued = worker.submit(job(S1, 1))
    worker.drain(0.05)
    for j in (first, queued):
        with pytest.raises(Cancelled, match="shut down"):
            j.future.result(10)
    wait_until(lambda: worker.state == "stopped")


def test_loading_and_load_failure():
    release = threading.Event()

    def load():
        release.wait(10)
        raise UserError("model folder x does not exist")
    worker = Worker(load)
    worker.start()
    with pytest.raises(Busy, match="still loading"):
        worker.submit(job(S1, 0))
    release.set()
    wait_until(lambda: worker.state == "failed")
    assert "does not exist" in str(worker.error)


def test_batched_images_match_unbatched():
    """The real engine: a request's images depend on its seeds only, not on what shares its batch."""
    from dreambooth.models.builtin import build_tiny_pipeline
    from dreambooth.serve.engine import Engine
    engine = Engine(build_tiny_pipeline(), {})
    alone = engine.run(S1, [Item("a photo of riobugger toy", "", 3)], lambda: False)[0]
    mixed = engine.run(S1, [Item("a dog", "blurry", 9), Item("a photo of riobugger toy", "", 3)], lambda: False)[0]
    a, b = np.asarray(alone[0], dtype=int), np.asarray(mixed[1], dtype=int)
    # Same seed, same noise: equal up to float rounding of the batched matrix products (at most 1 of 255).
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
    assert np.abs(a - np.asarray(mixed[0], dtype=int)).max() > 10  # and the other image is another picture
