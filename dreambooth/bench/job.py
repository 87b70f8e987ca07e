"""`dreambooth bench --job`: JumpStart's example job end to end (load, class images, training with prior,
validation, save), each phase's wall time, share and peak memory; eager vs compiled side by side. JSON + table.
`--compile-proxy` adds what compiling costs, each compile in a new process: the full UNet vs its repeated blocks,
from an empty compile cache (cold), from the folder a cold compile filled (warm) and from its artifacts alone."""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dreambooth.bench.measure import device_label, device_model, read_peak, reset_peak, row_status, sync
from dreambooth.bench.table import names, show
from dreambooth.config.schema import config_from_dict
from dreambooth.demo import write_demo_dataset
from dreambooth.errors import UserError
from dreambooth.files import write_json_atomic
from dreambooth.models.load import forget_builtin
from dreambooth.training.compiling import compile_snapshot, compile_stats
from dreambooth.training.runlog import library_versions
from dreambooth.training.trainer import Trainer

log = logging.getLogger(__name__)

SCHEMA = "dreambooth-bench-job/1"
# The phases in the order a job runs them; training_steps is training less the validation inside it.
PHASES = ("plan", "class_images", "model_load", "setup", "training_steps", "validation", "save")
VARIANTS = {"eager": {"compile": False}, "full": {"compile": True, "compile_scope": "full"},
            "regional": {"compile": True, "compile_scope": "regional"}}


@dataclass
class JobOptions:
    model: str | None = None          # builtin:sd21 on CUDA, builtin:sd21/4 on CPU
    resolution: int | None = None     # 512 on CUDA, 128 on CPU
    steps: int | None = None          # training steps (400 on CUDA: the JumpStart guide's example; 5 on CPU)
    class_images: int | None = None   # num_class_images (100 on CUDA, 4 on CPU)
    variants: list[str] = field(default_factory=lambda: ["eager"])  # eager, full, regional
    validation: bool = True           # as the default config has it (on CPU: once, at the last step, 2 steps)
    compile_cache: str | None = None  # default: a new folder per variant, so each compiles from scratch
    compile_proxy: bool = False
    out: str | None = None
    workdir: str | None = None

    def resolved(self) -> "JobOptions":
        cuda = torch.cuda.is_available()
        o = copy.copy(self)
        o.model, o.resolution = device_model(o.model, o.resolution)
        o.steps = o.steps or (400 if cuda else 5)
        o.class_images = o.class_images or (100 if cuda else 4)
        bad = [v for v in o.variants if v not in VARIANTS]
        if bad or not o.variants:
            raise UserError(f"--compile must be a comma list of {', '.join(VARIANTS)} (got {','.join(o.variants)})")
        return o


def job_config(o: JobOptions, variant: str, subject: Path, root: Path):
    """JumpStart's example job: 5 photos of one subject, prior preservation, `steps` steps of batch 1, then save."""
    data = {"model": o.model, "output_dir": str(root / "out"),
            "data": {"dir": str(subject), "class_data_dir": str(root / "classes")},  # empty: sampled in the job
            "resolution": o.resolution, "max_steps": o.steps, "batch_size": 1, "with_prior_preservation": True,
            "num_class_images": o.class_images, "quiet": True, "seed": 0, **VARIANTS[variant],
            "compile_cache": o.compile_cache or str(root / "compile-cache")}
    if not o.validation:
        data["validation"] = {"enabled": False}
    elif not torch.cuda.is_available():  # the default steps (50, 100, ...) lie past a CPU run: once, small
        data["validation"] = {"steps": [o.steps], "num_inference_steps": 2, "prompts": ["a photo of sks toy"]}
    return config_from_dict(data, f"benchmark job {variant}")


def run_job(o: JobOptions, variant: str, subject: Path, root: Path) -> dict:
    """One whole job; each phase's seconds, share and peak memory. A failure is the row's status, not the end."""
    row = {"name": variant, "status": "ok", "reason": None}
    compiled_before = compile_snapshot()
    reset_peak()
    try:
        with row_status(row, f"job {variant}"):
            _time_job(o, job_config(o, variant, subject, root), row, compiled_before)
    finally:  # the trainer is gone by now: hand its memory and compiled graphs back before the next variant
        forget_builtin()
        import torch._dynamo
        torch._dynamo.reset()
        reset_peak()
    return row


def _time_job(o: JobOptions, cfg, row: dict, compiled_before: dict) -> None:
    """Plan, set up, train and save one run, filling `row` with its phases; the trainer is closed on any exit."""
    start = time.perf_counter()
    trainer = Trainer(cfg)
    plan_s = time.perf_counter() - start
    try:
        phases = trainer.phases
        phases.before, phases.after = (lambda: (sync(), reset_peak())), (lambda: (sync(), read_peak())[1])
        trainer.setup()
        error = None
        try:
            with phases("training"):
                summary = trainer.train()
            with phases("save"):
                trainer.save(summary)
        except BaseException as e:
            error = e
            raise
        finally:
            trainer.runlog.close(error)
        seconds = dict(phases.seconds, plan=plan_s)
        seconds["training_steps"] = seconds.pop("training") - seconds.get("validation", 0.0)
        total = sum(seconds.values())
        peaks = dict(phases.peaks, training_steps=phases.peaks.get("training", {}))
        row["phases"] = {p: {"s": round(seconds[p], 3), "share": round(seconds[p] / total, 4),
                             "peak_memory": peaks.get(p)} for p in PHASES if p in seconds}
        row["total_s"] = round(total, 3)
        row["peak_memory"] = {k: max(p.get(k) or 0 for p in phases.peaks.values()) for k in read_peak()}
        row["s_per_step"] = round(seconds["training_steps"] / o.steps, 4)  # compile time included
        row["final_loss"] = summary.get("final_loss", trainer.state.losses[-1] if trainer.state.losses else None)
        row["compile"] = {"on": trainer.plan.compile, "mode": trainer.plan.compile_mode,
                          "scope": trainer.plan.compile_scope, **summary.get("compile", {})}
        if trainer.plan.compile:
            row["compile_stats"] = compile_stats(compiled_before)
    finally:
        trainer.close()


def run_job_bench(options: JobOptions) -> dict:
    """Every variant of the job in this process, one after another; then the compile proxy if asked."""
    o = options.resolved()
    cuda = torch.cuda.is_available()
    result = {"schema": SCHEMA, "device": device_label(), "device_type": "cuda" if cuda else "cpu",
              "model": o.model, "resolution": o.resolution, "steps": o.steps, "num_class_images": o.class_images,
              "prior": True, "validation": o.validation, "versions": library_versions(), "complete": False}
    tmp = tempfile.TemporaryDirectory(prefix="dreambooth-job-") if o.workdir is None else None
    workdir = Path(o.workdir or tmp.name)
    started = time.time()
    try:
        subject = write_demo_dataset(workdir / "subject", n=5, size=o.resolution)
        result["rows"] = []
        for variant in o.variants:
            log.info("benchmark job: %s", variant)
            result["rows"].append(run_job(o, variant, subject, workdir / variant))
            if o.out:  # partial results survive a timeout
                write_json_atomic(o.out, result)
        if o.compile_proxy:
            from dreambooth.bench.compile_proxy import compile_proxy
            result["compile_proxy"] = compile_proxy()
    finally:
        if tmp is not None:
            tmp.cleanup()
    result["wall_s"] = round(time.time() - started, 1)
    result["complete"] = True
    if o.out:
        write_json_atomic(o.out, result)
    return result


def format_job_table(r: dict) -> str:
    """Markdown: one column of seconds (and share) per variant, a row per phase."""
    rows = r["rows"]
    lines = [f"device: {r['device']} | model: {r['model']} | {r['resolution']} px | {r['steps']} steps, prior on, "
             f"{r['num_class_images']} class images, validation {'on' if r['validation'] else 'off'}", "",
             "| phase | " + " | ".join(f"{x['name']} s (share)" for x in rows) + " |",
             "|---|" + "---|" * len(rows)]
    ok = [x for x in rows if x["status"] == "ok"]
    for p in PHASES:
        cells = [f"{x['phases'][p]['s']:.2f} ({x['phases'][p]['share']:.0%})" if x["status"] == "ok" and
                 p in x["phases"] else "-" for x in rows]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{x['total_s']:.2f}**" if x["status"] == "ok" else
                                              f"{x['status']}: {x['reason'][:60]}" for x in rows) + " |")
    mem = "cuda_max_allocated_bytes" if r["device_type"] == "cuda" else "cpu_peak_rss_bytes"
    lines.append(f"| peak {'GPU alloc' if r['device_type'] == 'cuda' else 'RSS'} GiB | " + " | ".join(
        f"{x['peak_memory'][mem] / 2**30:.2f}" if x["status"] == "ok" else "-" for x in rows) + " |")
    if ok:
        lines.append("| s/step (training) | " + " | ".join(f"{x['s_per_step']:.3f}" if x["status"] == "ok" else "-"
                                                       for x in rows) + " |")
        lines.append("| compile s (first steps less plain ones) | " + " | ".join(_compile_cell(x) for x in rows) + " |")
    proxy = r.get("compile_proxy")
    if proxy and proxy.get("status") == "ok":
        lines += ["", f"compile proxy ({proxy['model']}, {proxy['resolution']} px, {proxy['backend']}, each in a new "
                  "process; first forward + backward less an eager one):"]
        lines.append(", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s"
                               for k, v in proxy["seconds"].items()))
        lines.append(", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in proxy["ratios"].items()))
    elif proxy:
        lines += ["", f"compile proxy: {proxy.get('status')}: {proxy.get('reason')}"]
    return "\n".join(lines)


def _compile_cell(row: dict) -> str:
    c = row.get("compile") or {}
    if row["status"] != "ok" or "compile_s" not in c:
        return "-"
    return f"{c['compile_s']:.1f} ({'from the cache' if c['from_cache'] else 'compiled'})"


def job_from_args(args) -> int:
    options = JobOptions(model=args.model, resolution=args.resolution, steps=args.steps,
                         class_images=args.class_images, variants=names(args.compile),
                         validation=not args.no_validation, compile_cache=args.compile_cache,
                         compile_proxy=args.compile_proxy, out=args.out,
                         workdir=args.workdir)
    return show(format_job_table(run_job_bench(options)), args.table, args.out)
