"""What compiling the UNet costs, each compile in a new process as a run would pay it (a CPU proxy for the GPU's
compile time): the whole UNet vs its repeated blocks (regional), each with an empty compile cache folder (cold),
again with the folder the cold compile filled (warm: the next run on this machine), and with only that compile's
portable cache artifacts in a new folder (portable: another machine of the same kind)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dreambooth.errors import first_line

log = logging.getLogger(__name__)
KINDS = ("cold", "warm", "portable")


def measure_compile(model: str, resolution: int, scope: str, folder: str, backend: str) -> dict:
    """In this process: an eager forward + backward, then the first compiled one with `folder` as compile cache."""
    from dreambooth.bench.measure import sync
    from dreambooth.config.schema import Config
    from dreambooth.models.load import load_components
    from dreambooth.training import compiling
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = load_components(Config(model=model)).unet.to(device).train()
    side = resolution // 8
    inputs = (torch.randn(2, unet.config.in_channels, side, side, device=device),
              torch.randint(0, 1000, (2,), device=device),
              torch.randn(2, 77, unet.config.cross_attention_dim, device=device))

    def call() -> float:
        sync()
        start = time.perf_counter()
        unet(*inputs).sample.float().square().mean().backward()
        sync()
        return time.perf_counter() - start
    call()  # allocator and eager kernels warmed
    eager_s = call()
    compiling.COMPILE_BACKEND = backend
    cache = compiling.CompileCache(folder, "proxy").open()
    try:
        compiling.compile_unet(unet, scope=scope)
        before = compiling.compile_snapshot()
        first_s = call()
        stats = compiling.compile_stats(before)
        cache.save_artifacts()
    finally:
        cache.close()
    return {"eager_call_s": round(eager_s, 4), "first_call_s": round(first_s, 3),
            "compile_s": round(max(first_s - eager_s, 1e-6), 3), "cache_hits": stats.get("fxgraph_cache_hit", 0),
            "cache_misses": stats.get("fxgraph_cache_miss", 0)}


def _in_new_process(**kwargs) -> dict:
    """measure_compile in a fresh Python process (nothing compiled in memory), its result as JSON."""
    done = subprocess.run([sys.executable, "-m", "dreambooth.bench.compile_proxy", json.dumps(kwargs)],
                          capture_output=True, text=True)
    if done.returncode:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise RuntimeError(f"compile proxy process failed: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_proxy(model: str = "builtin:sd21/16", resolution: int = 32, scopes=("full", "regional"),
                  backend: str | None = None) -> dict:
    """Compile seconds (first call less an eager call) of each scope, cold, warm and portable; their ratios."""
    from dreambooth.training import compiling
    backend = backend or str(compiling.COMPILE_BACKEND)
    out = {"model": model, "resolution": resolution, "backend": backend, "status": "ok",
           "device": "cuda" if torch.cuda.is_available() else "cpu", "runs": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="dreambooth-compile-proxy-") as tmp:
            for scope in scopes:
                folder = Path(tmp) / scope
                for kind in KINDS:
                    if kind == "portable":  # a new folder holding only the cold compile's artifacts
                        if not (folder / "artifacts").is_dir():
                            continue  # a backend without inductor leaves none
                        shutil.copytree(folder / "artifacts", Path(tmp) / f"{scope}-portable" / "artifacts")
                        folder = Path(tmp) / f"{scope}-portable"
                    log.info("compile proxy: %s, %s", scope, kind)
                    run = _in_new_process(model=model, resolution=resolution, scope=scope, folder=str(folder),
                                          backend=backend)
                    out["runs"][f"{scope}_{kind}"] = run
                    log.info("compile proxy: %s %s compile %.1f s", scope, kind, run["compile_s"])
    except Exception as e:  # a machine without a C compiler, say: the job's numbers still stand
        log.exception("compile proxy failed")
        out.update(status="error", reason=f"{type(e).__name__}: {first_line(e)}")
    seconds = {k: r["compile_s"] for k, r in out["runs"].items()}
    out["seconds"] = seconds
    pairs = {"regional_over_full_cold": ("regional_cold", "full_cold")}
    for scope in scopes:
        pairs.update({f"{scope}_warm_over_cold": (f"{scope}_warm", f"{scope}_cold"),
                      f"{scope}_portable_over_cold": (f"{scope}_portable", f"{scope}_cold")})
    out["ratios"] = {k: round(seconds[a] / seconds[b], 4) for k, (a, b) in pairs.items()
                     if a in seconds and b in seconds}
    return out


if __name__ == "__main__":  # one measurement, for compile_proxy's new processes
    logging.disable(logging.WARNING)
    print(json.dumps(measure_compile(**json.loads(sys.argv[1]))))
