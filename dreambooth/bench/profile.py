"""Where a training step's time goes: host time per step against GPU kernel time, kernel launches, top operators.

A step that keeps the GPU busy a small fraction of its wall time is bound by the host (Python, dispatch, kernel
launches), and the levers are fewer launches (torch.compile, CUDA graphs), not fewer FLOPs.
"""

from __future__ import annotations

import time

import torch

from dreambooth.bench.measure import sync

TOP = 12  # operators listed per profiled row


def profile_steps(step, steps: int = 2) -> dict:
    """Profile `steps` more calls of `step` (one training step of a set-up run); per-step figures, in ms."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
    top = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: e.self_cpu_time_total,
                 reverse=True)[:TOP]
    return {
        "steps": steps,
        "wall_ms_per_step": round(wall_ms, 2),  # with the profiler's own overhead: compare rows, not absolutes
        "gpu_kernel_ms_per_step": round(gpu_ms, 2) if cuda else None,
        "gpu_busy": round(gpu_ms / wall_ms, 4) if cuda else None,
        "kernel_launches_per_step": sum(e.count for e in kernels) / steps if cuda else None,
        "cpu_ops_per_step": sum(e.count for e in events if e.device_type == DeviceType.CPU
                                and e.key.startswith("aten::")) / steps,
        "top_ops": [{"op": e.key, "calls": e.count / steps,
                     "self_cpu_ms": round(e.self_cpu_time_total / 1e3 / steps, 3),
                     "self_gpu_ms": round(e.self_device_time_total / 1e3 / steps, 3)} for e in top],
    }


def format_profile(name: str, prior: bool, p: dict) -> list[str]:
    """A few Markdown lines for one profiled row."""
    head = f"- **{name}** (prior {'on' if prior else 'off'}): {p['wall_ms_per_step']:.1f} ms/step under the profiler"
    if p.get("gpu_kernel_ms_per_step") is not None:
        head += (f", GPU kernels {p['gpu_kernel_ms_per_step']:.1f} ms ({p['gpu_busy']:.0%} busy), "
                 f"{p['kernel_launches_per_step']:.0f} kernels/step")
    head += f", {p['cpu_ops_per_step']:.0f} aten calls/step; top host time:"
    ops = ", ".join(f"{o['op']} {o['self_cpu_ms']:.1f} ms x{o['calls']:.0f}" for o in p["top_ops"][:6])
    return [head, f"  {ops}"]
