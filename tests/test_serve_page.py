"""The page at / in headless Chromium: it renders, generates into its gallery, and shows the server's errors.

Chromium is driven over its DevTools pipe (--remote-debugging-pipe: JSON messages ending in NUL on fds 3 and 4),
so no browser-automation package is needed. Skipped where no Chromium is installed."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from dreambooth.serve.options import ModelSpec, ServeOptions  # noqa: E402
from dreambooth.serve.runner import Background  # noqa: E402

BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="needs Chromium (apt-get install chromium)")


class Chromium:
    """A headless Chromium and one page of it, commanded over the DevTools protocol."""

    def __init__(self, profile_dir):
        to_browser, self._out = os.pipe()
        self._in, from_browser = os.pipe()
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
                "--disable-dev-shm-usage", "--remote-debugging-pipe", f"--user-data-dir={profile_dir}", "about:blank"]
        # The browser reads commands on fd 3 and writes answers on fd 4; posix_spawn puts the pipe ends there.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]  # so none is 3 or 4
        actions = [(os.POSIX_SPAWN_DUP2, high[0], 3), (os.POSIX_SPAWN_DUP2, high[1], 4),
                   (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)]
        self.pid = os.posix_spawn(BROWSER, [BROWSER, *args], os.environ, file_actions=actions)
        for fd in (to_browser, from_browser, *high):
            os.close(fd)
        self._buffer, self._id, self.on_event = b"", 0, None
        target = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]

    def post(self, method: str, session: str | None = None, **params) -> int:
        """Send a command without waiting for its answer (which `send` then skips)."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        return self._id

    def send(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        wanted = self.post(method, session, **params)
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                assert left > 0 and select.select([self._in], [], [], left)[0], f"no answer to {method}"
                chunk = os.read(self._in, 1 << 16)
                assert chunk, "Chromium closed its pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == wanted:
                assert "error" not in answer, answer["error"]
                return answer["result"]
            if "method" in answer and self.on_event:  # an event
                self.on_event(answer)

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", self.session, expression=expression, returnByValue=True,
                           awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)
        return value

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except (AssertionError, OSError):
            pass
        deadline = time.monotonic() + 10
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.05)
        os.close(self._in), os.close(self._out)


FILL = """(() => {{
  const f = document.getElementById("form");
  for (const [name, value] of Object.entries({fields})) f.elements[name].value = value;
  document.getElementById("generate").click();
  return true;
}})()"""


def test_page_renders_and_generates_in_chromium(tmp_path):
    options = ServeOptions(port=0, log_level="warning", default_steps=2)
    with Background(ModelSpec("builtin:tiny"), options) as server:
        browser = Chromium(tmp_path / "profile")
        try:
            browser.send("Page.navigate", browser.session, url=server.url + "/")
            browser.wait_for("document.readyState === 'complete' && document.getElementById('status')"
                             ".textContent === 'Ready.'")
            assert browser.js("document.title") == "dreambooth serve"
            assert browser.js("document.getElementById('model').textContent") == "builtin:tiny"
            assert browser.js("document.querySelector('[name=steps]').value") == "2"  # the server's default
            assert "Euler a" in browser.js("[...document.querySelectorAll('[name=sampler_name] option')]"
                                           ".map(o => o.value)")

            fields = {"prompt": "a photo of riobugger toy", "negative_prompt": "blurry", "width": 32, "height": 24,
                      "seed": 7, "batch_size": 2, "sampler_name": "Euler a"}
            browser.js(FILL.format(fields=json.dumps(fields)))
            browser.wait_for("document.querySelectorAll('#gallery figure').length === 2")
            sizes = browser.wait_for("(() => { const i = [...document.querySelectorAll('#gallery img')]; "
                                     "return i.every(x => x.complete && x.naturalWidth) && "
                                     "i.map(x => [x.naturalWidth, x.naturalHeight]); })()")
            assert sizes == [[32, 24], [32, 24]]
            captions = browser.js("[...document.querySelectorAll('#gallery figcaption')].map(c => c.textContent)")
            assert "seed 8" in captions[0] and "seed 7" in captions[1]  # newest first
            assert all("a photo of riobugger toy" in c and "Euler a" in c and "32×24" in c for c in captions)

            browser.js(FILL.format(fields=json.dumps({"width": 36})))
            message = browser.wait_for("(() => { const e = document.getElementById('error'); "
                                       "return !e.hidden && e.textContent; })()")
            assert "width must be a multiple of 8" in message
            assert browser.js("document.querySelector('[name=width]').classList.contains('invalid')")
            assert browser.js("document.querySelectorAll('#gallery figure').length") == 2
            shot = browser.send("Page.captureScreenshot", browser.session, format="png")["data"]
            assert len(shot) > 1000
        finally:
            browser.close()


def test_page_behind_a_token_logs_in_once(tmp_path):
    """With a token, the browser's login prompt (answered here over DevTools) opens the page, and the page's own
    requests reuse that login."""
    options = ServeOptions(port=0, log_level="warning", default_steps=2, token="page-token-123")
    with Background(ModelSpec("builtin:tiny"), options) as server:
        browser = Chromium(tmp_path / "profile")
        logins = []

        def answer(event):
            params, session = event.get("params", {}), event.get("sessionId")
            if event["method"] == "Fetch.authRequired":
                logins.append(params["request"]["url"])
                browser.post("Fetch.continueWithAuth", session, requestId=params["requestId"],
                             authChallengeResponse={"response": "ProvideCredentials", "username": "me",
                                                    "password": "page-token-123"})
            elif event["method"] == "Fetch.requestPaused":
                browser.post("Fetch.continueRequest", session, requestId=params["requestId"])
        try:
            browser.on_event = answer
            browser.send("Fetch.enable", browser.session, handleAuthRequests=True)
            browser.send("Page.navigate", browser.session, url=server.url + "/")
            browser.wait_for("document.getElementById('status') && "
                             "document.getElementById('status').textContent === 'Ready.'")
            browser.js(FILL.format(fields=json.dumps({"prompt": "a toy", "width": 16, "height": 16})))
            browser.wait_for("document.querySelectorAll('#gallery img').length === 1")
            assert logins == [server.url + "/"]  # asked once, for the page; ping and txt2img reused it
        finally:
            browser.close()
