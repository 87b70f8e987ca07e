"""The training state a checkpoint saves and restores: where training is, what it has seen, its random streams."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


class SubjectStats:
    """Batches and losses of each subject (every batch holds one), for per-subject logs and the summary."""

    def __init__(self, names: list[str], accumulation: int = 1, prior: bool = False):
        self.accumulation, self.prior = accumulation, prior
        self.stats = {n: {"batches": 0, "loss": 0.0, "prior_loss": 0.0, "last": None} for n in names}
        self.this_step: dict[str, list[float]] = {}  # subject -> its micro-batch losses in the current step

    def __len__(self) -> int:
        return len(self.stats)

    def track(self, batch: dict, losses: dict[str, float]) -> None:
        """Count the batch and its loss (plain numbers) for its subject."""
        name = batch.get("subjects", [None])[0]
        stats = self.stats.get(name)
        if stats is None:
            return
        loss = losses["loss"]
        stats["batches"] += 1
        stats["loss"] += loss
        stats["last"] = loss
        stats["prior_loss"] += losses.get("prior_loss", 0.0)
        self.this_step.setdefault(name, []).append(loss)

    def step_means(self) -> dict[str, float]:
        """`loss/<subject>` of the step just finished (only with several subjects); starts the next step."""
        means = {f"loss/{n}": sum(v) / len(v) for n, v in self.this_step.items()} if len(self.stats) > 1 else {}
        self.this_step = {}
        return means

    def state_dict(self) -> dict:
        """The per-subject totals (plain JSON), for checkpoints; taken between steps, so nothing is in flight."""
        return {name: dict(s) for name, s in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        """Totals from a checkpoint; a subject this run lacks (changed subjects, resume_force) is dropped."""
        for name, s in state.items():
            if name in self.stats:
                self.stats[name].update(s)

    def summary(self) -> dict:
        """Per subject: steps (its batches over gradient_accumulation_steps), mean and last loss, prior loss."""
        out = {}
        for name, s in self.stats.items():
            n = s["batches"]
            out[name] = {"steps": round(n / self.accumulation, 3),
                         "mean_loss": s["loss"] / n if n else None, "final_loss": s["last"]}
            if self.prior:
                out[name]["mean_prior_loss"] = s["prior_loss"] / n if n else None
        return out


def per_process(**kw) -> Any:
    """A field each process keeps (and checkpoints) for itself; the others are shared by all processes."""
    return field(metadata={"per_process": True}, **kw)


@dataclass
class TrainState:
    """Everything a resumed run needs beside weights, optimizer, schedule and scaler. A new piece of state is one
    field: plain JSON values are shared by all processes (state.json); per_process fields go to each process's
    own file (checkpoint_ranks.py)."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already used: with (seed, epoch) it fixes the data position
    losses: list[float] = field(default_factory=list)
    bad_steps: int = 0  # consecutive steps skipped for non-finite loss or gradients
    # Noise and timesteps come from this generator, so a checkpoint can restore the stream exactly.
    generator: torch.Generator = per_process(default_factory=torch.Generator)
    subjects: SubjectStats = per_process(default_factory=lambda: SubjectStats([]))

    def shared(self) -> dict[str, Any]:
        """The shared fields as plain data (state.json)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.metadata.get("per_process")}

    def load_shared(self, saved: dict[str, Any]) -> None:
        """Set the shared fields from state.json; a field an older checkpoint lacks keeps its value."""
        for f in dataclasses.fields(self):
            if not f.metadata.get("per_process") and f.name in saved:
                setattr(self, f.name, _plain(saved[f.name]))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value
