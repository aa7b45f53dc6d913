"""Writing files so that nothing written before is lost: atomically, with the user's permissions.

Every file the kit writes that a later step reads (checkpoints, JSON records, unpacked data, configs)
goes to a temporary file in the same folder, is flushed to disk, gets the permissions of a new file
under the process's umask (a temporary file is created 0600), and is renamed over the old one. A run
killed at any moment, or a disk that fills up, leaves either the previous complete file or the new
one, never half a file; the temporary file is removed when the write fails.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then make it ``path`` (mode 0666 & ~umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        # torch.save reports a full disk as an obscure RuntimeError ("unexpected pos ..."): tell it by the
        # space left while the partial file still holds it, and say so plainly
        full = not (isinstance(e, OSError) and e.errno == errno.ENOSPC) and _nearly_full(path.parent)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, f"No space left on device while writing {str(path)!r}; the previous file "
                                        "is kept, and the run resumes from it once there is room") from e
        raise
    return path


def _nearly_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text))


def check_folder(field: str, folder: str | os.PathLike) -> Path:
    """Refuse, before any work, a folder the kit could not write into, naming the config ``field``: an
    empty name, a file, a path under a file, a name longer than the file system allows, a place that is
    not writable. Writes nothing (writability is probed with a temporary folder, removed at once)."""
    from .config import ConfigError

    text = str(folder)
    if not text.strip():
        raise ConfigError(f"{field}={text!r} must name a folder")
    path = Path(text).expanduser()
    try:
        limit = os.pathconf("/", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    long = [part for part in path.parts if len(part.encode()) > limit]
    if long:
        raise ConfigError(f"{field}={text[:60]!r}...: the name {long[0][:40]!r}... is longer than the file system "
                          f"allows ({limit} bytes)")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}={text!r} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{field}={text!r} lies under the file {str(existing)!r}")
    try:
        probe = tempfile.mkdtemp(prefix=".bissl-write-check.", dir=existing)
        os.rmdir(probe)
    except OSError as e:
        raise ConfigError(f"{field}={text!r} cannot be written: {str(existing)!r} refuses new files "
                          f"({e.strerror})") from None
    return path
