"""Start and stop the server: bind the socket, load the model in the worker, drain on SIGTERM / Ctrl-C, exit 0."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Callable

import uvicorn

from dreambooth.errors import UserError
from dreambooth.serve.engine import Engine
from dreambooth.serve.options import ModelSpec, ServeOptions, check_options
from dreambooth.serve.server import AppConfig, create_app
from dreambooth.serve.worker import Worker

log = logging.getLogger(__name__)
def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so a taken port is one clear line (and --port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (or --host)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    """uvicorn's server, draining our worker on shutdown and exiting 0 after a signal (uvicorn re-raises it)."""

    def __init__(self, config: uvicorn.Config, worker: Worker, grace_s: float):
        super().__init__(config)
        self.worker, self.grace_s = worker, grace_s

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:  # a second Ctrl-C: stop now
            self.force_exit = True
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        return await super().on_tick(counter) or self.worker.state == "failed"

    async def shutdown(self, sockets=None) -> None:
        self.worker.drain(self.grace_s)  # queued and running jobs get the grace period, new ones a 503
        await super().shutdown(sockets)
        self.worker.stop(0.0)


def build(spec: ModelSpec, o: ServeOptions, load: Callable[[], Engine] | None = None) -> tuple[Worker, object]:
    """The worker (loading `spec`, or calling `load`) and the app around it."""
    worker = Worker(load or (lambda: Engine.load(spec)), o.max_queue, o.max_batch)
    title = os.path.basename(os.path.normpath(spec.model)) or spec.model
    app = create_app(worker, AppConfig(o.limits, o.token, list(spec.loras), spec.default_adapter, o.metadata, title,
                                       o.default_steps))
    return worker, app


def make_server(spec: ModelSpec, o: ServeOptions, load=None) -> tuple[Server, Worker, socket.socket]:
    worker, app = build(spec, o, load)
    sock = bind(o.host, o.port)
    # uvicorn's own limit comes after ours: by then every waiting request has had its 503.
    config = uvicorn.Config(app, log_level=o.log_level, timeout_graceful_shutdown=o.grace_s + 5.0,
                            server_header=False, lifespan="on")
    return Server(config, worker, o.grace_s), worker, sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(spec: ModelSpec, o: ServeOptions) -> int:
    """Run until SIGTERM / Ctrl-C; 0 after a graceful stop, the load error if the model failed to load. `o` comes
    checked (options.from_args)."""
    server, worker, sock = make_server(spec, o)
    print(f"listening on {url_of(sock)} (loading {spec.model}; GET /ping answers 200 once it is ready)", flush=True)
    server.run(sockets=[sock])
    if worker.error is not None:
        if isinstance(worker.error, UserError):
            raise worker.error
        raise UserError(f"cannot load {spec.model}: {worker.error}")
    print("stopped", flush=True)
    return 0


class Background:
    """A server in a thread of this process (tests, the benchmark): `with Background(...) as s: s.url`."""

    def __init__(self, spec: ModelSpec, o: ServeOptions, load=None, ready_s: float = 120.0):
        o = check_options(o)
        self.server, self.worker, self.sock = make_server(spec, o, load)
        self.url, self.ready_s = url_of(self.sock), ready_s
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Background":
        self.thread.start()
        deadline = time.monotonic() + self.ready_s
        while self.worker.state != "ready":
            if self.worker.state == "failed" or time.monotonic() > deadline or not self.thread.is_alive():
                self.stop()
                raise RuntimeError(f"the server did not become ready: {self.worker.error or self.worker.state}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __exit__(self, *exc) -> None:
        self.stop()
