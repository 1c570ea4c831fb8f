"""Atomic file output: every file paraencoder writes goes through here.

A crash (or kill -9) leaves either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from paraencoder.errors import ParaencoderError


def _explain_os_error(path: Path, exc: OSError) -> ParaencoderError:
    if exc.errno == errno.ENOSPC:
        return ParaencoderError(f"cannot write {path}: the disk is full; free space or choose another output directory")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return ParaencoderError(
            f"cannot write {path}: the directory is read-only or not writable ({exc.strerror}); "
            "choose a writable output directory"
        )
    return ParaencoderError(f"cannot write {path}: {exc}")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; finished outputs get the usual permissions (shared caches on clusters).
_FILE_MODE = 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temp file next to ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    binary = "b" in mode
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _explain_os_error(path, exc) from exc
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _explain_os_error(path, exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb", encoding=None) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n")


def check_writable(directory: str | os.PathLike, what: str) -> Path:
    """Make sure files can be created in ``directory`` now (creating it if needed), before hours of work.

    Creates and removes a hidden probe file; directories it had to create for that are removed
    again, so a run that stops early leaves nothing behind. Raises :class:`ParaencoderError` naming
    ``what`` (e.g. ``"the checkpoint directory"``), the path and the fix.
    """
    directory = Path(directory)
    created = []
    for parent in [directory, *directory.parents]:
        if os.path.lexists(parent):
            break
        created.append(parent)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".paraencoder-write-check-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        error = _explain_os_error(directory, exc)
        raise ParaencoderError(f"{what} {directory} is not usable: {error}") from exc
    finally:
        for path in created:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(path)
    return directory
