"""Clients for the serve tests: plain HTTP over loopback, and the calls JumpStart's and A1111's users make."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request

from PIL import Image

TIMEOUT_S = 60  # no request in these tests may hang longer


def call(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None,
         timeout: float = TIMEOUT_S) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post_json(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    status, _, raw = call(url, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})
    return status, json.loads(raw)


def invoke_endpoint(base_url: str, body: bytes, content_type: str, accept: str) -> bytes:
    """What boto3's sagemaker-runtime invoke_endpoint does, aimed at `dreambooth serve`: the body back, or raise."""
    status, _, raw = call(base_url + "/invocations", body, {"Content-Type": content_type, "Accept": accept})
    if status != 200:
        raise RuntimeError(f"ModelError {status}: {raw[:200]!r}")
    return raw


# --- JumpStart's text-to-image notebook: the same calls and parsing, the endpoint swapped for localhost ---------

def query(base_url: str, text: str) -> bytes:
    return invoke_endpoint(base_url, json.dumps(text).encode("utf-8"), "application/x-text", "application/json")


def parse_response(response: bytes):
    answer = json.loads(response)
    return answer["generated_image"], answer["prompt"]


def query_endpoint_with_json_payload(base_url: str, payload: dict, content_type: str, accept: str) -> bytes:
    return invoke_endpoint(base_url, json.dumps(payload).encode("utf-8"), content_type, accept)


def parse_response_multiple_images(response: bytes):
    answer = json.loads(response)
    return answer["generated_images"], answer["prompt"]


def decode_jpeg(text: str) -> Image.Image:
    with io.BytesIO(base64.b64decode(text.encode())) as f:
        image = Image.open(f)
        image.load()
        return image


# --- an A1111 API client ----------------------------------------------------------------------------------------

def a1111_txt2img(base_url: str, payload: dict) -> tuple[list[Image.Image], dict]:
    """POST /sdapi/v1/txt2img as A1111 scripts do; the PNGs (data-URL prefix tolerated) and the parsed info."""
    status, answer = post_json(base_url + "/sdapi/v1/txt2img", payload)
    assert status == 200, answer
    images = []
    for text in answer["images"]:
        image = Image.open(io.BytesIO(base64.b64decode(text.split(",", 1)[-1])))
        image.load()
        images.append(image)
    return images, json.loads(answer["info"])


def in_thread(fn, *args) -> tuple[threading.Thread, list]:
    """Run fn(*args) in a started daemon thread; its result (or exception) lands in the returned list."""
    out: list = []

    def target():
        try:
            out.append(fn(*args))
        except Exception as e:  # handed to the test
            out.append(e)
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out
