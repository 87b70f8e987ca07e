"""Several subjects in one run: which subject each batch comes from, and the dataset that serves such batches."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .data import DreamBoothDataset


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

    Index j means item j // n (wrapping) of subject j % n, so every batch is a list of plain indices."""

    def __init__(self, datasets: list[DreamBoothDataset], weights: list[float], batch_size: int):
        self.datasets, self.weights, self.batch_size = list(datasets), list(weights), batch_size
        # An epoch has as many batches as the subjects would have one after the other.
        self.batches_per_epoch = sum(math.ceil(len(d) / batch_size) for d in self.datasets)
        self.schedule = SubjectSchedule(self.weights)

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            d.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        n = len(self.datasets)
        return self.datasets[index % n][index // n]

    def epoch_batches(self, epoch: int, seed: int) -> list[list[int]]:
        """The batches of EPOCH as index lists, drawn from (seed, epoch) so any position can be reproduced."""
        n, bs = len(self.datasets), self.batch_size
        # The schedule runs on from the previous epoch: short epochs still reach the whole weighted pattern.
        picks = self.schedule.picks(epoch * self.batches_per_epoch, self.batches_per_epoch)
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
