"""`dreambooth export RUN --step best|N`: the model of one validated step, from the checkpoint that
validation.keep_checkpoints kept, written as a run of that many steps that resumes there and runs none."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dreambooth.config.schema import load_config
from dreambooth.errors import UserError
from dreambooth.training import checkpoint_store as store


def recommended_step(run: Path) -> int:
    """The step the run recommended (validation/index.json, else train_summary.json)."""
    for path, read in ((run / "validation" / "index.json", lambda d: (d.get("recommended") or {}).get("step")),
                       (run / "train_summary.json", lambda d: d.get("recommended_step"))):
        try:
            step = read(json.loads(path.read_text()))
        except (OSError, ValueError, AttributeError):
            continue
        if step is not None:
            return int(step)
    raise UserError(f"{run} names no recommended step: it needs validation.metrics with dino and clip_t "
                    "(docs/evaluate.md); or pass a validated step number, --step N")


def pick_step(run: Path, step: str | int) -> int:
    """`best` (the recommended step) or a step number."""
    if str(step).strip().lower() == "best":
        return recommended_step(run)
    try:
        return int(step)
    except ValueError:
        raise UserError(f"--step {step}: give best or a step number, e.g. --step 400") from None


def export_step(run: str | Path, step: str | int, out: str | Path | None = None, fmt: str | None = None,
                half: bool = False) -> Path:
    """Write the model of `step` into `out` (default RUN/step-N) as the run would have at that step, plus
    `fmt` (single-file or kohya) when given; returns the folder."""
    from dreambooth.training.trainer import run_training  # torch, diffusers: only once the arguments are good
    run = Path(run).expanduser()
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a training run's output folder (no config.yaml): --step exports a step of "
                        "a run")
    n = pick_step(run, step)
    checkpoint = store.root_of(run) / f"step-{n:06d}"
    if not store.is_complete(checkpoint):
        kept = sorted(s for s, _ in store.list_checkpoints(run)[0])
        have = f" (kept: {', '.join(map(str, kept))})" if kept else ""
        raise UserError(f"no complete checkpoint of step {n} in {store.root_of(run)}{have}: train with "
                        "validation.keep_checkpoints: true to keep one at every validated step")
    out = Path(out).expanduser() if out else run / f"step-{n}"
    cfg = load_config(run / "config.yaml", [
        f"resume={checkpoint}", f"max_steps={n}", "resume_force=true", f"output_dir={out}",
        "validation.enabled=false", "validation.metrics=[]", "log_with=null", "checkpoint_steps=null"])
    resume_log = logging.getLogger("dreambooth.training.resume")
    level = resume_log.level
    resume_log.setLevel(logging.ERROR)  # its warning that max_steps differs from the checkpoint's is the point here
    try:
        run_training(cfg)
    finally:
        resume_log.setLevel(level)
    if fmt:
        from dreambooth.export.formats import export_model
        export_model(out, fmt, half=half)
    return out
