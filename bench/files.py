"""Result files are written atomically; history files are created once and never rewritten."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _temporary(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return tmp


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: readers see the old file or the new one, never a mix."""
    tmp = _temporary(Path(path), text)
    try:
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_new(path: Path, text: str) -> None:
    """Create ``path`` with ``text``; if it already exists, raise and leave it untouched."""
    tmp = _temporary(Path(path), text)
    try:
        os.link(tmp, path)  # atomic, and fails if the target exists
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; history files are never rewritten") from None
    finally:
        os.unlink(tmp)


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
