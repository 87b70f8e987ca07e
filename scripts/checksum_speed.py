#!/usr/bin/env python3
"""How much checkpoint checksums cost: each candidate hash's speed on one core and on all, then recording and
verifying a checkpoint of SD 2.1's size (fp32 UNet weights + 8-bit AdamW state by default) in a temp folder,
from the page cache (warm) and, after dropping the files from it, from the disk (cold), beside a plain read.

    python scripts/checksum_speed.py [--weights-gb 3.46] [--state-gb 1.73] [--dir /path/on/the/checkpoint/disk]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dreambooth import checksums

MB = 2**20


def algorithm_speeds(buf: bytes, workers: int) -> dict:
    """GB/s of crc32, sha256 and blake2b over `buf` in 64 MiB pieces, on one thread and on `workers`."""
    view = memoryview(buf)
    pieces = [view[i:i + checksums.PIECE] for i in range(0, len(buf), checksums.PIECE)]
    hashers = {"crc32": lambda b: zlib.crc32(b), "sha256": lambda b: hashlib.sha256(b).digest(),
               "blake2b": lambda b: hashlib.blake2b(b).digest()}
    out = {}
    for name, fn in hashers.items():
        for n in (1, workers):
            with ThreadPoolExecutor(n) as pool:
                best = min(_timed(lambda: list(pool.map(fn, pieces))) for _ in range(3))
            out[f"{name} x{n}"] = round(len(buf) / best / 1e9, 2)
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_random(path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for start in range(0, size, 256 * MB):
            f.write(rng.bytes(min(256 * MB, size - start)))
        f.flush()
        os.fsync(f.fileno())


def drop_cache(folder: Path) -> None:
    """Ask the kernel to forget the files' cached pages (clean pages only; no root needed)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def plain_read(folder: Path) -> None:
    """What loading does anyway: read every byte once (in parallel pieces, as verification does)."""
    jobs = [(p, s) for p in folder.iterdir() for s in range(0, p.stat().st_size, checksums.PIECE)]

    def read(job):
        with open(job[0], "rb", buffering=0) as f:
            f.seek(job[1])
            left = checksums.PIECE
            while left > 0 and (data := f.read(min(checksums.READ, left))):
                left -= len(data)
    with ThreadPoolExecutor(checksums.threads()) as pool:
        list(pool.map(read, jobs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights-gb", type=float, default=3.46, help="SD 2.1 UNet in fp32: 866 M parameters x 4 bytes")
    p.add_argument("--state-gb", type=float, default=1.73, help="8-bit AdamW: 2 bytes per parameter (fp32: 6.93)")
    p.add_argument("--dir", default=None, help="where to write the test checkpoint (default: the temp folder)")
    a = p.parse_args()
    workers = checksums.threads()
    result = {"cpus": os.cpu_count(), "threads": workers,
              "GB/s": algorithm_speeds(np.random.default_rng(1).bytes(512 * MB), workers)}
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        folder = Path(tmp)
        for name, gb in (("weights.safetensors", a.weights_gb), ("state.safetensors", a.state_gb)):
            write_random(folder / name, int(gb * 1e9))
        size = sum(p.stat().st_size for p in folder.iterdir())
        records = {}
        t_record = _timed(lambda: records.update(checksums.record_files(folder)))  # at save: from the page cache
        t_warm = _timed(lambda: checksums.check_files(folder, records))
        drop_cache(folder)
        t_read = _timed(lambda: plain_read(folder))
        drop_cache(folder)
        t_cold = _timed(lambda: checksums.check_files(folder, records))
    result["checkpoint_GB"] = round(size / 1e9, 2)
    result["seconds"] = {"record at save (warm)": round(t_record, 2), "verify warm": round(t_warm, 2),
                         "plain read cold": round(t_read, 2), "verify cold": round(t_cold, 2)}
    per_gb = t_warm / (size / 1e9)
    result["verify warm s per 5 GB / 10 GB"] = [round(5 * per_gb, 2), round(10 * per_gb, 2)]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
