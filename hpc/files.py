"""Atomic file writes: a reader, or a run restarted after a crash, sees the old file or the complete
new one, never a partial one."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_open(path: PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary file beside it, flushed to disk and renamed
    over ``path`` when the block ends, removed if the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_atomic(path: PathLike, data: Union[bytes, str]) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` atomically."""
    with atomic_open(path) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json_atomic(path: PathLike, value: Any) -> Path:
    """Write ``value`` as indented JSON to ``path`` atomically."""
    return write_atomic(path, json.dumps(value, indent=1) + "\n")
