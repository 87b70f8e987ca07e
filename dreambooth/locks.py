"""One run per folder at a time: an OS lock (flock) on a hidden file in the folder, which the kernel drops when
the process ends however it ends (SIGKILL too), so a crash never leaves a stale lock behind. The holder's pid,
host and start time are in the file, for the message that refuses a second run."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
import weakref
from pathlib import Path

from dreambooth.errors import UserError

log = logging.getLogger(__name__)

LOCK = ".dreambooth.lock"
_HELD: dict[Path, list] = {}  # lock file -> [fd, holders]: a process may lock its own folder again (tests, bench)


def launch_rank() -> int:
    """This process's rank in its launch (torchrun and accelerate launch set RANK), known before any Accelerator."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def holder(path: Path) -> str:
    """Who holds the lock file at `path`, as its holder wrote it."""
    try:
        info = json.loads(path.read_text())
        return f"process {info['pid']} on {info['host']} (started {info['started']}: {info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class FolderLock:
    """A held lock on one folder; release() (or the process's end) lets the next run in."""

    def __init__(self, path: Path, created: Path | None):
        self.path, self.created = path, created
        self._finalizer = weakref.finalize(self, _drop, path)  # a Trainer that is simply dropped lets go too

    def release(self) -> None:
        """Let go; when this was the process's last hold, remove the lock file (and the folder, if the lock made it
        and nothing else was written there)."""
        if self._finalizer() and self.created is not None:  # finalize runs _drop once: later calls return None
            try:
                self.created.rmdir()  # only if empty: the run was refused before writing anything
            except OSError:
                pass


def _drop(path: Path) -> bool:
    """One holder fewer; True when the lock was let go."""
    entry = _HELD.get(path)
    if entry is None:
        return False
    entry[1] -= 1
    if entry[1] > 0:
        return False
    del _HELD[path]
    fd = entry[0]
    try:
        # Remove the file only while no one else can hold it (an exclusive lock): a later locker that opened this
        # file before the removal sees it is gone and starts over (acquire's inode check).
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except OSError:
        pass  # other processes of the same run hold it shared: they remove it
    os.close(fd)
    return True


def lock_folder(folder: str | Path, what: str, fix: str, shared: bool = False, wait: bool = False) -> FolderLock:
    """Hold the lock of `folder` (created if missing); another holder refuses with one line naming it and `fix`,
    or with `wait`, is waited for. `shared`: the other processes of one run, which may hold it together."""
    folder = Path(folder).expanduser()
    created = None
    try:
        folder.mkdir(parents=True)
        created = folder
    except FileExistsError:
        pass
    path = (folder / LOCK).resolve()
    if path in _HELD:
        _HELD[path][1] += 1
        return FolderLock(path, None)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    waited = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a refused run removed the empty folder it had made: make it again
            folder.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as e:  # a read-only folder: whatever writes there next says so
            return _unlocked(folder, e)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                raise UserError(f"{what} {folder} is in use by {holder(path)}: {fix}") from None
            if not waited:
                log.warning("%s %s is in use by %s: waiting for it to finish", what, folder, holder(path))
                waited = True
            fcntl.flock(fd, mode)
        except OSError as e:  # a filesystem without locks (some network mounts)
            os.close(fd)
            path.unlink(missing_ok=True)
            return _unlocked(folder, e)
        # The file may have been removed by its last holder between our open and our lock: then lock the new one.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    if not shared:
        program = Path(sys.argv[0]).name
        program = "dreambooth" if program in ("cli.py", "__main__.py") else program  # python -m dreambooth.cli
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([program, *sys.argv[1:]])[:200]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    _HELD[path] = [fd, 1]
    return FolderLock(path, created)


def _unlocked(folder: Path, error: OSError) -> FolderLock:
    log.warning("cannot lock %s (%s): a second run into it at the same time would not be stopped", folder,
                error.strerror or error)
    return FolderLock(folder / LOCK, None)  # holds nothing: release() has nothing to let go
