"""The run's subjects: each folder resolved to its prompts and class folder; with several, which subject each batch
comes from and the dataset that serves such batches."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth.config.schema import Config, subjects_of
from dreambooth.data.buckets import bucketed_batches, epoch_slots
from dreambooth.data.dataset import INFO_FILE, DreamBoothDataset, Slot, resolve_prompts
from dreambooth.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class Subject:
    """One subject of a run, its prompts and class-image folder resolved."""
    name: str
    dir: Path
    instance_prompt: str
    class_prompt: str | None
    class_dir: Path
    num_class_images: int
    weight: float
    captions: tuple = ()  # the folder's captions (captions: true), filled in when TrainingSet reads them


def prompts_as_trained(folder, instance_prompt: str | None, class_prompt: str | None) -> tuple:
    """(instance, class) prompts as a finished run used them; the config's own values if the folder moved since."""
    try:
        return resolve_prompts(folder or "", instance_prompt, class_prompt)
    except (UserError, OSError):
        return instance_prompt, class_prompt


def class_folder(subject_dir: str, class_data_dir: str | None) -> Path:
    """Where a subject's class images live: its class_data_dir, else class_data_dir/ inside its folder."""
    return (Path(class_data_dir) if class_data_dir else Path(subject_dir) / "class_data_dir").expanduser()


def resolve_subjects(cfg: Config, need_class_prompt: bool | None = None) -> list[Subject]:
    """The run's subjects with prompts merged from dataset_info.json; refuses duplicate instance prompts."""
    need_class_prompt = cfg.with_prior_preservation if need_class_prompt is None else need_class_prompt
    several = bool(cfg.subjects)
    out, names = [], set()
    for i, s in enumerate(subjects_of(cfg)):
        where = f"subjects[{i}]" if several else "data"
        instance, klass = resolve_prompts(s.dir, s.instance_prompt, s.class_prompt)
        if need_class_prompt and not klass:
            raise UserError(f"prior preservation needs a class prompt for {s.dir}: add \"class_prompt\" to its "
                            f"{INFO_FILE} or set {where}.class_prompt (e.g. 'a photo of a dog')")
        name = Path(s.dir).name or f"subject{i}"
        name = name if name not in names else f"{name}-{i}"
        names.add(name)
        out.append(Subject(name, Path(s.dir), instance, klass, class_folder(s.dir, s.class_data_dir),
                           s.num_class_images or cfg.num_class_images, s.weight))
    for i, a in enumerate(out):
        for b in out[i + 1:]:
            if a.instance_prompt == b.instance_prompt:
                raise UserError(f"subjects {a.dir} and {b.dir} share the instance prompt {a.instance_prompt!r}: give "
                                "each subject its own identifier (e.g. 'a photo of sks dog', 'a photo of zwx cat')")
        for b in out:
            if a is not b and a.instance_prompt in b.instance_prompt:
                logger.warning("instance prompt %r (%s) is part of %r (%s): the subjects may blend; use distinct "
                               "identifiers", a.instance_prompt, a.dir, b.instance_prompt, b.dir)
    return out


class SubjectSchedule:
    """Smooth weighted round-robin over subjects, run on across epochs: batch b's subject depends only on
    (weights, b), so each subject's share of any stretch is within one of its weight's proportion."""

    def __init__(self, weights: list[float]):
        self.weights, self.total = list(weights), sum(weights)
        self._rewind()

    def _rewind(self) -> None:
        self.done, self.credit = 0, [0.0] * len(self.weights)  # the credit after the first `done` batches

    def picks(self, start: int, count: int) -> list[int]:
        """Subjects of batches start..start+count-1. Later stretches continue from the last one (epochs in
        order cost only their own batches); an earlier one is replayed from batch 0, giving the same picks."""
        if start < self.done:
            self._rewind()
        out = []
        while self.done < start + count:
            self.credit = [c + w for c, w in zip(self.credit, self.weights)]
            best = max(range(len(self.weights)), key=lambda k: (self.credit[k], -k))
            self.credit[best] -= self.total
            if self.done >= start:
                out.append(best)
            self.done += 1
        return out


def subject_schedule(weights: list[float], start: int, count: int) -> list[int]:
    """Subjects of batches start..start+count-1 (equal weights give plain round-robin)."""
    return SubjectSchedule(weights).picks(start, count)


class MultiSubjectDataset(torch.utils.data.Dataset):
    """Several subjects' datasets; each batch comes from one subject, subjects taking turns by weight.

    Index j means item j // n (wrapping) of subject j % n, so every batch is a list of plain indices; with buckets
    an index is a Slot naming its subject, and each batch also holds one bucket."""

    def __init__(self, datasets: list[DreamBoothDataset], weights: list[float], batch_size: int):
        self.datasets, self.weights, self.batch_size = list(datasets), list(weights), batch_size
        self.buckets = self.datasets[0].buckets
        if self.buckets is not None:  # as many batches as the subjects' bucketed passes, one after the other
            self.batches_per_epoch = bucketed_batches(self.buckets, [(d.instance_images, len(d)) for d in self.datasets],
                                                      batch_size)
        else:
            self.batches_per_epoch = self.length([len(d) for d in self.datasets], batch_size) // batch_size
        self.schedule = SubjectSchedule(self.weights)

    @staticmethod
    def length(lengths: list[int], batch_size: int) -> int:
        """Items per epoch: as many batches as the subjects would have one after the other."""
        return sum(math.ceil(n / batch_size) for n in lengths) * batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            d.set_epoch(epoch)

    def __getitem__(self, index: int | Slot) -> dict:
        if isinstance(index, Slot):
            return self.datasets[index.subject][index]
        n = len(self.datasets)
        return self.datasets[index % n][index // n]

    def epoch_batches(self, epoch: int, seed: int) -> list[list[int]]:
        """The batches of EPOCH as index lists, drawn from (seed, epoch) so any position can be reproduced."""
        n, bs = len(self.datasets), self.batch_size
        # The schedule runs on from the previous epoch: short epochs still reach the whole weighted pattern.
        picks = self.schedule.picks(epoch * self.batches_per_epoch, self.batches_per_epoch)
        if self.buckets is not None:
            return self._bucketed(picks, epoch, seed)
        streams = []
        for k, d in enumerate(self.datasets):
            need, order, rep = picks.count(k) * bs, [], 0
            while len(order) < need:  # shuffled passes over the subject, as many as its share needs
                g = torch.Generator().manual_seed(seed * 100_003 + epoch * 1_009 + k * 10_007 + rep)
                # Item numbers past len(d) pick the same images with fresh crops (the item seed sees them).
                order += [rep * len(d) + i for i in torch.randperm(len(d), generator=g).tolist()]
                rep += 1
            streams.append(iter(order))
        return [[next(streams[k]) * n + k for _ in range(bs)] for k in picks]

    def _bucketed(self, picks: list[int], epoch: int, seed: int) -> list[list[Slot]]:
        """The picked subjects' next bucketed batches: each subject's passes (epoch_slots) one after the other."""
        streams = []
        for k, d in enumerate(self.datasets):
            need, batches, rep = picks.count(k), [], 0
            while len(batches) < need:
                batches += epoch_slots(d, epoch, seed, self.batch_size, rep, subject=k)
                rep += 1
            streams.append(iter(batches))
        return [next(streams[k]) for k in picks]
