"""A sweep's trials as plain data: the grid's product x the subjects, each a complete, validated run config with its
own folder inside the sweep folder. No Ray here: the driver hands these to Ray Tune, the tests check them alone."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dreambooth.config.parse import flatten_config, read_with_overrides, set_key
from dreambooth.config.schema import NON_TRAINING_KEYS, Config, config_from_dict
from dreambooth.errors import UserError

DEFAULT_CHECKPOINT_STEPS = 100  # a lost trial redoes at most this many steps when checkpoint_steps is unset
# Keys the sweep sets itself, with the reason a user cannot.
RESERVED = {"output_dir": "it is the sweep folder; each trial gets its own folder inside it",
            "resume": "the sweep resumes each unfinished trial from its own latest checkpoint"}
SUBJECT_KEYS = {"data.dir": "give subject folders with --subjects", "subjects": "give subject folders with --subjects"}


@dataclass(frozen=True)
class Trial:
    """One run of the sweep: its folder name, what it varies (grid keys as given, and `subject`), its config."""
    name: str
    dir: str  # absolute, so a worker in any working directory (Tune moves them) writes to the same place
    settings: dict
    data: dict  # the run's complete config, as config_from_dict takes it

    def config(self) -> Config:
        return config_from_dict(copy.deepcopy(self.data), f"trial {self.name}")


def parse_grid(items: list[str]) -> dict[str, list]:
    """`--grid KEY=[v1,v2]` (YAML list) or `KEY=v1,v2` items as {dotted key: [values]}, in the order given."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise UserError(f"--grid {item}: write KEY=[v1,v2,...], e.g. --grid learning_rate=[1e-6,2e-6]")
        try:
            values = yaml.safe_load(raw) if raw.strip().startswith("[") else [yaml.safe_load(v) for v in raw.split(",")]
        except yaml.YAMLError as e:
            raise UserError(f"--grid {item}: the values are not a valid list ({str(e).splitlines()[0]})") from None
        if not isinstance(values, list) or not values:
            raise UserError(f"--grid {item}: give at least one value, e.g. --grid {key}=[v1,v2]")
        if key in grid:
            raise UserError(f"--grid {key} is given twice: put all its values in one list")
        if key in RESERVED or key in SUBJECT_KEYS:
            raise UserError(f"--grid {key}: not a sweep key ({RESERVED.get(key) or SUBJECT_KEYS[key]})")
        if len(set(map(_text, values))) < len(values):
            raise UserError(f"--grid {item}: a value is listed twice")
        grid[key] = values
    return grid


def read_base(config: str | None, overrides: list[str]) -> tuple[dict, dict[str, str]]:
    """The sweep's base config as a plain dict (file, then key=value overrides) and which override set which key."""
    data, set_by = read_with_overrides(config, overrides)
    if data.get("resume") is not None:
        raise UserError(f"{set_by.get('resume') or config}: remove 'resume' ({RESERVED['resume']})")
    return data, set_by


def find_subjects(dirs: list[str]) -> list[Path]:
    """Subject folders: each DIR holding images is one; a DIR without images stands for its subfolders that have."""
    from dreambooth.data.dataset import IMAGE_EXTENSIONS  # imports torch: only when subjects are given

    def has_images(folder: Path) -> bool:
        return any(p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") for p in folder.iterdir())

    found: list[Path] = []
    for d in dirs:
        folder = Path(d).expanduser()
        if not folder.is_dir():
            raise UserError(f"--subjects {d}: no such folder; give subject folders (images + dataset_info.json) or "
                            "a folder of them")
        inner = [] if has_images(folder) else [p for p in sorted(folder.iterdir()) if p.is_dir() and has_images(p)]
        if not has_images(folder) and not inner:
            raise UserError(f"--subjects {d}: holds no images and no subfolders with images")
        found += [p.resolve() for p in inner or [folder]]
    if len(set(found)) < len(found):
        raise UserError("--subjects names a subject folder twice")
    return found


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def trial_name(settings: dict) -> str:
    """A folder name from what the trial varies, e.g. `cat,learning_rate-1e-6,max_steps-50` (`trial` if nothing).
    No '=': `dreambooth train FOLDER/config.yaml` would read a path with one as a key=value override."""
    parts = [str(v) if k == "subject" else f"{k}-{_text(v)}" for k, v in settings.items()]
    name = re.sub(r"[^A-Za-z0-9._,+-]", "_", ",".join(parts)) or "trial"
    name = "_" + name if name.startswith(".") else name
    if len(name) > 100:  # keep paths workable; the full settings are in sweep.json and the trial's config.yaml
        name = name[:80] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def _absolute(data: dict, cwd: Path) -> None:
    """Relative folders made absolute against the command's working directory (Tune starts trials elsewhere)."""
    def fix(node: dict, key: str, always: bool = True) -> None:
        value = node.get(key)
        if isinstance(value, str) and value.strip() and not Path(value).expanduser().is_absolute():
            path = cwd / Path(value).expanduser()
            if always or path.exists():  # `model` may be a hub id or builtin:..., not a path
                node[key] = str(path)
    fix(data, "output_dir")
    fix(data, "model", always=False)
    for section in [data.get("data")] + list(data.get("subjects") or []):
        if isinstance(section, dict):
            fix(section, "dir")
            fix(section, "class_data_dir")


def expand(base: dict, grid: dict[str, list], subjects: list[Path] | None = None, *, set_by: dict | None = None,
           source: str = "config", checkpoint_steps: int | None = None, cwd: Path | None = None) -> list[Trial]:
    """Every trial of the sweep, each config checked: the subjects (outer) x the grid's product (inner)."""
    base = copy.deepcopy(base)
    if subjects:
        given = {"subjects": base.get("subjects"), "data.dir": (base.get("data") or {}).get("dir")}
        for key in [k for k, v in given.items() if v]:
            raise UserError(f"{(set_by or {}).get(key) or source}: remove '{key}' when --subjects is given "
                            "(each trial trains one subject)")
    _absolute(base, (cwd or Path.cwd()).resolve())
    sweep_dir = Path(base.get("output_dir") or "output")
    names = _subject_names(subjects) if subjects else {}
    set_by = dict(set_by or {})
    for key, values in grid.items():
        set_by[key] = f"--grid {key}=[{','.join(_text(v) for v in values)}]"
    trials, seen = [], set()
    for subject in subjects or [None]:
        for values in itertools.product(*grid.values()):
            settings = ({"subject": names[subject]} if subject else {}) | dict(zip(grid, values))
            data = copy.deepcopy(base)
            for key, value in zip(grid, values):
                set_key(data, key, value)
            if subject:
                data["data"] = {**(data.get("data") or {}), "dir": str(subject)}
            name = trial_name(settings)
            while name in seen:
                name += "+"
            seen.add(name)
            data["output_dir"] = str(sweep_dir / name)
            data["quiet"] = True  # several trials' bars would interleave; each trial's train.log has its progress
            if data.get("checkpoint_steps") is None:
                data["checkpoint_steps"] = checkpoint_steps or DEFAULT_CHECKPOINT_STEPS
            config_from_dict(copy.deepcopy(data), source, set_by)  # every trial refuses now, before Ray starts
            trials.append(Trial(name, data["output_dir"], settings, data))
    return trials


def _subject_names(subjects: list[Path]) -> dict[Path, str]:
    names: dict[Path, str] = {}
    for s in subjects:
        name = s.name
        while name in names.values():
            name += "+"
        names[s] = name
    return names


def training_differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every training key where two trial configs differ (the keys that change the math)."""
    try:
        a = flatten_config(config_from_dict(copy.deepcopy(old)), NON_TRAINING_KEYS)
    except UserError as e:  # written by another version of this tool
        return [f"its recorded config no longer loads ({e})"]
    b = flatten_config(config_from_dict(copy.deepcopy(new)), NON_TRAINING_KEYS)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def class_image_jobs(trials: list[Trial]) -> list[Trial]:
    """With prior preservation, one trial per distinct set of subject folders (the one wanting the most class
    images), to top up the class images before the trials start, so no two trials sample into one folder at once."""
    jobs: dict[str, tuple[int, Trial]] = {}
    for t in trials:
        cfg = t.config()
        if not cfg.with_prior_preservation:
            continue
        folders = [(s.dir, s.class_data_dir) for s in cfg.subjects] or [(cfg.data.dir, cfg.data.class_data_dir)]
        key = json.dumps(folders)
        wanted = max([cfg.num_class_images] + [s.num_class_images or 0 for s in cfg.subjects])
        if key not in jobs or wanted > jobs[key][0]:
            jobs[key] = (wanted, t)
    return [t for _, t in jobs.values()]


def command_line(argv: list[str]) -> str:
    """The command as the user could type it again (to resume a sweep)."""
    return "dreambooth " + " ".join(shlex.quote(a) for a in argv)

