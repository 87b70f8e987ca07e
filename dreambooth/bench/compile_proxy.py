"""What compiling the UNet costs, measured side by side in one process (a CPU proxy for the GPU's compile time):
the whole UNet vs its repeated blocks (regional), each from an empty cache (cold) and again from the cache
artifacts the cold compile saved (warm: what a second process with a kept cache folder would pay)."""

from __future__ import annotations

import copy
import logging
import time

import torch

from dreambooth.bench.measure import sync
from dreambooth.errors import first_line
from dreambooth.config.schema import Config
from dreambooth.models.load import build_builtin_sd21, load_components
from dreambooth.training import compiling

log = logging.getLogger(__name__)


def _fresh_process_state() -> None:
    """Forget compiled code and collected cache artifacts, as a new process would start."""
    import torch._dynamo
    torch._dynamo.reset()
    try:
        from torch.compiler._cache import CacheArtifactManager  # private; only so the next save holds one compile
        CacheArtifactManager.clear()
    except (ImportError, AttributeError):
        pass


def _first_call(unet, scope: str | None, inputs, artifacts: bytes | None = None) -> tuple[float, bytes | None]:
    """Seconds of the first forward + backward (compilation and one run) in an empty inductor cache folder,
    after loading `artifacts` into it when given; and the cache artifacts this compile produced."""
    from torch._inductor.utils import fresh_cache
    _fresh_process_state()
    model = copy.deepcopy(unet).train()
    with fresh_cache():  # an empty temporary cache folder, in-memory kernel caches cleared
        if artifacts is not None:
            torch.compiler.load_cache_artifacts(artifacts)
        if scope is not None:
            compiling.compile_unet(model, scope=scope)
        sync()
        start = time.perf_counter()
        model(*inputs).sample.float().square().mean().backward()
        sync()
        seconds = time.perf_counter() - start
        saved = torch.compiler.save_cache_artifacts() if scope is not None and artifacts is None else None
    return seconds, saved[0] if saved else None


def compile_proxy(model: str = "builtin:sd21/16", resolution: int = 32) -> dict:
    """Compile seconds (first call less an eager call) of full and regional, cold and warm; their ratios."""
    out = {"model": model, "resolution": resolution, "backend": str(compiling.COMPILE_BACKEND),
           "device": "cuda" if torch.cuda.is_available() else "cpu", "status": "ok"}
    try:
        device = torch.device(out["device"])
        parts = build_builtin_sd21(model) if model.startswith("builtin:sd21") else load_components(Config(model=model))
        unet = parts.unet.to(device)
        side = resolution // 8
        inputs = (torch.randn(2, unet.config.in_channels, side, side, device=device),
                  torch.randint(0, 1000, (2,), device=device),
                  torch.randn(2, 77, unet.config.cross_attention_dim, device=device))
        _first_call(unet, None, inputs)  # warm the allocator and eager kernels
        eager_s, _ = _first_call(unet, None, inputs)
        seconds = {"eager_call_s": eager_s}
        for scope in ("full", "regional"):
            log.info("compile proxy: %s, cold", scope)
            seconds[f"{scope}_cold_s"], artifacts = _first_call(unet, scope, inputs)
            log.info("compile proxy: %s cold first call %.1f s", scope, seconds[f"{scope}_cold_s"])
            log.info("compile proxy: %s, warm", scope)
            seconds[f"{scope}_warm_s"], _ = (_first_call(unet, scope, inputs, artifacts) if artifacts
                                             else (None, None))
        compile_s = {k: max(v - eager_s, 1e-6) for k, v in seconds.items() if k != "eager_call_s" and v is not None}
        out["seconds"] = {k: round(v, 3) for k, v in seconds.items() if v is not None}
        out["compile_seconds"] = {k: round(v, 3) for k, v in compile_s.items()}  # first call less an eager call
        ratios = {"regional_over_full_cold": ("regional_cold_s", "full_cold_s"),
                  "full_warm_over_cold": ("full_warm_s", "full_cold_s"),
                  "regional_warm_over_cold": ("regional_warm_s", "regional_cold_s"),
                  "regional_warm_over_full_cold": ("regional_warm_s", "full_cold_s")}
        out["ratios"] = {k: round(compile_s[a] / compile_s[b], 4) for k, (a, b) in ratios.items()
                         if a in compile_s and b in compile_s}
    except Exception as e:  # a machine without a C compiler, say: the job's numbers still stand
        log.exception("compile proxy failed")
        out.update(status="error", reason=f"{type(e).__name__}: {first_line(e)}")
    finally:
        _fresh_process_state()
    return out
