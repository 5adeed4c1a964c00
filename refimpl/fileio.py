"""Atomic file writes: a reader sees the old file or the complete new one, never a torn write.

Every file refimpl writes (training checkpoints, ``save_pretrained``'s ``config.json`` and
safetensors, the recipe cache) goes through :func:`atomic_write`: the bytes go to a temporary file
in the same directory, are flushed and ``fsync``-ed, and the temporary file is renamed over the
target with :func:`os.replace`, which POSIX makes atomic within one file system. A process killed
during the write leaves the previous file intact (and at most a stray ``.tmp`` file beside it).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file beside ``path`` for writing; on success rename it to ``path``.

    ``mode`` is ``"wb"`` (bytes) or ``"w"`` (text, UTF-8). If the body raises, the temporary file
    is removed and ``path`` is left as it was.

    >>> with atomic_write("ckpt.npz") as f:   # doctest: +SKIP
    ...     np.savez(f, **arrays)
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode: expected 'wb' or 'w', got {mode!r}")
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # make the rename itself durable (the directory entry), where the platform allows it
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
