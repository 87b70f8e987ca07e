"""File checksums that catch damage (a truncated copy, a flipped bit): each file's size plus a CRC-32 of every
64 MiB piece, hashed in parallel threads, and a check that a .safetensors file parses and covers its data.

CRC-32 was chosen by measurement (docs/checkpoints.md): it runs at several GB/s per core where SHA-256 and BLAKE2b
run at 0.7-2, and pieces let the threads share one large file. It finds accidents, not tampering."""

from __future__ import annotations

import json
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dreambooth.errors import UserError

PIECE = 64 * 2**20  # bytes per CRC; one 8-hex-digit CRC per piece, so a 10 GB file records 1.3 KB of them
READ = 8 * 2**20  # bytes read at a time within a piece (memory per thread)
ALGORITHM = "crc32/64MiB"  # what complete.json's records hold: the CRC-32 of each 64 MiB piece, in hex
HEADER_KEY = "dreambooth.data_crc32"  # in our .safetensors headers: the pieces' CRCs of the tensor data
MAX_HEADER = 100 * 2**20


def threads() -> int:
    # zlib.crc32 and file reads release the GIL, so threads scale to the cores (and the disk).
    return max(1, min(16, os.cpu_count() or 1))


def _piece_crc(path: Path, start: int, length: int) -> str:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while length > 0:
            data = f.read(min(READ, length))
            if not data:
                break  # the file shrank while being read: the CRC will not match
            crc = zlib.crc32(data, crc)
            length -= len(data)
    return f"{crc:08x}"


def _pieces(start: int, length: int) -> list[tuple[int, int]]:
    return [(start + i, min(PIECE, length - i)) for i in range(0, length, PIECE)] or [(start, 0)]


def digests(ranges: list[tuple[Path, int, int]]) -> list[str]:
    """The piece CRCs (concatenated hex) of each (path, start, length) range, all pieces hashed in parallel."""
    jobs = [(i, path, s, n) for i, (path, start, length) in enumerate(ranges) for s, n in _pieces(start, length)]
    with ThreadPoolExecutor(threads()) as pool:
        crcs = list(pool.map(lambda job: _piece_crc(*job[1:]), jobs))
    out = [""] * len(ranges)
    for (i, *_), crc in zip(jobs, crcs):
        out[i] += crc
    return out


def record_files(folder: Path) -> dict[str, dict]:
    """{relative path: {"size", "crc32"}} of every file under `folder`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    sizes = [p.stat().st_size for p in files]
    crcs = digests([(p, 0, n) for p, n in zip(files, sizes)])
    return {p.relative_to(folder).as_posix(): {"size": n, "crc32": c} for p, n, c in zip(files, sizes, crcs)}


def first_difference(expected: str, actual: str) -> str:
    """Where two piece-CRC strings first differ, as a byte range."""
    piece = next(i for i in range(0, max(len(expected), len(actual)), 8) if expected[i:i + 8] != actual[i:i + 8])
    start = piece // 8 * PIECE
    if PIECE % 2**20:
        return f"bytes {start:,}-{start + PIECE:,}"
    return f"bytes {start // 2**20:,}-{(start + PIECE) // 2**20:,} MiB"


def check_sizes(folder: Path, records: dict[str, dict]) -> str | None:
    """The first recorded file that is missing or has another size, as 'NAME: why'; None if all match."""
    for name, rec in records.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != rec["size"]:
            return f"{name} is {size:,} bytes, not the {rec['size']:,} written"
    return None


def problems(folder: Path, records: dict[str, dict]) -> dict[str, str]:
    """{name: why} for every recorded file that is missing, has another size or fails its CRCs (in parallel)."""
    bad = {name: why for name in records if (why := check_sizes(folder, {name: records[name]}))}
    names = [n for n in records if n not in bad]
    actual = digests([(folder / n, 0, records[n]["size"]) for n in names])
    for name, crc in zip(names, actual):
        if crc != records[name]["crc32"]:
            bad[name] = f"{name} fails its checksum in {first_difference(records[name]['crc32'], crc)}"
    return bad


def check_files(folder: Path, records: dict[str, dict]) -> str | None:
    """The first problem of problems() as 'NAME ... why', None if every file is intact (sizes first: no reading
    gigabytes when a size already tells)."""
    return check_sizes(folder, records) or next(iter(problems(folder, records).values()), None)


def record_file(path: Path) -> dict:
    """{"size", "crc32"} of one file, as record_files has them."""
    size = path.stat().st_size
    return {"size": size, "crc32": digests([(path, 0, size)])[0]}


# ------------------------------------------------------------------------------------------- .safetensors files

def safetensors_layout(path: Path) -> tuple[int, dict]:
    """(offset of the tensor data, header) of a .safetensors file; ValueError saying why if it is damaged."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("too short for a header")
        n = struct.unpack("<Q", head)[0]
        if n > min(MAX_HEADER, size - 8):
            raise ValueError("its header runs past the end of the file")
        try:
            header = json.loads(f.read(n))
            assert isinstance(header, dict)
        except (ValueError, AssertionError):
            raise ValueError("its header is not valid JSON") from None
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        raise ValueError("its header does not describe tensors") from None
    if 8 + n + end != size:
        raise ValueError(f"its header describes {8 + n + end:,} bytes")
    return 8 + n, header


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is damaged (it does not parse, is cut short, or fails the CRCs our header records);
    None if it looks intact."""
    try:
        offset, header = safetensors_layout(path)
    except ValueError as e:
        return str(e)
    except OSError as e:
        return f"it cannot be read ({e.strerror})"
    recorded = (header.get("__metadata__") or {}).get(HEADER_KEY)
    if recorded:
        actual = digests([(path, offset, path.stat().st_size - offset)])[0]
        if actual != recorded:
            return f"it fails its checksum in {first_difference(recorded, actual)}"
    return None


def damaged_message(what: str, path: Path, problem: str) -> str:
    """The one line for a model file that exists but is damaged."""
    try:
        size = f"{path.stat().st_size:,} bytes"
    except OSError:
        size = "size unknown"
    return f"{what} {path} is damaged ({size}; {problem}): download or copy it again"


def refuse_damaged(path: Path, what: str) -> None:
    """A UserError (damaged_message) if the .safetensors file at `path` is damaged."""
    problem = safetensors_problem(Path(path))
    if problem:
        raise UserError(damaged_message(what, Path(path), problem))


def placeholder(tensors: dict) -> str:
    """The HEADER_KEY value to write before the data's CRCs are known: as long as they will be (the data section is
    exactly the tensors' bytes)."""
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    return "0" * 8 * len(_pieces(0, data))


def seal(path: Path) -> None:
    """Fill in the HEADER_KEY placeholder of a just-written .safetensors file with its data's CRCs (in place: same
    length, so no offset moves)."""
    offset, header = safetensors_layout(path)
    held = header["__metadata__"][HEADER_KEY]
    crcs = digests([(path, offset, path.stat().st_size - offset)])[0]
    assert len(crcs) == len(held), "the placeholder must be as long as the CRCs"
    with open(path, "r+b") as f:
        head = f.read(offset)
        key = json.dumps(HEADER_KEY).encode() + b":" + json.dumps(held).encode()
        at = head.index(key) + len(key) - len(held) - 1
        f.seek(at)
        f.write(crcs.encode())
