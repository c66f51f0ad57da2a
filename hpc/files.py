"""Atomic file writes: a reader, or a run restarted after a crash, sees the old file or the complete
new one, never a partial one. Also: an exclusive lock on a file, and one-line reasons for failed writes."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_open(path: PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary file beside it, flushed to disk and renamed
    over ``path`` when the block ends, removed if the block raises. The file gets the permissions of
    one made by ``open`` (0666 less the umask), not mkstemp's 0600: run folders are shared."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o666 & ~_umask())
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: PathLike, data: Union[bytes, str]) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` atomically."""
    with atomic_open(path) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json_atomic(path: PathLike, value: Any) -> Path:
    """Write ``value`` as indented JSON to ``path`` atomically."""
    return write_atomic(path, json.dumps(value, indent=1) + "\n")


# errnos of a file system that has no advisory locks (NFS without lockd, Lustre mounted without flock)
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class LockBusy(Exception):
    """``exclusive_lock`` found the lock held; ``owner`` is the holder's text (empty if not yet written)."""

    def __init__(self, path: Path, owner: str):
        super().__init__(f"{path} is locked by {owner or 'another process'}")
        self.path, self.owner = path, owner


@contextlib.contextmanager
def exclusive_lock(path: PathLike, owner: str) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` for the block, with ``owner`` (who holds it) as the file's
    text; ``LockBusy`` at once if another process holds it. Yields False, holding nothing, on a file
    system without advisory locks. The kernel drops the lock when the process dies, so a file left by a
    killed holder locks nothing; a clean exit removes it.
    """
    path = Path(path)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockBusy(path, _read_text(path)) from None
            if error.errno not in NO_LOCKS:
                raise
            descriptor = None
            break
        # the holder before us removes the file before unlocking: a lock on a removed file is no lock
        if _same_file(descriptor, path):
            break
        os.close(descriptor)
    if descriptor is None:
        path.unlink(missing_ok=True)
        yield False
        return
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, owner.encode())
        yield True
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), path.stat())
    except FileNotFoundError:
        return False


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def os_error_reason(error: Exception, folder: PathLike) -> str:
    """Why reading or writing in ``folder`` failed, in one line: "no space left on device (1.2 MiB free
    without the partial file)" for a full disk or quota (callers remove what they wrote first), the
    system's text for another errno, else the first line of the message (HDF5's span several)."""
    number = getattr(error, "errno", None)
    if number in DISK_FULL:
        try:
            free = f" ({shutil.disk_usage(folder).free / 2**20:.1f} MiB free without the partial file)"
        except OSError:
            free = ""
        return f"{os.strerror(number).lower()}{free}"
    if number:
        return os.strerror(number)
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

# bytes read at a time when hashing a file (shards, checkpoints, weights: hundreds of MB)
HASH_BLOCK_BYTES = 16 << 20


def file_sha256(path: PathLike) -> str:
    """The SHA-256 hex digest of the file at ``path``, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
