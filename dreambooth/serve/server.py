"""The HTTP app: SageMaker/JumpStart's /ping and /invocations, AUTOMATIC1111's /sdapi/v1/txt2img, and a page at /.

FastAPI + uvicorn (the `serve` extra): typed request models through pydantic, an asyncio loop that answers /ping
while the worker thread generates, and graceful shutdown on SIGTERM built in."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from dreambooth.errors import first_line
from dreambooth.serve.encode import jpeg_base64, json_bytes, png_base64, rgb_array
from dreambooth.serve.guard import Guard, error_response
from dreambooth.serve.jobs import Cancelled, Job
from dreambooth.serve.options import Limits
from dreambooth.serve.schemas import (A1111_SAMPLERS, ApiError, Context, JumpStartBody, Txt2ImgBody, jumpstart_job,
                                      parse, txt2img_job)
from dreambooth.serve.worker import Busy, Worker

log = logging.getLogger(__name__)
TEXT, JSON = "application/x-text", "application/json"


@dataclass
class AppConfig:
    """What the routes need besides the worker: limits, the token, adapter names (never their paths)."""
    limits: Limits = field(default_factory=Limits)
    token: str | None = None
    adapters: list[str] = field(default_factory=list)
    default_adapter: str | None = None
    metadata: bool = True   # settings inside every PNG/JPEG
    title: str = "dreambooth"
    default_steps: int = 50


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def wants_jpeg(accept: str | None) -> bool:
    """JumpStart's two answers: `application/json` (RGB arrays) or `application/json;jpeg` (base64 JPEG)."""
    for entry in (accept or JSON).split(","):
        kind = entry.replace(" ", "").lower().split(";q=", 1)[0]
        if kind == "application/json;jpeg":
            return True
        if kind.split(";", 1)[0] in (JSON, "*/*", "application/*"):
            return False
    raise ApiError(406, f"Accept '{accept}' is not served: use application/json (RGB arrays) or "
                        "application/json;jpeg (base64 JPEG)", "Accept", kind="not_acceptable")


def load_json(raw: bytes):
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def x_text_prompt(raw: bytes) -> str:
    """An application/x-text body: the prompt as JSON text (`json.dumps("...")`) or as plain UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the application/x-text body is not UTF-8 text") from None
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def sampler_label(job: Job) -> str:
    ours = {v: k for k, v in A1111_SAMPLERS.items()}
    return ours.get(job.shape.sampler, job.scheduler)


def create_app(worker: Worker, cfg: AppConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        if worker.state == "new":
            worker.start()  # loads the model in its thread; /ping answers 503 until it is ready
        yield
        worker.stop(0.0)

    app = FastAPI(title="dreambooth serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Guard, token=cfg.token, max_body=cfg.limits.max_body)

    def context() -> Context:
        size = worker.engine.native_size if worker.engine is not None else 512
        return Context(cfg.limits, cfg.adapters, cfg.default_adapter, size, cfg.default_steps)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kinds = {404: "not_found", 405: "method_not_allowed"}
        message = (f"no route {request.method} {request.url.path}: the routes are GET /ping, POST /invocations, "
                   "POST /sdapi/v1/txt2img, GET /" if e.status_code in kinds else str(e.detail))
        return error_response(ApiError(e.status_code, message, kind=kinds.get(e.status_code, "error")))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return error_response(ApiError(422, f"invalid request: {first_line(e)}"))

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {first_line(e)}", kind="internal"))

    async def run(job: Job, request: Request) -> list:
        """Queue the job and wait for its images, giving up at the time limit or when the client leaves."""
        try:
            worker.submit(job)
        except Busy as e:
            raise ApiError(503, str(e), headers={"Retry-After": str(e.retry_after)}, kind="busy") from None
        loop = asyncio.get_running_loop()
        done = asyncio.wrap_future(job.future)
        deadline = loop.time() + cfg.limits.timeout_s

        def give_up():
            done.cancel()  # first, so the error the job is given never waits unread in the loop's future
            job.cancel()
        try:
            while not done.done():
                left = deadline - loop.time()
                if left <= 0:
                    give_up()
                    raise ApiError(504, f"the request took longer than the server's limit of "
                                        f"{cfg.limits.timeout_s:g} s (--timeout)", kind="timeout")
                await asyncio.wait({done}, timeout=min(0.25, left))
                if not done.done() and worker.past_deadline():  # answer now, even mid-step or mid-decode
                    give_up()
                    raise ApiError(503, "the server shut down before this request was served",
                                   headers={"Retry-After": "30"}, kind="shutting_down")
                if not done.done() and await request.is_disconnected():
                    give_up()
                    raise ApiError(499, "the client closed the connection", kind="gone")  # nobody reads it
        except asyncio.CancelledError:  # the server is stopping past its grace period
            give_up()
            raise
        try:
            return done.result()
        except Cancelled as e:
            raise ApiError(503, str(e), headers={"Retry-After": "30"}, kind="shutting_down") from None
        except Exception as e:
            raise ApiError(500, f"generation failed: {first_line(e)}", kind="internal") from None

    def settings(job: Job, i: int) -> dict | None:
        return job.settings(i) if cfg.metadata else None

    @app.get("/ping")
    async def ping():
        if worker.state == "ready":
            return {"status": "ready"}
        message = {"loading": "the model is still loading"}.get(worker.state, f"the server is {worker.state}")
        return JSONResponse({"error": "unavailable", "message": message, "field": None, "status": worker.state},
                            status_code=503, headers={"Retry-After": "5"})

    @app.post("/invocations")
    async def invocations(request: Request):
        ctype = media_type(request.headers.get("content-type"))
        jpeg = wants_jpeg(request.headers.get("accept"))
        raw = await request.body()
        if ctype == TEXT:
            body = parse(JumpStartBody, {"prompt": x_text_prompt(raw)})
        elif ctype == JSON:
            body = parse(JumpStartBody, load_json(raw))
        else:
            raise ApiError(415, f"Content-Type '{ctype or 'none'}' is not served: use {JSON} or {TEXT}",
                           "Content-Type")
        job = jumpstart_job(body, context())
        images = await run(job, request)

        def answer() -> bytes:
            encode = ((lambda im, i: jpeg_base64(im, settings(job, i))) if jpeg else (lambda im, i: rgb_array(im)))
            if ctype == TEXT:  # JumpStart's x-text answer holds one image
                return json_bytes({"generated_image": encode(images[0], 0), "prompt": body.prompt})
            return json_bytes({"generated_images": [encode(im, i) for i, im in enumerate(images)],
                               "prompt": body.prompt})
        return Response(await asyncio.to_thread(answer), media_type=JSON)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        ctype = media_type(request.headers.get("content-type"))
        if ctype not in ("", JSON):
            raise ApiError(415, f"Content-Type '{ctype}' is not served: send the body as {JSON}", "Content-Type")
        body = parse(Txt2ImgBody, load_json(await request.body()))
        job = txt2img_job(body, context())
        images = await run(job, request)

        def answer() -> bytes:
            seeds = [item.seed for item in job.items]
            s = job.shape
            sampler = sampler_label(job)
            info = {"prompt": job.items[0].prompt, "all_prompts": [i.prompt for i in job.items],
                    "negative_prompt": body.negative_prompt,
                    "all_negative_prompts": [i.negative for i in job.items], "seed": seeds[0], "all_seeds": seeds,
                    "width": s.width, "height": s.height, "sampler_name": sampler, "cfg_scale": s.guidance,
                    "steps": s.steps, "batch_size": body.batch_size, "n_iter": body.n_iter, "adapter": s.adapter,
                    "adapter_scale": s.adapter_scale if s.adapter else None, "sd_model_name": cfg.title,
                    "infotexts": [infotext(job, i, sampler, cfg.title) for i in range(len(job.items))]}
            return json_bytes({"images": [png_base64(im, settings(job, i)) for i, im in enumerate(images)],
                               "parameters": {**body.model_dump(), "width": s.width, "height": s.height,
                                              "steps": s.steps, "seed": seeds[0]},
                               "info": json.dumps(info)})
        return Response(await asyncio.to_thread(answer), media_type=JSON)

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": name, "aliases": [ours], "options": {}} for name, ours in A1111_SAMPLERS.items()]

    @app.get("/sdapi/v1/loras")
    async def loras():
        return [{"name": name, "alias": name, "path": "", "metadata": {}} for name in cfg.adapters]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": cfg.title, "model_name": cfg.title, "hash": None, "filename": "", "config": None}]

    page_cfg = {"title": cfg.title, "adapters": cfg.adapters, "default_adapter": cfg.default_adapter,
                "samplers": list(A1111_SAMPLERS), "limits": vars(cfg.limits), "steps": cfg.default_steps}
    # Built once: the page depends on the server's settings only. JSON inside <script>: "<" escaped so no value
    # can close the tag.
    page_html = resources.files("dreambooth.serve").joinpath("page.html").read_text().replace(
        "__CONFIG__", json.dumps(page_cfg).replace("<", "\\u003c"))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(page_html)

    return app


def infotext(job: Job, i: int, sampler: str, model: str) -> str:
    """AUTOMATIC1111's one-paragraph description of an image, which A1111 tools parse."""
    item, s = job.items[i], job.shape
    lines = [item.prompt] + ([f"Negative prompt: {item.negative}"] if item.negative else [])
    extra = f", Lora: {s.adapter} {s.adapter_scale:g}" if s.adapter else ""
    lines.append(f"Steps: {s.steps}, Sampler: {sampler}, CFG scale: {s.guidance:g}, Seed: {item.seed}, "
                 f"Size: {s.width}x{s.height}, Model: {model}{extra}")
    return "\n".join(lines)
