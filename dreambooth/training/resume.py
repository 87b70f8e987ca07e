"""Which checkpoint a run resumes from, checked against the run's settings before anything is written."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dreambooth.config.plan import RunPlan
from dreambooth.config.parse import flatten_config
from dreambooth.config.schema import NON_TRAINING_KEYS, Config
from dreambooth.errors import UserError
from dreambooth.training import checkpoint_ranks as ranks
from dreambooth.training import checkpoint_store as store

log = logging.getLogger(__name__)

STATE = "state.json"  # the checkpoint's shared state; its "settings" are compared here


def _settings(cfg: Config) -> dict[str, Any]:
    """A config's training-relevant keys, dotted and JSON-normalised (the keys the schema marks as not changing the
    math may differ on resume)."""
    return json.loads(json.dumps(flatten_config(cfg, NON_TRAINING_KEYS)))


def training_settings(plan: RunPlan) -> dict[str, Any]:
    """The run's training settings as checkpoints record them."""
    return _settings(plan.effective_config())


def default_settings() -> dict[str, Any]:
    """The training settings of a default config."""
    return _settings(Config())


def settings_differences(saved: dict, current: dict) -> list[str]:
    """'key: checkpoint value -> current value' for every training-relevant key that differs. A key the checkpoint
    lacks (written before the key existed) counts as its default, which is what that run trained with."""
    missing = object()
    defaults = default_settings()
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, defaults.get(key, missing)), current.get(key, missing)
        if a != b:
            shown = ["(unset)" if v is missing else repr(v) for v in (a, b)]
            out.append(f"{key}: {shown[0]} -> {shown[1]}")
    return out


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} cannot be read ({e}): resume from another one, "
                        "e.g. resume=latest") from None


def _resume_path(cfg: Config, out: Path) -> Path:
    """The checkpoint folder that cfg.resume names: `latest`, a step folder, or another run's output folder."""
    if cfg.resume.strip().lower() == "latest":
        path = store.newest_intact(out)  # damaged newer ones are skipped, each with a warning
        if path is None:
            damaged = " (every complete one is damaged: see the warnings above)" if store.list_checkpoints(out)[0] \
                else ""
            raise UserError(f"resume: latest found no intact checkpoint in {store.root_of(out)}{damaged}: "
                            "start without resume, or set resume to a checkpoint folder")
        return _unverified_note(path)
    path = Path(cfg.resume).expanduser()
    if path.is_dir() and not store.STEP_DIR.match(path.name) and (path / store.CHECKPOINTS).is_dir():
        found = store.newest_intact(path)  # an output folder: its newest intact checkpoint, verified just now
        if found is not None:
            return _unverified_note(found)
    if not path.is_dir() or not store.is_complete(path):
        raise UserError(f"resume: {path} is not a complete checkpoint folder (no {store.COMPLETE}): "
                        f"give a folder like {store.root_of(out)}/step-000100, or resume=latest")
    problem = store.damage(path)
    if problem:
        raise UserError(f"resume: checkpoint {path} is damaged ({problem}): resume from an earlier checkpoint, "
                        "or resume=latest to take the newest intact one")
    return _unverified_note(path)


def _unverified_note(path: Path) -> Path:
    if not store.is_verifiable(path):
        log.info("checkpoint %s records no checksums (written by an earlier version): its files could not be "
                 "verified", path)
    return path


def resolve_resume(plan: RunPlan, out: Path) -> Path | None:
    """The checkpoint to resume from, checked against the run before anything is written; None for a fresh run."""
    cfg = plan.config
    if cfg.resume is None:
        complete, _ = store.list_checkpoints(out)
        if complete:
            raise UserError(f"output_dir {out} holds checkpoints of an earlier run (newest {complete[-1][1].name}): "
                            f"set resume=latest to continue it, or delete {store.root_of(out)} to start over")
        return None
    path = _resume_path(cfg, out)
    state = read_state(path)
    diffs = settings_differences(state.get("settings", {}), training_settings(plan))
    if diffs and not cfg.resume_force:
        raise UserError(f"cannot resume from {path}: training settings differ from the checkpoint's "
                        f"({'; '.join(diffs)}): change them back, or set resume_force: true to resume anyway")
    if diffs:
        log.warning("resuming from %s despite changed settings (resume_force): %s", path, "; ".join(diffs))
    ranks.check_processes(path, state.get("num_processes"), plan.machine.processes, cfg)
    return path
