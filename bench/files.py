"""Result files: written atomically, published as sets, history files created once.

Every file is written through ``bk.atomic`` (a temporary renamed over the target, the user's
umask applied, a killed writer's temporary removed by the next write into its folder).

The files of one run are published as a set (``publish``): they are written into a fresh
folder ``.sets/NAME.TAG/`` and the pointer ``.sets/NAME`` (a symlink) is swapped to it in one
rename; the public names (``results.json`` ...) are symlinks through that pointer. A reader
therefore sees every file of one run or every file of the next, never a mix, even when a run is
killed half-way through writing.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from bk.atomic import HOST, owner_tag, remove_stale_temporaries, write_file, writer_gone

Content = str | bytes | Callable[[BinaryIO], None]
SETS = ".sets"


def _writer(content: Content) -> Callable[[BinaryIO], None]:
    if callable(content):
        return content
    data = content.encode("utf-8") if isinstance(content, str) else content
    return lambda handle: handle.write(data)


def write_atomic(path: Path, content: Content) -> None:
    """Replace ``path`` with ``content`` (text, bytes, or a function writing to a binary
    handle): readers see the old file or the new one, never a mix."""
    write_file(Path(path), _writer(content))


def write_new(path: Path, content: Content) -> None:
    """Create ``path``; if it already exists, raise ``FileExistsError`` and leave it untouched."""
    try:
        write_file(Path(path), _writer(content), exclusive=True)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; history files are never rewritten") from None


def figure_writer(fig: Any, dpi: int = 100) -> Callable[[BinaryIO], None]:
    """``Content`` rendering a matplotlib figure as PNG."""
    return lambda handle: fig.savefig(handle, format="png", dpi=dpi)


def publish(folder: Path, name: str, files: Mapping[str, Content]) -> None:
    """Write ``files`` (file name -> content) as one set named ``name`` in ``folder``.

    ``folder/<file>`` for each file is a symlink to ``.sets/<name>/<file>``; ``.sets/<name>``
    points at the newest complete set. A file of the previous set missing from this one is
    unpublished. Sets of writers that have exited are removed.
    """
    folder = Path(folder)
    sets = folder / SETS
    sets.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(sets)
    remove_stale_temporaries(folder)
    tag = owner_tag()
    staging = sets / f"{name}.{tag}"
    staging.mkdir()
    for file, content in files.items():
        write_file(staging / file, _writer(content))
    pointer = sets / name
    previous = set(os.listdir(pointer)) if pointer.is_dir() else set()
    if pointer.is_dir() and not pointer.is_symlink():  # a copied folder: its links resolved
        shutil.rmtree(pointer)
    _link(pointer, staging.name)
    for file in files:
        _link(folder / file, f"{SETS}/{name}/{file}")
    for file in previous - set(files):
        public = folder / file
        if public.is_symlink() and os.readlink(public) == f"{SETS}/{name}/{file}":
            public.unlink()
    _remove_old_sets(sets, name, keep=staging.name)


def _link(path: Path, target: str) -> None:
    """Make ``path`` a symlink to ``target`` in one rename (over a file or an older link)."""
    if path.is_symlink() and os.readlink(path) == target:
        return
    if path.is_dir() and not path.is_symlink():
        raise ValueError(f"{path} is a folder; cannot publish a result file there")
    tmp = path.parent / f".{path.name}.{owner_tag()}.tmp"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _remove_old_sets(sets: Path, name: str, keep: str) -> None:
    """Remove sets of ``name`` written by this process or by a writer that has exited."""
    pattern = re.compile(rf"^{re.escape(name)}\.(\d+-[0-9a-f]{{8}}-[0-9a-f]{{8}})$")
    mine = f"{os.getpid()}-{HOST}-"
    for entry in os.listdir(sets):
        match = pattern.match(entry)
        if entry == keep or not match:
            continue
        tag = match.group(1)
        if tag.startswith(mine) or writer_gone(tag):
            shutil.rmtree(sets / entry, ignore_errors=True)


@contextmanager
def locked(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (an ``flock`` on ``.NAME.lock`` beside it) for the
    block; ``on_wait()`` runs first if another process holds it. The lock ends with the
    process, so a killed holder never blocks anyone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or corrupt file raises ``ValueError`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
