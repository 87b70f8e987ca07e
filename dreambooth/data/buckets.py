"""Aspect-ratio buckets: the training sizes near `resolution`^2 pixels, the bucket each image trains at, and
epoch batches that each hold images of one bucket."""

from __future__ import annotations

import math
from collections import Counter

import torch

from dreambooth.data.dataset import DreamBoothDataset, Slot, mixed_seed


def bucket_sizes(resolution: int, step: int, max_ratio: float) -> list[tuple[int, int]]:
    """(width, height) of every bucket: sides multiples of STEP, at most resolution^2 pixels (so no bucket needs
    more memory than the square), the longer side at most MAX_RATIO times the shorter; wide to tall order."""
    area = resolution * resolution
    side = max(step, resolution // step * step)
    sizes = {(side, side)}
    for w in range(step, area // step + 1, step):
        h = area // w // step * step  # the tallest height that keeps w x h within the area
        if h >= step and max(w, h) <= max_ratio * min(w, h):
            sizes.add((w, h))
    return sorted(sizes, key=lambda s: (-s[0] / s[1], -s[0]))


class Buckets:
    """The bucket set of a run; assign() gives an image's training size from its own size alone."""

    def __init__(self, resolution: int, step: int, max_ratio: float):
        self.resolution, self.step, self.max_ratio = resolution, step, max_ratio
        self.sizes = bucket_sizes(resolution, step, max_ratio)

    def assign(self, width: int, height: int) -> tuple[int, int]:
        """The bucket of a WIDTH x HEIGHT image: the one nearest its aspect ratio; if that would upscale the image,
        its own size rounded down to the step (aspect ratio bounded) instead."""
        ratio = math.log(width / height)
        w, h = min(self.sizes, key=lambda s: abs(math.log(s[0] / s[1]) - ratio))
        if width >= w and height >= h:
            return w, h
        step = self.step
        w, h = max(step, width // step * step), max(step, height // step * step)
        if w > self.max_ratio * h:  # a strip narrower than the bucket set allows: crop its length
            w = max(step, int(h * self.max_ratio) // step * step)
        elif h > self.max_ratio * w:
            h = max(step, int(w * self.max_ratio) // step * step)
        return w, h


def bucket_batches(keys: list, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Positions 0..len(KEYS)-1 in batches whose positions share one key (the last batch of a key may be short);
    positions and batches shuffled with GENERATOR."""
    groups: dict = {}
    for i in torch.randperm(len(keys), generator=generator).tolist():
        groups.setdefault(keys[i], []).append(i)
    batches = [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def batch_count(keys: list, batch_size: int) -> int:
    """How many batches bucket_batches makes of KEYS."""
    return sum(math.ceil(n / batch_size) for n in Counter(keys).values())


def bucketed_batches(buckets: Buckets, subjects: list[tuple[list, int]], batch_size: int) -> int:
    """Batches per epoch of the subjects' bucketed passes, one after the other; each subject is (images, items)."""
    return sum(batch_count(item_keys(buckets, images, length), batch_size) for images, length in subjects)


def describe(sizes: list[tuple[int, int]]) -> str:
    """'640x384: 3 images, 512x512: 1 image' for the buckets of some images, most used first."""
    counts = Counter(sizes).most_common()
    return ", ".join(f"{w}x{h}: {n} image{'s' if n != 1 else ''}" for (w, h), n in counts)


def item_keys(buckets: Buckets, images: list, length: int) -> list[tuple[int, int]]:
    """The bucket of each of LENGTH dataset items, item j showing instance image j % len(IMAGES)."""
    sizes = [buckets.assign(*img.size) for img in images]
    return [sizes[j % len(sizes)] for j in range(length)]


def class_picks(buckets: Buckets, class_images: list, sizes: list[int], generator: torch.Generator) -> list[list[int]]:
    """Class images for batches of SIZES, each batch's from one class bucket. The buckets take turns in proportion
    to their image counts (smooth weighted round-robin), each cycling through its images in a shuffled order: one
    class bucket (sampled class images) shows every image once per pass, several about once."""
    groups: dict = {}
    for c in torch.randperm(len(class_images), generator=generator).tolist():
        groups.setdefault(buckets.assign(*class_images[c].size), []).append(c)
    turns = list(groups.values())
    credit, used, out = [0] * len(turns), [0] * len(turns), []
    for size in sizes:
        credit = [c + len(g) for c, g in zip(credit, turns)]
        k = max(range(len(turns)), key=lambda i: (credit[i], -i))
        credit[k] -= len(class_images)
        out.append([turns[k][(used[k] + i) % len(turns[k])] for i in range(size)])
        used[k] += size
    return out


def epoch_slots(dataset: DreamBoothDataset, epoch: int, seed: int, batch_size: int, rep: int = 0,
                subject: int = 0) -> list[list[Slot]]:
    """Pass REP of EPOCH over a bucketed dataset's items, in batches of one instance bucket (and one class
    bucket), drawn from (seed, epoch, subject, rep) so any position can be reproduced."""
    n, length = len(dataset.instance_images), len(dataset)
    g = torch.Generator().manual_seed(mixed_seed(seed, epoch, subject, rep, 0xB0C7E7))
    batches = bucket_batches(item_keys(dataset.buckets, dataset.instance_images, length), batch_size, g)
    classes = (class_picks(dataset.buckets, dataset.class_images, [len(b) for b in batches], g)
               if dataset.class_images else [[None] * len(b) for b in batches])
    # Item keys past `length` (later passes) pick the same images with fresh crops.
    return [[Slot(j % n, c, rep * length + j, subject) for j, c in zip(batch, picked)]
            for batch, picked in zip(batches, classes)]
