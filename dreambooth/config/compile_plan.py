"""Whether a run compiles the UNet, how, and where its compiled code is kept between runs (the compile cache).

The cache is one folder per base model, precision, torch version and device under `compile_cache`, holding
inductor's disk cache, torch's portable cache artifacts and what each compile cost on this machine. Correctness
never rests on that key: inductor and AOTAutograd key every entry by the graph itself, so the folder only groups
compiles that can reuse one another. Torch-free, so planning stays light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

from dreambooth.config.machine import Machine
from dreambooth.config.profiles import MemoryPlan
from dreambooth.config.schema import Config
from dreambooth.errors import UserError
from dreambooth.files import can_write, nearest_existing, read_json, slug

log = logging.getLogger(__name__)

# Measured on the H200 (2026-11-26, SD 2.1 base at 512 px, default profile, prior on): compiling with CUDA graphs
# took 118-135 s from an empty cache and made each step 0.17 s shorter (0.266 -> 0.098 s), so a compile repays
# itself after compile seconds / 0.17 steps: 700 from an empty cache (118 / 0.17, rounded up).
STEP_SAVING_S = 0.17
PAYBACK_STEPS = 700
# A compile this machine already keeps in its cache, until a run has timed one here: on the 2-core CPU a second
# process spent 0.057 of the cold compile of the full UNet (docs/memory-and-speed.md). A tenth, to be safe; the
# first compile from the cache times itself, and later plans use that time.
WARM_GUESS = 0.1
FROM_SCRATCH = "a compile from scratch takes about 2 minutes"
RECORDS = "compiles.json"  # in each cache folder: {entry: {"cold_s", "warm_s", "last": {...}}}


def cache_root(setting: str | None) -> Path | None:
    """The folder `compile_cache` names; auto: $DREAMBOOTH_CACHE/compile, else ~/.cache/dreambooth/compile
    ($XDG_CACHE_HOME honoured); None where compiled code is not kept (inductor's own /tmp cache only)."""
    if setting is None:
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    base = os.environ.get("DREAMBOOTH_CACHE")
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dreambooth"
    return Path(base).expanduser() / "compile"


def cache_folder(cfg: Config, precision: str, machine: Machine) -> Path | None:
    """This run's folder under the cache root: one per base model (and revision), precision, torch and device."""
    root = cache_root(cfg.compile_cache)
    if root is None:
        return None
    model = cfg.model
    if Path(model).expanduser().exists():  # a local folder or file: the same path on this machine
        model = str(Path(model).expanduser().resolve())
    key = {"model": model, "revision": cfg.revision, "precision": precision, "torch": machine.torch_version,
           "device": machine.device_name}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return root / f"{slug(Path(model).name, 32)}-{slug(machine.device_name, 24)}-{digest}"


def usable(cfg: Config, folder: Path | None) -> Path | None:
    """The cache folder of a run that compiles, if this user can write it: an explicit compile_cache that cannot
    be written is refused; auto's default then goes without (inductor's temporary cache), with a warning."""
    if folder is None:
        return None
    parent = nearest_existing(folder)
    if parent.is_dir() and can_write(parent):
        return folder
    if cfg.compile_cache != "auto":
        raise UserError(f"compile_cache: {folder.parent} is not a folder this user can write: name another one, "
                        "or set compile_cache: null")
    log.warning("compile_cache: auto would keep compiled code in %s, which this user cannot write; it stays in "
                "inductor's temporary cache", folder.parent)
    return None


def entry_name(cfg: Config, scope: str, mode: str, prior_joined: bool, checkpointing: bool) -> str:
    """What makes one compile of this model differ from another: the graph's kind and the batch's shape."""
    batch = f"{cfg.batch_size}+{cfg.batch_size}" if prior_joined else str(cfg.batch_size)
    return (f"{cfg.finetune} {scope} {mode} {cfg.resolution}px batch {batch}"
            + (" checkpointed" if checkpointing else ""))


def expected_compile(folder: Path | None, entry: str) -> tuple[float | None, str]:
    """Seconds this run's compile should cost on this machine (None: a compile from scratch), and where that
    figure comes from."""
    record = read_json(folder / RECORDS, {}).get(entry) if folder is not None else None
    if record and record.get("warm_s") is not None:
        return record["warm_s"], f"a compile from this machine's cache took {record['warm_s']:.0f} s"
    if record and record.get("cold_s") is not None:
        guess = record["cold_s"] * WARM_GUESS
        return guess, f"this machine keeps its compile: assumed a tenth of its first {record['cold_s']:.0f} s"
    return None, FROM_SCRATCH


def payback_steps(compile_s: float | None) -> int:
    """Steps after which a compile of `compile_s` seconds (None: from scratch) has repaid itself."""
    return PAYBACK_STEPS if compile_s is None else min(PAYBACK_STEPS, max(1, math.ceil(compile_s / STEP_SAVING_S)))


def why_not_compile(cfg: Config, memory: MemoryPlan, total_steps: int, machine: Machine,
                    expected: tuple[float | None, str] = (None, FROM_SCRATCH)) -> str | None:
    """Why `compile: auto` leaves this run eager, or None when it compiles (with CUDA graphs)."""
    if not machine.cuda:
        return "no CUDA GPU"
    if machine.processes > 1:
        return "several processes"
    if cfg.finetune != "full" or cfg.train_text_encoder:
        return "only the full UNet fine-tune with a frozen text encoder is measured with CUDA graphs"
    if memory.fused_backward or memory.master_weights != "fp32":
        return f"memory_profile {memory.profile}: a compiled backward holds every gradient at once"
    if memory.backwards_per_step > 1:
        return "several backward passes per step"
    if cfg.buckets:
        return "buckets: batch shapes vary, and CUDA graphs would be recorded for each"
    if not machine.triton:
        return "Triton is not installed"
    payback = payback_steps(expected[0])
    if total_steps < payback:
        return f"{total_steps} steps, under the {payback} that repay compiling ({expected[1]})"
    return None


def decide_compile(cfg: Config, memory: MemoryPlan, total_steps: int, machine: Machine, precision: str,
                   prior_joined: bool, checkpointing: bool, choices) -> tuple[bool, str, str, Path | None, str]:
    """(compile, compile_mode, compile_scope, cache folder, cache entry) for this run; `choices` records each auto
    decision. Explicit CUDA graphs with several backward passes are refused."""
    if cfg.compile is True and cfg.compile_mode == "reduce-overhead" and memory.backwards_per_step > 1:
        # The graph owns the memory of the gradients its backward returns; the step's next pass would replay
        # it over gradients still being accumulated.
        raise UserError("compile_mode: reduce-overhead (CUDA graphs) cannot run several backward passes per step "
                        "(gradient_accumulation_steps > 1 or prior_mode: sequential): "
                        "set compile_mode: auto, or gradient_accumulation_steps: 1 and prior_mode: concat")
    graphs = machine.cuda and memory.backwards_per_step == 1
    mode = cfg.compile_mode if cfg.compile_mode != "auto" else ("reduce-overhead" if graphs else "default")
    # regional is measured on CPU only so far (docs/memory-and-speed.md): full stays the default
    scope = cfg.compile_scope if cfg.compile_scope != "auto" else "full"
    folder = cache_folder(cfg, precision, machine)
    entry = entry_name(cfg, scope, mode, prior_joined, checkpointing)
    compile_ = cfg.compile
    if compile_ == "auto":
        expected = expected_compile(folder, entry)
        why = why_not_compile(cfg, memory, total_steps, machine, expected)
        compile_ = choices.decide("compile", why is None, why or f"{total_steps} steps on one CUDA GPU; {expected[1]}")
        if compile_:
            log.info("compile: auto compiles the UNet for this %d-step run; the first steps take longer (%s; "
                     "compile: false skips it)", total_steps, expected[1])
    if cfg.compile_mode == "auto":
        choices.decide("compile_mode", mode if compile_ else "default",
                       "CUDA graphs" if compile_ and graphs else "no CUDA graphs here")
    elif not compile_ and mode != "default":
        log.warning("compile_mode: %s has no effect without compile", mode)
    if cfg.compile_scope == "auto" and compile_:
        choices.decide("compile_scope", scope, "one graph; regional unmeasured on GPU")
    if not compile_:
        return False, "default", "full", None, ""
    return True, mode, scope, usable(cfg, folder), entry
