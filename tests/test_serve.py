"""`dreambooth serve` over HTTP on loopback: JumpStart's notebook calls and an A1111 client against a trained run,
JSON errors naming their field, limits, the token, LoRA adapters by name, and the command's own checks."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_util import (a1111_txt2img, call, decode_jpeg, in_thread, invoke_endpoint, parse_response,  # noqa: E402
                        parse_response_multiple_images, post_json, query, query_endpoint_with_json_payload)

from dreambooth.cli import main  # noqa: E402
from dreambooth.demo import write_demo_dataset  # noqa: E402
from dreambooth.models.builtin import TINY_RESOLUTION, build_tiny_pipeline  # noqa: E402
from dreambooth.serve.engine import Engine, resolve_spec  # noqa: E402
from dreambooth.serve.jobs import Cancelled  # noqa: E402
from dreambooth.serve.options import Limits, ModelSpec, ServeOptions  # noqa: E402
from dreambooth.serve.runner import Background  # noqa: E402

PROMPT = "a photo of riobugger toy"
JSON = {"Content-Type": "application/json"}


def train(tmp_path_factory, name: str, *overrides: str):
    root = tmp_path_factory.mktemp(name)
    subject = write_demo_dataset(root / "subject", n=2, size=48)
    out = root / "run"
    assert main(["train", "model=builtin:tiny", f"data.dir={subject}", f"resolution={TINY_RESOLUTION}",
                 "validation.enabled=false", f"output_dir={out}", "quiet=true", *overrides]) == 0
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`dreambooth serve RUN` on a trained (one step) tiny full run, 2 steps unless a request says otherwise."""
    run = train(tmp_path_factory, "full-run", "max_steps=1")
    with Background(resolve_spec(ModelSpec(str(run))), ServeOptions(port=0, log_level="warning",
                                                                      default_steps=2)) as s:
        s.run = run
        yield s


def test_jumpstart_notebook_calls(server):
    url = server.url
    image, prompt = parse_response(query(url, PROMPT))  # x-text: one image as an RGB array, the model's size
    assert prompt == PROMPT and np.array(image).shape == (TINY_RESOLUTION, TINY_RESOLUTION, 3)
    image, prompt = parse_response(invoke_endpoint(url, b"a toy", "application/x-text", "application/json"))
    assert prompt == "a toy" and np.array(image).dtype.kind == "i"  # plain text works as well as JSON text

    payload = {"prompt": PROMPT, "negative_prompt": "blurry", "width": 40, "height": 24, "num_inference_steps": 2,
               "seed": 5, "num_images_per_prompt": 2}
    arrays, prompt = parse_response_multiple_images(
        query_endpoint_with_json_payload(url, payload, "application/json", "application/json"))
    assert prompt == PROMPT and [np.array(a).shape for a in arrays] == [(24, 40, 3)] * 2
    jpegs, _ = parse_response_multiple_images(
        query_endpoint_with_json_payload(url, payload, "application/json", "application/json;jpeg"))
    decoded = [decode_jpeg(j) for j in jpegs]
    assert [d.format for d in decoded] == ["JPEG"] * 2 and decoded[0].size == (40, 24)
    assert json.loads(decoded[1].info["comment"])["seed"] == 6  # image k has seed + k, written into it
    same = io.BytesIO()  # the same picture: the array, JPEG-compressed alike, decodes to the same pixels
    Image.fromarray(np.array(arrays[0], dtype=np.uint8)).save(same, format="JPEG", quality=95)
    assert np.array_equal(np.asarray(Image.open(same)), np.asarray(decoded[0]))
    assert not np.array_equal(arrays[0], arrays[1])

    # The same request again is the same images; `dreambooth generate` makes them too.
    again, _ = parse_response_multiple_images(
        query_endpoint_with_json_payload(url, payload, "application/json", "application/json"))
    assert again == arrays
    from dreambooth.serve.generate import Request, generate, load_pipeline
    pipe = load_pipeline(str(server.run), device="cpu")
    fields = {k: v for k, v in payload.items() if k != "prompt"}
    paths = generate(pipe, Request(prompt=[PROMPT], **fields), server.run.parent / "generated", quiet=True)
    assert [np.asarray(Image.open(p)).tolist() for p in paths] == arrays


def test_a1111_client(server):
    images, info = a1111_txt2img(server.url, {"prompt": PROMPT, "negative_prompt": "blurry", "seed": 11,
                                              "steps": 2, "cfg_scale": 7.5, "width": 32, "height": 48,
                                              "batch_size": 2, "n_iter": 2, "sampler_name": "Euler a"})
    assert [im.size for im in images] == [(32, 48)] * 4 and info["all_seeds"] == [11, 12, 13, 14]
    settings = json.loads(images[2].text["parameters"])  # the same PNG chunk `dreambooth generate` writes
    assert settings["seed"] == 13 and settings["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert "Sampler: Euler a" in info["infotexts"][0] and "Seed: 11" in info["infotexts"][0]
    images, info = a1111_txt2img(server.url, {"prompt": PROMPT, "seed": -1, "steps": 2, "width": 32, "height": 32})
    assert len(images) == 1 and 0 <= info["seed"] < 2**32
    # The same seed and settings make the same picture on both routes.
    a1111_image = np.asarray(a1111_txt2img(server.url, {"prompt": PROMPT, "seed": 3, "steps": 2, "cfg_scale": 7.5,
                                                        "width": 32, "height": 32})[0][0])
    status, answer = post_json(server.url + "/invocations", {"prompt": PROMPT, "seed": 3, "width": 32, "height": 32})
    assert status == 200 and np.array_equal(a1111_image, np.array(answer["generated_images"][0]))
    status, _, raw = call(server.url + "/sdapi/v1/samplers")
    assert status == 200 and "Euler a" in [s["name"] for s in json.loads(raw)]


@pytest.mark.parametrize("path, body, headers, status, field", [
    ("/invocations", b"{", JSON, 400, None),
    ("/invocations", b'"a prompt"', JSON, 422, None),
    ("/invocations", b'{"prompt": "a", "width": 30}', JSON, 422, "width"),
    ("/invocations", b'{"prompt": "a", "widht": 32}', JSON, 422, "widht"),
    ("/invocations", b"a", {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("/invocations", b"a", {}, 415, "Content-Type"),
    ("/invocations", b"a", {"Content-Type": "application/x-text", "Accept": "image/png"}, 406, "Accept"),
    ("/invocations", b"\xff\xfe", {"Content-Type": "application/x-text"}, 400, None),
    ("/sdapi/v1/txt2img", b'{"steps": "many"}', JSON, 422, "steps"),
    ("/sdapi/v1/txt2img", b"[1, 2]", JSON, 422, None),
    ("/sdapi/v1/txt2img", b"{}", {"Content-Type": "application/xml"}, 415, "Content-Type"),
    ("/nowhere", b"{}", JSON, 404, None),
    ("/invocations", None, {}, 405, None),
])
def test_mistakes_are_json_naming_the_field(server, path, body, headers, status, field):
    got, response_headers, raw = call(server.url + path, body, headers, method="POST" if body is not None else "GET")
    answer = json.loads(raw)
    assert got == status and response_headers["content-type"] == "application/json", raw
    assert answer["field"] == field and answer["message"] and "Traceback" not in answer["message"]
    if field:
        assert field in answer["message"]


def test_ping_answers_while_images_are_made(server):
    slow = {"prompt": PROMPT, "num_inference_steps": 20, "num_images_per_prompt": 4}
    thread, result = in_thread(post_json, server.url + "/invocations", slow)
    times = []
    while thread.is_alive() and len(times) < 100:
        started = time.perf_counter()
        assert call(server.url + "/ping")[0] == 200
        times.append(time.perf_counter() - started)
        time.sleep(0.02)
    thread.join(60)
    assert result[0][0] == 200 and len(result[0][1]["generated_images"]) == 4
    assert len(times) >= 10 and max(times) < 1.0, times


class Gated(Engine):
    """The tiny engine, holding every batch until `gate` is set (and stopping when told to)."""
    gate = threading.Event()

    def run(self, shape, items, should_stop):
        while not self.gate.wait(0.01):
            if should_stop():
                raise Cancelled("stopped")
        return super().run(shape, items, should_stop)


@pytest.fixture
def guarded():
    """builtin:tiny behind a token, with a small body limit, a queue of one, a 1 s timeout and a held worker."""
    Gated.gate = threading.Event()
    o = ServeOptions(port=0, token="s3cret-token", max_queue=1, log_level="warning", default_steps=2, grace_s=0.5,
                     limits=Limits(max_body=2048, timeout_s=1.5))
    with Background(ModelSpec("builtin:tiny"), o, load=lambda: Gated(build_tiny_pipeline(), {})) as s:
        yield s
        Gated.gate.set()


def test_token_body_limit_queue_and_timeout(guarded):
    url, bearer = guarded.url, {"Authorization": "Bearer s3cret-token", **JSON}
    assert call(url + "/ping")[0] == 200  # the health check needs no token
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
        status, got_headers, raw = call(url + "/invocations", b'{"prompt": "a"}', {**JSON, **headers})
        assert status == 401 and json.loads(raw)["field"] == "Authorization"
        assert got_headers["www-authenticate"] == "Bearer"
    status, got_headers, _ = call(url + "/")
    assert status == 401 and got_headers["www-authenticate"].startswith("Basic")  # a browser asks for it
    basic = base64.b64encode(b"me:s3cret-token").decode()
    assert call(url + "/", headers={"Authorization": f"Basic {basic}"})[0] == 200

    big = json.dumps({"prompt": "a" * 3000}).encode()
    status, _, raw = call(url + "/invocations", big, bearer)
    assert status == 413 and "--max-body" in json.loads(raw)["message"]
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)  # no Content-Length: chunked
    conn.request("POST", "/invocations", body=iter([big[:1500], big[1500:]]), headers=bearer, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["field"] == "body"
    conn.close()

    body = json.dumps({"prompt": "a", "width": 32, "height": 32}).encode()
    running, first = in_thread(call, url + "/invocations", body, bearer)  # held by the worker
    time.sleep(0.3)
    waiting, second = in_thread(call, url + "/invocations", body, bearer)  # the one queue place
    time.sleep(0.3)
    status, got_headers, raw = call(url + "/invocations", body, bearer)
    assert status == 503 and int(got_headers["retry-after"]) >= 1 and "queue is full" in json.loads(raw)["message"]
    running.join(30), waiting.join(30)
    for (status, _, raw) in (first[0], second[0]):
        assert status == 504 and "--timeout" in json.loads(raw)["message"]
    Gated.gate.set()
    assert call(url + "/invocations", body, bearer)[0] == 200  # healthy after


def test_stopping_past_grace_answers_in_flight_requests(guarded):
    body = json.dumps({"prompt": "a", "width": 32, "height": 32}).encode()
    thread, result = in_thread(call, guarded.url + "/invocations", body,
                               {"Authorization": "Bearer s3cret-token", **JSON})
    time.sleep(0.3)
    started = time.monotonic()
    guarded.stop()
    thread.join(30)
    status, _, raw = result[0]
    assert status == 503 and "shut down" in json.loads(raw)["message"]
    assert time.monotonic() - started < 10 and not guarded.thread.is_alive()
    assert guarded.worker.state == "stopped"


def test_lora_run_serves_its_base_with_its_lora(tmp_path_factory):
    run = train(tmp_path_factory, "lora-run", "finetune=lora", "learning_rate=0.05", "max_steps=2")
    spec = resolve_spec(ModelSpec(str(run), loras={"again": str(run / "pytorch_lora_weights.safetensors")}))
    assert spec.model == "builtin:tiny" and list(spec.loras) == ["run", "again"] and spec.default_adapter == "run"
    assert resolve_spec(ModelSpec(str(run), default_adapter="none")).default_adapter is None  # --adapter none
    body = {"prompt": PROMPT, "seed": 1, "width": 32, "height": 32}
    with Background(spec, ServeOptions(port=0, log_level="warning", default_steps=2)) as s:
        def image(**extra):
            status, answer = post_json(s.url + "/invocations", {**body, **extra})
            assert status == 200, answer
            return np.array(answer["generated_images"][0])
        with_lora, base, again = image(), image(adapter="none"), image(adapter="again")
        status, _, raw = call(s.url + "/sdapi/v1/loras")
        assert [a["name"] for a in json.loads(raw)] == ["run", "again"] and "safetensors" not in raw.decode()
        via_tag = np.asarray(a1111_txt2img(s.url, {"prompt": f"<lora:again:1> {PROMPT}", "seed": 1, "steps": 2,
                                                   "cfg_scale": 7.5})[0][0])
    assert np.abs(with_lora - base).max() > 10 and np.array_equal(with_lora, again)
    assert np.array_equal(via_tag, with_lora)
    from dreambooth.models.lora import apply_lora
    from dreambooth.serve.engine import Engine as Plain
    from dreambooth.serve.jobs import Item, Shape
    pipe = build_tiny_pipeline()
    assert np.array_equal(np.asarray(Plain(pipe, {}).run(Shape(32, 32, 2, 7.5, "default"), [Item(PROMPT, "", 1)],
                                                         lambda: False)[0][0]), base)
    apply_lora(pipe, run)
    assert np.array_equal(np.asarray(Plain(pipe, {}).run(Shape(32, 32, 2, 7.5, "default"), [Item(PROMPT, "", 1)],
                                                         lambda: False)[0][0]), with_lora)


def test_command_checks_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DREAMBOOTH_SERVE_TOKEN", raising=False)
    cases = [(["--host", "0.0.0.0"], "DREAMBOOTH_SERVE_TOKEN"), (["--lora", "cat"], "NAME=PATH"),
             (["--lora", f"cat={tmp_path / 'no.safetensors'}"], "does not exist"),
             (["--max-batch", "0"], "--max-batch"), (["--adapter", "cat"], "not one of the --lora names")]
    for args, words in cases:
        assert main(["serve", "builtin:tiny", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and len(err.splitlines()) == 1, err
    taken = Background(ModelSpec("builtin:tiny"), ServeOptions(port=0), load=lambda: None)
    port = taken.sock.getsockname()[1]
    assert main(["serve", "builtin:tiny", "--port", str(port)]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    taken.sock.close()
    # The address rule is answered before torch or FastAPI load.
    code = ("import sys; from dreambooth.cli import main; rc = main(['serve', 'x', '--host', '10.1.2.3']); "
            "print(rc, [m for m in ('torch', 'fastapi', 'uvicorn') if m in sys.modules])")
    env = {k: v for k, v in os.environ.items() if k != "DREAMBOOTH_SERVE_TOKEN"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**env, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.stdout.strip() == "2 []", result.stdout + result.stderr
