"""The benchmark's measuring instruments: device sync, peak memory windows, the bf16 matmul peak, UNet FLOPs."""

from __future__ import annotations

import ctypes
import gc
import logging
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from dreambooth.errors import UserError, first_line
from dreambooth.training.runlog import peak_rss

log = logging.getLogger(__name__)


@contextmanager
def row_status(row: dict, what: str):
    """A benchmark row's failure becomes its status (skipped, oom, error), never the bench's end: a broken row must
    not lose the others' numbers."""
    try:
        yield
    except UserError as e:
        row.update(status="skipped", reason=str(e))
    except torch.OutOfMemoryError as e:
        row.update(status="oom", reason=first_line(e))
    except Exception as e:
        log.exception("benchmark %s failed", what)
        row.update(status="error", reason=f"{type(e).__name__}: {first_line(e)}")


def device_model(model: str | None, resolution: int | None) -> tuple[str, int]:
    """A benchmark's model and resolution, unless given: SD 2.1 base's architecture at 512 px on CUDA, a quarter of
    its widths at 128 px on CPU."""
    cuda = torch.cuda.is_available()
    return model or ("builtin:sd21" if cuda else "builtin:sd21/4"), resolution or (512 if cuda else 128)


def device_label() -> str:
    """The benchmark's device as its JSON names it: the GPU's name, or the CPU's architecture and threads."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def sync() -> None:
    """Wait for the GPU's queued work, so a timer brackets finished work (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> bool:
    """Start a fresh peak-memory window; False when the CPU peak cannot be reset (then it is the process's)."""
    gc.collect()
    try:  # hand freed heap back to the OS, so the next row's RSS starts low (glibc keeps it otherwise)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak RSS
        return True
    except OSError:
        return False


def status_bytes(key: str) -> int | None:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak); None off Linux."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def read_peak() -> dict:
    peak = {}
    if torch.cuda.is_available():
        peak["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        peak["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    peak["cpu_peak_rss_bytes"] = status_bytes("VmHWM") or peak_rss()
    return peak


def bf16_matmul_peak_tflops(device: torch.device) -> float:
    """bf16 matrix-product throughput measured here and now: the MFU denominator."""
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 3)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def count_unet_flops(unet, images: int, resolution: int, vae_scale: int, device, autocast_dtype) -> int:
    """FLOPs of one UNet forward + backward on `images` latents (no checkpointing, so no recomputation).

    Moves `unet` to `device` and leaves gradients on it: pass a copy you will discard."""
    from torch.utils.flop_counter import FlopCounterMode
    unet = unet.to(device).train()
    side = resolution // vae_scale
    latents = torch.randn(images, unet.config.in_channels, side, side, device=device)
    embeds = torch.randn(images, 77, unet.config.cross_attention_dim, device=device)
    t = torch.randint(0, 1000, (images,), device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = unet(latents, t, embeds).sample
        out.float().square().mean().backward()
    return counter.get_total_flops()
