"""Files that hold keys: mode 0600 in a 0700 directory, written atomically and durably."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path


def private_directory(directory: Path) -> None:
    """Create ``directory`` (and its parents) with mode 0700 if it does not exist."""
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        return
    directory.chmod(0o700)


def write_private(path: Path, data: bytes, *, replace: bool) -> os.stat_result:
    """Write ``data`` to ``path`` as a whole, mode 0600, synced to disk.

    With ``replace`` the file takes the place of any previous one, with an
    mtime later than the old one's even within one timestamp tick, so that a
    reader that watches (inode, mtime, size) never takes a new version for
    one it has seen.  Without it, an existing file wins: another process
    that created it first keeps its content.  Returns the written file's
    status.
    """
    directory = path.parent
    private_directory(directory)
    temporary = directory / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            if replace:
                try:
                    previous = os.stat(path).st_mtime_ns
                except FileNotFoundError:
                    previous = 0
                mtime = max(time.time_ns(), previous + 1)
                os.utime(handle.fileno(), ns=(mtime, mtime))
            os.fsync(handle.fileno())
            status = os.fstat(handle.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
    return status
