"""File writing shared by the engine's and the trainer's checkpoints, and the progress bars' terminal check."""

from __future__ import annotations

import os
import sys
import tempfile

import torch


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file and a rename, so a crash leaves the old file whole."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def nested_progress(progress: bool) -> bool:
    """Whether bars nested inside another may show: only on a terminal. Nested bars move the cursor,
    which a redirected log records as escape codes (``[A``); a log gets the outer bar alone."""
    return progress and sys.stderr.isatty()
