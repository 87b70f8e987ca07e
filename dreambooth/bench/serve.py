"""`dreambooth bench serve`: latency and images/s of the server on loopback at several concurrencies, its overhead
against calling the pipeline in-process, and what batching buys. JSON out, a short table printed."""

from __future__ import annotations

import http.client
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth.errors import UserError
from dreambooth.files import write_json_atomic
from dreambooth.training.runlog import library_versions

SCHEMA = "dreambooth-bench-serve/1"
ROUTE = "POST /invocations, application/json, Accept application/json;jpeg (JumpStart's compact answer)"


@dataclass
class ServeBenchOptions:
    model: str = "builtin:tiny"
    size: int | None = None          # the model's own size
    steps: int = 10
    requests: int = 32               # per concurrency level
    concurrency: tuple[int, ...] = (1, 4, 16)
    max_batch: int = 4
    out: str | None = None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(latencies: list[float], wall_s: float, images: int) -> dict:
    return {"requests": len(latencies), "p50_s": round(statistics.median(latencies), 4),
            "p95_s": round(percentile(latencies, 0.95), 4), "images_per_s": round(images / wall_s, 3),
            "wall_s": round(wall_s, 3)}


class Client:
    """One keep-alive connection, as a client library's session keeps one."""

    def __init__(self, url: str):
        self.conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=600)

    def generate(self, body: dict) -> float:
        started = time.perf_counter()
        self.conn.request("POST", "/invocations", json.dumps(body),
                          {"Content-Type": "application/json", "Accept": "application/json;jpeg"})
        response = self.conn.getresponse()
        raw = response.read()
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {raw[:200]!r}")
        return time.perf_counter() - started


def load(url: str, body: dict, requests: int, concurrency: int) -> tuple[list[float], float]:
    """`requests` requests from `concurrency` clients at once, each with its own seed: latencies and wall time."""
    latencies, errors, lock = [], [], threading.Lock()
    counter = iter(range(requests))

    def client():
        c = Client(url)
        for n in iter(lambda: next(counter, None), None):
            try:
                t = c.generate({**body, "seed": n})
            except Exception as e:  # reported, not hidden
                errors.append(str(e))
                return
            with lock:
                latencies.append(t)
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"benchmark requests failed: {errors[0]}")
    return latencies, time.perf_counter() - started


def run_serve_bench(o: ServeBenchOptions) -> dict:
    try:
        from dreambooth.serve.engine import Engine, resolve_spec
        from dreambooth.serve.jobs import Item, Shape
        from dreambooth.serve.options import ModelSpec, ServeOptions
        from dreambooth.serve.runner import Background
    except ImportError as e:
        raise UserError(f"dreambooth bench serve needs the serve extra ({e.name} is missing): "
                        "pip install 'dreambooth[serve]'") from None
    spec = resolve_spec(ModelSpec(o.model))
    engine = Engine.load(spec)  # one pipeline, called directly and behind the server
    size = o.size or engine.native_size
    body = {"prompt": "a photo of riobugger toy", "width": size, "height": size, "num_inference_steps": o.steps,
            "guidance_scale": 7.5}
    shape = Shape(size, size, o.steps, 7.5, "default")
    cuda = engine.device == "cuda"
    result = {"schema": SCHEMA, "date": time.strftime("%Y-%m-%d"), "model": o.model, "size": size, "steps": o.steps,
              "route": ROUTE, "max_batch": o.max_batch, "requests_per_level": o.requests,
              "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, {os.cpu_count()} "
                                                                   f"cores, {torch.get_num_threads()} torch threads)",
              "versions": library_versions(), "statistic": "median (p50) and 95th percentile of request latency",
              "load_average_before": os.getloadavg()[0]}  # other work on the machine shows in every number

    def in_process(seed: int) -> float:
        started = time.perf_counter()
        engine.run(shape, [Item(body["prompt"], "", seed)], lambda: False)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    options = ServeOptions(port=0, log_level="warning", max_batch=o.max_batch, max_queue=max(64, o.requests),
                           default_steps=min(o.steps, 150))
    with Background(spec, options, load=lambda: engine) as server:
        client = Client(server.url)
        for n in range(2):  # warm-up: first calls allocate and tune
            in_process(n), client.generate({**body, "seed": n})
        # One client: the same request in-process and through the server, alternately, so a slow spell of a
        # shared machine hits both alike.
        direct, served = [], []
        for n in range(o.requests):
            direct.append(in_process(n))
            served.append(client.generate({**body, "seed": n}))
        result["in_process"] = summary(direct, sum(direct), len(direct))
        result["server_concurrency_1"] = summary(served, sum(served), len(served))
        result["overhead_concurrency_1"] = round(statistics.median(served) / statistics.median(direct) - 1, 4)
        result["concurrency"] = {}
        for c in o.concurrency:
            latencies, wall = load(server.url, body, o.requests, c)
            result["concurrency"][str(c)] = summary(latencies, wall, o.requests)
        # What waiting requests of one shape gain by sharing a call: unbatched and batched in alternating halves.
        batching, runs = {}, {1: ([], 0.0, 0), o.max_batch: ([], 0.0, 0)}
        for half in (o.requests // 2, o.requests - o.requests // 2):
            for max_batch in runs:
                server.worker.max_batch = max_batch
                before = server.worker.batches_run
                latencies, wall = load(server.url, body, half, 4)
                seen, total, calls = runs[max_batch]
                runs[max_batch] = (seen + latencies, total + wall, calls + server.worker.batches_run - before)
        server.worker.max_batch = o.max_batch
        for max_batch, (latencies, wall, calls) in runs.items():
            batching[f"max_batch_{max_batch}"] = {**summary(latencies, wall, len(latencies)), "pipeline_calls": calls}
        batching["speedup"] = round(batching[f"max_batch_{o.max_batch}"]["images_per_s"]
                                    / batching["max_batch_1"]["images_per_s"], 3)
        result["batching_concurrency_4"] = batching
    result["load_average_after"] = os.getloadavg()[0]
    if o.out:
        Path(o.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(o.out, result)
    return result


def format_serve_table(r: dict) -> str:
    lines = [f"{r['date']} | {r['device']} | {r['model']} {r['size']} px, {r['steps']} steps | {r['route']}",
             f"load average (1 min) {r['load_average_before']:.1f} before, {r['load_average_after']:.1f} after", "",
             "| clients | p50 s | p95 s | images/s |", "| --- | --- | --- | --- |",
             f"| in-process (1) | {r['in_process']['p50_s']:.3f} | {r['in_process']['p95_s']:.3f} | "
             f"{r['in_process']['images_per_s']:.2f} |",
             f"| server (1, alternating) | {r['server_concurrency_1']['p50_s']:.3f} | "
             f"{r['server_concurrency_1']['p95_s']:.3f} | {r['server_concurrency_1']['images_per_s']:.2f} |"]
    for c, s in r["concurrency"].items():
        lines.append(f"| server ({c}) | {s['p50_s']:.3f} | {s['p95_s']:.3f} | {s['images_per_s']:.2f} |")
    b = r["batching_concurrency_4"]
    one, many = b["max_batch_1"], b[f"max_batch_{r['max_batch']}"]
    lines += ["", f"server overhead at 1 client: {100 * r['overhead_concurrency_1']:+.1f}% (p50 against in-process)",
              f"batching at 4 clients: {one['images_per_s']:.2f} images/s unbatched ({one['pipeline_calls']} calls), "
              f"{many['images_per_s']:.2f} with --max-batch {r['max_batch']} ({many['pipeline_calls']} calls): "
              f"x{b['speedup']:.2f}"]
    return "\n".join(lines)


def bench_serve_from_args(args) -> int:
    try:
        levels = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
    except ValueError:
        raise UserError(f"--concurrency takes a comma list of client counts such as 1,4,16 (got {args.concurrency})")
    if not levels or min(levels) < 1 or args.requests < 1 or args.steps < 1 or args.max_batch < 1:
        raise UserError("--concurrency, --requests, --steps and --max-batch must be at least 1")
    result = run_serve_bench(ServeBenchOptions(args.model, args.size, args.steps, args.requests, levels,
                                               args.max_batch, args.out))
    print(format_serve_table(result))
    print(f"results: {args.out}")
    return 0
