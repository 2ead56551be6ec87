"""Atomic file writes: a reader sees the old file or the new one, never part of either.

A file is written to a temporary sibling named after its writer, ``.NAME.PID-HOST-TOKEN.tmp``,
created with mode 0o666 so the user's umask applies as to any other new file, flushed to disk,
then renamed over the target (or hard-linked to a name that must not exist yet). A temporary
left by a killed writer is removed by the next write into the same folder once that process is
gone, so temporaries never accumulate beside results, checkpoints or records.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMPORARY = re.compile(r"^\..+\.(\d+-[0-9a-f]{8}-[0-9a-f]{8})\.tmp$")


def owner_tag() -> str:
    """``PID-HOST-TOKEN``: unique to this write, and enough to tell when its writer is gone."""
    return f"{os.getpid()}-{HOST}-{secrets.token_hex(4)}"


def writer_gone(tag: str) -> bool:
    """Whether the process that made a ``PID-HOST-TOKEN`` tag has exited. Only a writer on this
    host can be checked; one on another host is assumed alive."""
    pid, _, rest = tag.partition("-")
    if not pid.isdigit() or not rest.startswith(HOST + "-"):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporaries in ``folder`` whose writer has exited."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = _TEMPORARY.match(name)
        if match and writer_gone(match.group(1)):
            try:
                os.unlink(Path(folder) / name)
            except FileNotFoundError:
                pass


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, write: Callable[[BinaryIO], None], *, exclusive: bool = False) -> None:
    """Write ``path`` through ``write(handle)`` atomically.

    ``exclusive``: create ``path`` only if it does not exist (``FileExistsError`` otherwise,
    and the existing file is untouched); else replace it.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    tmp = folder / f".{path.name}.{owner_tag()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic, and fails if the target exists
        else:
            os.replace(tmp, path)
        _fsync_folder(folder)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
