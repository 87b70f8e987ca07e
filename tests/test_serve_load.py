"""`dreambooth serve` under load (16 clients, valid and malformed bodies mixed) and stopped by SIGTERM."""

from __future__ import annotations

import gc
import json
import os
import queue
import signal
import threading
import time
import urllib.error

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_util import call, in_thread  # noqa: E402

from dreambooth.serve.jobs import Job  # noqa: E402
from dreambooth.serve.options import Limits, ModelSpec, ServeOptions  # noqa: E402
from dreambooth.serve.runner import Background  # noqa: E402

CLIENTS, ROUNDS, PER_ROUND = 16, 2, 50
JSON = {"Content-Type": "application/json"}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def mixed(n: int) -> list[tuple[str, bytes, dict, int]]:
    """n requests, (path, body, headers, images expected or 0 for a 4xx): 3 valid kinds, 5 malformed."""
    kinds = [
        ("/invocations", {"prompt": "a toy", "width": 16, "height": 16}, JSON, 1),
        ("/invocations", json.dumps("a toy").encode(), {"Content-Type": "application/x-text"}, 1),
        ("/sdapi/v1/txt2img", {"prompt": "a toy", "batch_size": 2, "seed": 4, "width": 16, "height": 16}, JSON, 2),
        ("/invocations", b'{"prompt": ', JSON, 0),
        ("/invocations", {"prompt": "a toy", "width": 30}, JSON, 0),
        ("/sdapi/v1/txt2img", {"prompt": "a toy", "stepz": 2, "steps": "x"}, JSON, 0),
        ("/invocations", b"a toy", {"Content-Type": "image/png"}, 0),
        ("/invocations", {"prompt": "a" * 5000}, JSON, 0),
    ]
    out = []
    for i in range(n):
        path, body, headers, images = kinds[i % len(kinds)]
        out.append((path, body if isinstance(body, bytes) else json.dumps(body).encode(), headers, images))
    return out


def run_round(url: str, requests: list) -> list:
    """Send `requests` from CLIENTS threads at once; every answer, or fail if any client is still waiting."""
    todo, answers = queue.Queue(), []
    for r in requests:
        todo.put(r)

    def client():
        while True:
            try:
                path, body, headers, images = todo.get_nowait()
            except queue.Empty:
                return
            answers.append((images, *call(url + path, body, headers, timeout=60)))
    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a client hung"
    return answers


def test_sixteen_clients_valid_and_malformed():
    options = ServeOptions(port=0, log_level="warning", default_steps=2, limits=Limits(max_body=4096))
    with Background(ModelSpec("builtin:tiny"), options) as server:
        growth = []
        for _ in range(ROUNDS):
            gc.collect()
            before = rss_mib()
            answers = run_round(server.url, mixed(PER_ROUND))
            gc.collect()
            growth.append(rss_mib() - before)
            assert len(answers) == PER_ROUND
            for images, status, headers, raw in answers:
                body = json.loads(raw)
                if images:
                    assert status == 200, body
                    got = body.get("generated_images") or body.get("images") or [body["generated_image"]]
                    assert len(got) == images
                else:
                    assert 400 <= status < 500 and body["message"] and headers["content-type"] == "application/json"
        assert call(server.url + "/ping")[0] == 200 and server.worker.queued() == 0
        gc.collect()
        assert not [o for o in gc.get_objects() if isinstance(o, Job)]  # nothing of any request is kept
        assert server.worker.batches_run < server.worker.images_made  # waiting requests were batched
        # The first round warms the allocator; the second may not keep what it used.
        assert growth[-1] < 25, growth


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_in_flight_requests_and_exits_0(sig, monkeypatch, capsys):
    """`dreambooth serve` in this process's main thread, where signals land: a request in flight when SIGTERM
    (or Ctrl-C) arrives still gets its images, new connections are refused, and the command returns 0."""
    from dreambooth.cli import main
    from dreambooth.serve import runner
    monkeypatch.delenv("DREAMBOOTH_SERVE_TOKEN", raising=False)
    urls = []
    monkeypatch.setattr(runner, "url_of", lambda sock: urls.append(f"http://127.0.0.1:{sock.getsockname()[1]}")
                        or urls[-1])
    seen = {}
    handler = signal.getsignal(sig)  # another library in this process (Ray) may have set its own

    def client():
        try:
            deadline = time.monotonic() + 60
            while not urls or call(urls[0] + "/ping")[0] != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            # ~1.5 s of sampling on a quiet core: still running 0.3 s later, when the signal is sent
            slow = json.dumps({"prompt": "a toy", "width": 16, "height": 16, "num_inference_steps": 200,
                               "num_images_per_prompt": 4}).encode()
            thread, result = in_thread(lambda: (call(urls[0] + "/invocations", slow, JSON), time.monotonic()))
            time.sleep(0.3)
            os.kill(os.getpid(), sig)
            seen["signalled"] = time.monotonic()
            time.sleep(0.3)
            try:  # the listening socket is closed: no new connections while the old ones finish
                seen["refused"] = not call(urls[0] + "/ping", timeout=5)
            except urllib.error.URLError:
                seen["refused"] = True
            thread.join(60)
            seen["result"], seen["answered"] = result[0]
        finally:
            if "result" not in seen:  # never leave the main thread serving
                os.kill(os.getpid(), signal.SIGTERM)
    helper = threading.Thread(target=client, daemon=True)
    helper.start()
    assert main(["serve", "builtin:tiny", "--port", "0", "--grace", "30", "--max-steps", "200",
                 "--log-level", "warning"]) == 0
    helper.join(60)
    status, _, raw = seen["result"]
    assert status == 200 and len(json.loads(raw)["generated_images"]) == 4  # finished within the grace period
    assert seen["refused"] and "stopped" in capsys.readouterr().out
    assert seen["answered"] > seen["signalled"]  # it was still being made when the signal came
    assert signal.getsignal(sig) == handler  # the handler given back
