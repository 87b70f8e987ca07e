"""Benchmark: the real Trainer on the SD 2.1 base architecture (random weights, no download) for a baseline and
each memory profile, with and without prior preservation; plus class-image sampling throughput. JSON + table."""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dreambooth.bench.measure import (bf16_matmul_peak_tflops, count_unet_flops, device_label, device_model,
                                      read_peak, reset_peak, row_status, status_bytes, sync)
from dreambooth.bench.profile import profile_steps
from dreambooth.bench.table import COMPILED, ROWS, finish_rows, format_table, names, show
from dreambooth.config.parse import apply_override
from dreambooth.config.schema import Config, config_from_dict
from dreambooth.data.class_images import default_batch_size, load_sampler, sampling_steps
from dreambooth.demo import write_demo_dataset
from dreambooth.errors import UserError
from dreambooth.files import write_json_atomic
from dreambooth.models.load import build_builtin_sd21, builtin_sd21_scale, forget_builtin, load_components
from dreambooth.models.pipeline import set_scheduler
from dreambooth.training.compiling import compile_snapshot, compile_stats
from dreambooth.training.runlog import library_versions
from dreambooth.training.trainer import Trainer

log = logging.getLogger(__name__)

SCHEMA = "dreambooth-bench/1"
# What diffusers' train_dreambooth.py does: VAE and text encoder every step, fp32 weights, AdamW, checkpointing.
BASELINE = {"memory_profile": "default", "cache_latents": False, "cache_prompts": False, "optimizer": "adamw",
            "gradient_checkpointing": True, "prior_mode": "concat", "compile": False}
FLOPS_NOTE = ("model FLOPs = UNet forward + backward of one step's images (torch.utils.flop_counter, counted once, "
              "no recomputation); VAE/text encoding and checkpoint recomputation are overhead, so MFU compares "
              "useful work across rows")


@dataclass
class BenchOptions:
    model: str | None = None         # builtin:sd21 on CUDA, builtin:sd21/4 on CPU
    resolution: int | None = None    # 512 on CUDA, 128 on CPU
    steps: int | None = None         # timed steps per row (median reported)
    warmup: int | None = None        # untimed steps first
    repeats: int | None = None       # passes over the whole matrix, interleaved (noise on a shared CPU)
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    prior: str = "both"              # on, off or both
    profile: list[str] = field(default_factory=list)  # rows whose steps are also profiled (bench_profile.py)
    sampling: bool = True
    out: str | None = None           # JSON path
    workdir: str | None = None
    quiet: bool = True

    def resolved(self) -> "BenchOptions":
        cuda = torch.cuda.is_available()
        o = copy.copy(self)
        o.model, o.resolution = device_model(o.model, o.resolution)
        o.steps = o.steps or (10 if cuda else 4)
        o.warmup = o.warmup if o.warmup is not None else (3 if cuda else 1)
        o.repeats = o.repeats or (1 if cuda else 2)
        if cuda and o.rows == list(ROWS):  # on CPU, compiling says nothing about a GPU and takes minutes
            o.rows = [*ROWS[:2], COMPILED, *ROWS[2:]]
        if o.prior not in ("on", "off", "both"):
            raise UserError(f"--prior must be on, off or both (got {o.prior})")
        return o


# --------------------------------------------------------------------------------------------- one row

def _write_data(root: Path, resolution: int) -> tuple[Path, Path]:
    """A subject folder of 4:3 photos (so random crops differ, as with real photos) and square class images."""
    from PIL import Image

    subject = write_demo_dataset(root / "subject", n=4, size=resolution)
    for path in subject.glob("*.png"):
        Image.open(path).resize((resolution * 4 // 3, resolution)).save(path)
    classes = write_demo_dataset(root / "classes", n=4, size=resolution, seed=1)
    (classes / "dataset_info.json").unlink()
    return subject, classes


def row_config(name: str, prior: bool, o: BenchOptions, subject: Path, classes: Path, out: Path):
    """A row is a profile (or baseline, lora), optionally with `+key=value` config overrides; `+key` means true."""
    profile, *extras = name.split("+")
    data = {"model": o.model, "output_dir": str(out), "data": {"dir": str(subject), "class_data_dir": str(classes)},
            "resolution": o.resolution, "max_steps": o.warmup + o.steps, "batch_size": 1,
            "with_prior_preservation": prior, "num_class_images": 4, "validation": {"enabled": False},
            "quiet": o.quiet, "seed": 0,
            "compile_cache": str(out / "compile-cache")}  # a compiled row compiles from scratch (+compile_cache=DIR)
    if profile == "baseline":
        data.update(BASELINE)
    elif profile == "lora":
        data.update(finetune="lora", memory_profile="default")
    else:
        data["memory_profile"] = profile
    for extra in extras:
        apply_override(data, extra if "=" in extra else f"{extra}=true")
    return config_from_dict(data, f"benchmark row {name}")


def _measure(name: str, prior: bool, o: BenchOptions, cfg, row: dict) -> None:
    """Set up the trainer, run warm-up and timed steps, fill in `row`; everything it made dies on return."""
    rss_start = status_bytes("VmRSS")  # the process's own footprint (prebuilt model, libraries) before the row
    compiled_before = compile_snapshot()
    start = time.perf_counter()
    trainer = Trainer(cfg).setup()
    try:
        sync()
        row["setup_s"] = round(time.perf_counter() - start, 3)
        batches, times = trainer.batches(), []
        step = lambda: trainer.step.run(batches, trainer.state)  # noqa: E731 (one step, outside the loop)
        for _ in range(o.warmup + o.steps):
            sync()
            t0 = time.perf_counter()
            logs = step()
            sync()
            times.append(time.perf_counter() - t0)
        row["peak_memory"] = {**read_peak(), "cpu_rss_at_start_bytes": rss_start}
        row["warmup_s"] = round(sum(times[:o.warmup]), 3)  # torch.compile's compilation shows up here
        row["warmup_step_times_s"] = [round(t, 5) for t in times[:o.warmup]]
        plan = trainer.plan
        if plan.compile:
            row["compile_stats"] = compile_stats(compiled_before)  # phases and disk-cache hits of this row
        row["step_times_s"] = [round(t, 5) for t in times[o.warmup:]]
        row["s_per_step"] = statistics.median(times[o.warmup:])
        row["images_per_step"] = cfg.batch_size * cfg.gradient_accumulation_steps * (2 if prior else 1)
        row["images_per_s"] = row["images_per_step"] / row["s_per_step"]
        row["final_loss"] = logs["loss"]
        if trainer.ema is not None:  # the size of the average's fp32 copy, beside the measured peaks
            row["ema_copy_bytes"] = sum(t.numel() * t.element_size() for t in trainer.ema.shadow)
        row["settings"] = {"memory": plan.memory.describe(), "mixed_precision": plan.precision,
                           "optimizer": plan.optimizer, "gradient_checkpointing": plan.gradient_checkpointing,
                           "prior_mode": plan.prior_mode, "latents_cached": trainer.inputs.latent_cache is not None,
                           "prompts_cached": bool(trainer.inputs.text_cache), "finetune": cfg.finetune,
                           "compile": plan.compile and plan.compile_mode,
                           "ema": cfg.ema and ("host memory" if plan.ema_on_cpu else "device")}
        if name in o.profile:  # after the measured steps, so the profiler's overhead never enters them
            row["profile"] = profile_steps(step)
    finally:
        trainer.runlog.close(None)


def run_row(name: str, prior: bool, o: BenchOptions, subject: Path, classes: Path, workdir: Path) -> dict:
    """One cell of the matrix; a failure becomes the row's status (skipped, oom, error), never the bench's end."""
    row = {"name": name, "prior": prior, "status": "ok", "reason": None}
    cfg = None
    with row_status(row, f"row {name}"):
        cfg = row_config(name, prior, o, subject, classes, workdir / f"{name}-{'prior' if prior else 'plain'}")
        row["cpu_peak_is_per_row"] = reset_peak()
        _measure(name, prior, o, cfg, row)
    # As the trainer resolved it (compile: auto may compile a row not named +compile): compiled graphs and their
    # CUDA-graph memory pools would outlive the row.
    if cfg is not None and cfg.compile is not False:
        import torch._dynamo
        torch._dynamo.reset()
    reset_peak()  # the trainer is gone by now: hand its memory back before the next row
    return row


# --------------------------------------------------------------------------------------------- sampling

def sampling_throughput(o: BenchOptions, subject: Path, workdir: Path) -> dict:
    """Class-image sampling: our settings (class_sampler, its steps, default batch) vs PNDM 50 steps batch 1."""
    cfg = config_from_dict({"model": o.model, "data": {"dir": str(subject)}, "output_dir": str(workdir / "s"),
                            "resolution": o.resolution})
    pipe = load_sampler(cfg)
    ours = {"scheduler": cfg.class_sampler, "steps": sampling_steps(cfg), "batch": default_batch_size()}
    pndm = {"scheduler": "pndm", "steps": 50, "batch": 1}
    out = {}
    try:
        for key, s in (("ours", ours), ("pndm50_batch1", pndm)):
            set_scheduler(pipe, s["scheduler"])

            def sample(steps):
                with torch.inference_mode():
                    pipe(prompt=["a photo of a toy"] * s["batch"], height=o.resolution, width=o.resolution,
                         num_inference_steps=steps, guidance_scale=7.5,
                         generator=torch.Generator(pipe.device).manual_seed(0))
            sample(2)  # warm-up: kernels, allocator
            sync()
            start = time.perf_counter()
            sample(s["steps"])
            sync()
            seconds = time.perf_counter() - start
            out[key] = {**s, "seconds": round(seconds, 4), "images_per_s": s["batch"] / seconds}
    finally:
        del pipe
        reset_peak()
    out["speedup"] = out["ours"]["images_per_s"] / out["pndm50_batch1"]["images_per_s"]
    return out


# --------------------------------------------------------------------------------------------- the run

def _describe_model(o: BenchOptions) -> tuple[str, bool]:
    if o.model.startswith("builtin:sd21"):
        scale = builtin_sd21_scale(o.model)
        note = "SD 2.1 base architecture, random weights" + ("" if scale == 1 else f", channel widths x{scale:g}")
        return note, scale < 1 or o.resolution < 512
    if o.model == "builtin:tiny":
        return "tiny SD 2.1-shaped test model, random weights", True
    return f"{o.model}", o.resolution < 512


def run_bench(options: BenchOptions) -> dict:
    """Run the matrix and return the results (also written to options.out as JSON when set)."""
    o = options.resolved()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    note, scaled = _describe_model(o)
    started = time.time()
    result = {
        "schema": SCHEMA, "device": device_label(), "device_type": device.type, "model": o.model, "model_note": note,
        "resolution": o.resolution, "scaled_down": scaled,
        "scaled_note": ("scaled down from SD 2.1 base at 512 px for this device: numbers are not GPU numbers"
                        if scaled else "full SD 2.1 base at 512 px"),
        "batch": "1 instance (+1 class with prior)", "warmup_steps": o.warmup, "timed_steps": o.steps,
        "repeats": o.repeats,
        "statistic": "median", "flops_note": FLOPS_NOTE, "complete": False,
        "versions": library_versions(),
    }
    tmp = tempfile.TemporaryDirectory(prefix="dreambooth-bench-") if o.workdir is None else None
    workdir = Path(o.workdir or tmp.name)
    try:
        subject, classes = _write_data(workdir / "data", o.resolution)
        result["bf16_matmul_peak_tflops"] = bf16_matmul_peak_tflops(device)
        # A copy to count FLOPs on (it is discarded); a builtin model is built once here and copied for every row.
        parts = (build_builtin_sd21(o.model, remember=True) if o.model.startswith("builtin:sd21")
                 else load_components(Config(model=o.model)))
        vae_scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        priors = {"on": [True], "off": [False], "both": [True, False]}[o.prior]  # the targets have prior on
        result["model_flops_per_step"] = {
            ("prior" if p else "no_prior"): count_unet_flops(parts.unet, 2 if p else 1, o.resolution, vae_scale,
                                                             device, torch.float16 if cuda else None)
            for p in priors}
        del parts
        runs: dict[tuple[str, bool], list[dict]] = {}
        for r in range(o.repeats):  # each pass runs every row once, so slow spells of a shared machine spread out
            for name in o.rows:
                for prior in priors:
                    log.info("benchmark row %s%s (pass %d/%d)", name, " + prior" if prior else "", r + 1, o.repeats)
                    runs.setdefault((name, prior), []).append(run_row(name, prior, o, subject, classes, workdir))
                    finish_rows(result, runs)
                    _write(result, o.out)  # partial results survive a timeout
        if o.sampling:
            try:
                result["sampling"] = sampling_throughput(o, subject, workdir)
            except Exception as e:
                log.exception("sampling benchmark failed")
                result["sampling"] = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
    finally:
        forget_builtin()
        if tmp is not None:
            tmp.cleanup()
    result["wall_s"] = round(time.time() - started, 1)
    result["complete"] = True
    _write(result, o.out)
    return result


def _write(result: dict, out: str | None) -> None:
    if out:
        write_json_atomic(out, result)  # rewritten after every row: never half a file


def bench_from_args(args) -> int:
    options = BenchOptions(model=args.model, resolution=args.resolution, steps=args.steps, warmup=args.warmup,
                           repeats=args.repeats,
                           rows=names(args.rows), profile=names(args.profile), prior=args.prior,
                           sampling=not args.no_sampling, out=args.out, workdir=args.workdir)
    return show(format_table(run_bench(options)), args.table, args.out)

