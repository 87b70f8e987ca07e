"""torch.compile of the UNet, and running it eagerly for a while (whether a run compiles: config/plan.py).

On the H200 (SD 2.1 base, 512 px, prior on) CUDA graphs took a default-profile step from 0.27 s to 0.09 s, since
eager steps there are bound by launching ~7,000 kernels; compiling cost about 2 minutes at the first steps.
"""

from __future__ import annotations

import hashlib
import logging
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from dreambooth.config.compile_plan import RECORDS
from dreambooth.files import atomic_file, read_json, write_json_atomic

log = logging.getLogger(__name__)

COMPILE_BACKEND = "inductor"  # tests trace with "eager": the same graph capture without minutes of code generation


def repeated_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's repeated blocks (diffusers names their classes in `_repeated_blocks`: SD's BasicTransformerBlock),
    which regional compilation compiles one by one: same-shaped blocks share one compiled graph."""
    names = set(getattr(unet, "_repeated_blocks", None) or ["BasicTransformerBlock"])
    return [m for m in unet.modules() if type(m).__name__ in names]


def compile_unet(unet: torch.nn.Module, mode: str = "default", fall_back: bool = False,
                 scope: str = "full") -> None:
    """torch.compile the UNet in place, so parameter names (checkpoints, export) stay as they are.
    fall_back: a failing compile runs the UNet eagerly with a warning instead of ending the run (compile: auto).
    scope: full (one graph of the whole UNet) or regional (each repeated block; the rest runs eagerly)."""
    import torch._dynamo
    # Training shapes are fixed: one static graph. A smaller last batch compiles once more rather than switching
    # the whole run to a slower dynamic-shape graph.
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # older torch
    setattr(dynamo, limit, max(getattr(dynamo, limit), 16))
    dynamo.suppress_errors = fall_back
    inductor = COMPILE_BACKEND == "inductor"
    kwargs = {"backend": COMPILE_BACKEND, "mode": None if mode == "default" or not inductor else mode,
              "dynamic": False}
    if scope == "regional":
        blocks = repeated_blocks(unet)
        if not blocks:
            raise ValueError(f"{type(unet).__name__} has no repeated blocks to compile regionally")
        for block in blocks:  # what diffusers' compile_repeated_blocks does, for any module with such blocks
            block.compile(**kwargs)
    else:
        unet.compile(**kwargs)


@contextmanager
def eager(module: torch.nn.Module):
    """Run an in-place-compiled module eagerly for a while (validation: other shapes, no gradients), sparing
    a second compilation that would cost more than it saves."""
    compiled = {m: m._compiled_call_impl for m in module.modules()
                if getattr(m, "_compiled_call_impl", None) is not None}  # the UNet, or its regions
    for m in compiled:
        m._compiled_call_impl = None
    try:
        yield module
    finally:
        for m, impl in compiled.items():
            m._compiled_call_impl = impl


# torch.compile's own timers (seconds, summed over calls) worth reporting: where a compile's time went.
COMPILE_PHASES = {"dynamo_and_forward_s": "_compile.compile_inner", "backward_s": "compile_fx.<locals>.bw_compiler",
                  "aot_joint_trace_s": "aot_trace_joint_graph", "inductor_codegen_s": "GraphLowering.compile_to_module",
                  "kernel_compile_wait_s": "async_compile.wait"}


def compile_snapshot() -> dict[str, float]:
    """torch.compile's phase timers and cache counters so far in this process (subtract two to get one run's)."""
    from torch._dynamo.utils import compile_times, counters
    try:
        names, values = compile_times(repr="csv", aggregate=True)
    except Exception:  # a private API: its shape may change between torch versions
        names, values = [], []
    times = dict(zip(names, values))
    snap = {key: float(times.get(name, 0.0)) for key, name in COMPILE_PHASES.items()}
    # Cache hits, misses and bypasses of AOTAutograd's and inductor's disk caches (a warm run should hit).
    snap.update({k: float(v) for group in ("aot_autograd", "inductor") for k, v in counters[group].items()
                 if "cache" in k})
    return snap


def compile_stats(before: dict[str, float]) -> dict[str, float]:
    """What compiling cost since `before` (a compile_snapshot)."""
    after = compile_snapshot()
    return {k: round(v - before.get(k, 0.0), 3) for k, v in after.items() if v - before.get(k, 0.0)}


INDUCTOR_DIR = "TORCHINDUCTOR_CACHE_DIR"
_SET_HERE: set[str] = set()  # the folders this process pointed inductor at (a run not closed may leave one set)
FIRST, NEXT = 3, 5  # the compile's steps (compile, CUDA-graph warm-up, recording) and the steps that time a plain one


class CompileCache:
    """Keeps a run's compiled code in its cache folder (config/compile_plan.py): inductor's disk cache points there,
    torch's portable cache artifacts are saved beside it (and loaded into a folder that came without its cache),
    and the compile's cost is recorded for the next run's plan."""

    def __init__(self, folder: str | None, entry: str, main_process: bool = True):
        self.folder = Path(folder) if folder else None
        self.entry, self.main = entry, main_process
        self.step_seconds: list[float] = []
        self.result: dict | None = None  # the compile's cost once timed (train_summary.json, bench --job)
        self._previous_dir: str | None = None
        self._set_dir = False
        self._before: dict[str, float] | None = None  # torch's counters when opened; None: nothing compiled here

    def open(self) -> "CompileCache":
        """Point inductor at the folder (unless the user set TORCHINDUCTOR_CACHE_DIR) and fill it from artifacts."""
        self._before = compile_snapshot()
        if self.folder is None:
            return self
        inductor = self.folder / "inductor"
        current = os.environ.get(INDUCTOR_DIR)
        if current and current not in _SET_HERE and not _torch_default(current):
            log.info("compile cache: %s is set, so compiled code is kept in %s", INDUCTOR_DIR, current)
        else:
            self._previous_dir, self._set_dir = current, True
            fresh = not inductor.exists()
            inductor.mkdir(parents=True, exist_ok=True)
            os.environ[INDUCTOR_DIR] = str(inductor)
            _SET_HERE.add(str(inductor))
            if fresh:
                self._load_artifacts()
        return self

    def _load_artifacts(self) -> None:
        """A folder copied from another machine may bring only its artifacts: unpack them into the disk cache."""
        for path in sorted((self.folder / "artifacts").glob("*.bin")):
            try:
                torch.compiler.load_cache_artifacts(path.read_bytes())
                log.info("compile cache: loaded %s", path)
            except Exception as e:  # another torch version's artifacts: compile from scratch instead
                log.warning("compile cache: %s could not be loaded (%s); compiling from scratch", path, e)

    def step_done(self, seconds: float) -> None:
        """After each training step: once FIRST + NEXT steps ran, time the compile and keep its code."""
        if self._before is None or len(self.step_seconds) >= FIRST + NEXT:  # an eager run: nothing to time
            return
        self.step_seconds.append(seconds)
        if len(self.step_seconds) == FIRST + NEXT:
            self._record()

    def _record(self) -> None:
        """What the first steps cost beyond plain steps, whether the disk caches hit, saved for the next plan."""
        stats = compile_stats(self._before)
        plain = statistics.median(self.step_seconds[FIRST:])
        seconds = max(sum(self.step_seconds[:FIRST]) - FIRST * plain, 0.0)
        hits, misses, bypassed = (stats.get(f"fxgraph_cache_{k}", 0) for k in ("hit", "miss", "bypass"))
        if not hits + misses + bypassed:  # inductor built nothing (auto fell back to eager, or another backend)
            return
        warm = hits > 0 and not misses and not bypassed
        self.result = {"compile_s": round(seconds, 1), "from_cache": warm, "step_s": round(plain, 4), **stats}
        log.info("compile: the first %d steps took %.1f s more than plain ones (%s: %d cache hits, %d misses)",
                 FIRST, seconds, "from the cache" if warm else "compiled", hits, misses)
        if bypassed:  # inductor judged these graphs uncacheable: every run compiles them again
            log.warning("compile cache: inductor did not cache %d of the UNet's graphs (TORCH_LOGS=+inductor "
                        "names why); later runs compile them again", bypassed)
        if self.folder is None or not self.main:
            return
        records = read_json(self.folder / RECORDS, {})
        record = records.setdefault(self.entry, {})
        record["warm_s" if warm else "cold_s"] = round(seconds, 1)
        record["last"] = {**self.result, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_json_atomic(self.folder / RECORDS, records)
        self.save_artifacts(stats)

    def save_artifacts(self, stats: dict[str, float] | None = None) -> None:
        """torch's portable cache artifacts of what this process compiled, one file per new set; nothing when
        everything came from the cache (its artifacts are already there). `stats`: compile_stats since open()."""
        if self.folder is None or not self.main or self._before is None:
            return
        stats = stats if stats is not None else compile_stats(self._before)
        if not stats.get("fxgraph_cache_miss", 0) + stats.get("autograd_cache_miss", 0):
            return
        saved = torch.compiler.save_cache_artifacts()
        if not saved:
            return
        data = saved[0]
        path = self.folder / "artifacts" / f"{hashlib.sha256(data).hexdigest()[:16]}.bin"
        if not path.exists():
            with atomic_file(path) as tmp:
                tmp.write_bytes(data)

    def close(self) -> None:
        """Keep what a short run compiled (it never reached _record) and give inductor its folder back."""
        try:
            if self.folder is not None and self.step_seconds and self.result is None:
                self.save_artifacts()
        finally:
            if self._set_dir:
                if self._previous_dir is None:
                    os.environ.pop(INDUCTOR_DIR, None)
                else:
                    os.environ[INDUCTOR_DIR] = self._previous_dir
                self._set_dir = False


def _torch_default(path: str) -> bool:
    """Whether TORCHINDUCTOR_CACHE_DIR holds torch's own default (inductor writes it there on first use)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    return os.path.abspath(path) == os.path.abspath(default_cache_dir())
