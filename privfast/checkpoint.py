"""The checkpoint of a training run, and the run directory that holds it.

``privfast train --out DIR`` writes ``DIR/checkpoint.pt``, atomically after every epoch (a crash
leaves the previous one whole). While a process trains into it, the lock file
``DIR/checkpoint.pt.lock`` holds that process's id (:class:`RunLock`), so a second writer is
refused instead of silently overwriting; a run found in DIR is continued (``--resume``) or
replaced (``--overwrite``), never overwritten by accident (:func:`check_overwrite`). Commands that
read a run (``audit``, ``report``, ``invert``) take the directory or the file.

A checkpoint (format :data:`CHECKPOINT_FORMAT`) is a dict of:

- ``format``; ``config``: :meth:`~privfast.config.TrainConfig.to_dict`; ``history`` and
  ``audit_history``: the records of the completed epochs; ``canaries``: ``x``, ``y``,
  ``references_x``, ``references_y``; ``world_size``: processes it trains in;
  ``noise_multiplier``: the sigma it trains with (searched with a target epsilon; None for the
  non-private methods);
- the training state after the last completed epoch: ``model``, ``optimizer``,
  ``sam_base_optimizer``, ``privacy_engine``, ``rng`` (None before the first epoch ends);
- ``interrupted``, only in a run stopped by Ctrl-C within an epoch: the same training state at the
  step it stopped after, with ``epoch`` (0-based), ``step``, ``loss_sum``, ``rows`` and
  ``epoch_rng`` (the random state the epoch began with), from which a resumed run goes on exactly.

Format 2 (before ``TrainConfig.k_base``: its ``augmult`` field was K_base) is migrated on reading.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from privfast._io import atomic_save
from privfast.config import TrainConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "TRAINING_STATE",
    "CheckpointError",
    "RunInUseError",
    "RunLock",
    "check_overwrite",
    "checkpoint_file",
    "describe",
    "load_trained",
    "read_checkpoint",
    "write_checkpoint",
]

CHECKPOINT_FORMAT = 3
"""2: hyphenated method names, canaries, SAM's base optimizer state; 3: ``k_base`` (format 2's
``augmult``), ``noise_multiplier``, ``interrupted``."""
CHECKPOINT_NAME = "checkpoint.pt"
"""The checkpoint's file name in a run directory."""
_READABLE = (2, CHECKPOINT_FORMAT)
TRAINING_STATE = ("model", "optimizer", "sam_base_optimizer", "privacy_engine", "rng")
"""The entries that hold the state training goes on from (all None before the first epoch ends)."""
_REQUIRED = ("config", "history", "audit_history", "canaries", "world_size", "noise_multiplier", *TRAINING_STATE)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message (one line) names the file and says why."""


class RunInUseError(CheckpointError):
    """Another process is writing the run's checkpoint (it holds the :class:`RunLock`)."""


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint of ``path``: ``path/checkpoint.pt`` for a run directory, else ``path`` itself."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def _reason(error: BaseException) -> str:
    """The error's type and first sentence: what a one-line message can hold."""
    first = next((line for line in str(error).splitlines() if line.strip()), "").split(". ")[0].rstrip(".")
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint in ``path`` (a file, or a run directory), migrated to the current format.

    Raises:
        CheckpointError: no such file, a file that cannot be unpickled (truncated, corrupted), or
            one that is not a privfast training checkpoint of a format this version reads.
    """
    file = checkpoint_file(path)
    if not file.is_file():
        what = f"no {CHECKPOINT_NAME} in {path}" if Path(path).is_dir() else f"no checkpoint at {file}"
        raise CheckpointError(f"{what}: expected a run directory or a {CHECKPOINT_NAME} written by `privfast train`")
    try:
        checkpoint = torch.load(file, weights_only=False)
    except Exception as error:  # unpickling fails in many ways: EOFError, RuntimeError, UnpicklingError...
        raise CheckpointError(
            f"{file} cannot be read: truncated or corrupted, or not a checkpoint ({_reason(error)})"
        ) from error
    if not isinstance(checkpoint, dict) or "format" not in checkpoint or "config" not in checkpoint:
        raise CheckpointError(
            f"{file} is not a privfast training checkpoint (format {CHECKPOINT_FORMAT}); it was not "
            "written by `privfast train`"
        )
    if checkpoint["format"] not in _READABLE:
        newer = " (written by a newer privfast)" if checkpoint["format"] > CHECKPOINT_FORMAT else ""
        readable = ", ".join(map(str, _READABLE))
        raise CheckpointError(
            f"{file} has checkpoint format {checkpoint['format']}{newer}; this privfast reads formats {readable}"
        )
    checkpoint = _migrate(checkpoint)
    missing = [key for key in _REQUIRED if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{file} is an incomplete privfast training checkpoint: it lacks {', '.join(missing)}")
    try:
        TrainConfig.from_dict(checkpoint["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"{file} holds an invalid training configuration ({' '.join(str(error).split())})"
        ) from error
    return checkpoint


def _migrate(checkpoint: dict) -> dict:
    if checkpoint["format"] == 2:  # TrainConfig.augmult was K_base; sigma was only in the records
        config = dict(checkpoint["config"])
        config["k_base"] = config.pop("augmult", 1)
        history = checkpoint.get("history") or []
        checkpoint = {
            **checkpoint,
            "format": 3,
            "config": config,
            "noise_multiplier": history[-1].get("noise_multiplier") if history else None,
        }
    return checkpoint


def write_checkpoint(checkpoint: dict, path: str | os.PathLike) -> None:
    """Write ``checkpoint`` (the dict described above, without ``format``) to ``path`` atomically."""
    atomic_save({"format": CHECKPOINT_FORMAT, **checkpoint}, path)


def describe(checkpoint: dict) -> str:
    """A run in a few words: ``"dp-sgd, 2 of 10 epochs"`` (and where it was interrupted)."""
    config, done = checkpoint["config"], len(checkpoint["history"])
    text = f"{config['method']}, {done} of {config['epochs']} epochs"
    if checkpoint.get("interrupted"):
        text += f", interrupted at step {checkpoint['interrupted']['step']} of epoch {done + 1}"
    return text


def check_overwrite(path: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run over the one in ``path`` unless ``resume`` or ``overwrite``.

    Raises:
        CheckpointError: ``path`` holds a checkpoint, and neither flag was given.
    """
    file = checkpoint_file(path)
    if resume or overwrite or not file.exists():
        return
    try:
        run = describe(read_checkpoint(file))
    except CheckpointError:
        run = f"an unreadable {file.name}"
    raise CheckpointError(f"{file.parent} already holds a run ({run}): --resume continues it, --overwrite replaces it")


def load_trained(path: str | os.PathLike) -> tuple[nn.Module, TrainConfig, list[dict]]:
    """The model, configuration and per-epoch history stored in a :class:`~privfast.trainer.Trainer` checkpoint.

    Args:
        path: a checkpoint written by :meth:`~privfast.trainer.Trainer.fit`, or its run directory.

    Returns:
        ``(model in eval mode, config, history)``: the model as it was after the last completed
        epoch (a run interrupted within an epoch keeps that epoch's steps for its resumption).

    Raises:
        CheckpointError: see :func:`read_checkpoint`; also a run stopped before its first epoch
            ended, and weights that do not fit the model of the configuration.
    """
    from privfast.data import data_shape, load_data
    from privfast.models import build_model

    file = checkpoint_file(path)
    checkpoint = read_checkpoint(file)
    config = TrainConfig.from_dict(checkpoint["config"])
    if checkpoint["model"] is None:
        raise CheckpointError(
            f"{file} holds no trained model yet: the run stopped in its first epoch (go on with "
            f"`privfast train --out {file.parent} --resume`)"
        )
    model = build_model(config, **data_shape(*load_data(config)))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"{file} holds weights that do not fit its configuration's {config.model} ({_reason(error)})"
        ) from error
    return model.eval(), config, checkpoint["history"]


class RunLock:
    """The exclusive right to write a checkpoint, held for a ``with`` block.

    The lock is the file ``<checkpoint>.lock``, created atomically (``O_EXCL``) and holding the
    writer's process id and host. It is re-entrant within a process (the command and the trainer
    it calls both take it). A lock left behind by a process of this host that no longer runs
    (killed outright) is taken over with a warning; a live owner's lock is refused.

    Args:
        checkpoint: the checkpoint file (or its run directory).

    Raises:
        RunInUseError: on entering, while another process holds the lock.
    """

    _held: ClassVar[dict[str, int]] = {}

    def __init__(self, checkpoint: str | os.PathLike):
        file = checkpoint_file(checkpoint)
        self.path = Path(os.path.abspath(file)).with_name(file.name + ".lock")
        self.run = file.parent if file.name == CHECKPOINT_NAME else file  # what the messages call it

    def __enter__(self) -> "RunLock":
        key = str(self.path)
        if self._held.get(key):
            self._held[key] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{os.getpid()} {socket.gethostname()}"
        while True:
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_or_take_over()
                continue
            with os.fdopen(handle, "w") as f:
                f.write(me + "\n")
            break
        self._held[key] = 1
        return self

    def _refuse_or_take_over(self) -> None:
        owner = _read_owner(self.path)
        if owner is None:  # removed meanwhile: try again
            return
        pid, host = owner
        if pid <= 0:
            raise RunInUseError(
                f"{self.run} is in use: its lock file {self.path} names no process (delete it if no "
                "training runs there)"
            )
        if host == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
            # Not us (we would hold it in _held), so the process that wrote it is gone.
            warnings.warn(f"{self.path}: taking over the lock of process {pid}, which no longer runs", stacklevel=3)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        where = "" if host == socket.gethostname() else f" on {host}"
        raise RunInUseError(
            f"{self.run} is in use: process {pid}{where} is training into it (lock file {self.path}; "
            "delete it if that process is gone)"
        )

    def __exit__(self, *exc) -> None:
        key = str(self.path)
        self._held[key] -= 1
        if self._held[key]:
            return
        del self._held[key]
        owner = _read_owner(self.path)
        if owner is not None and owner[0] == os.getpid():
            os.unlink(self.path)


def _read_owner(path: Path) -> tuple[int, str] | None:
    """``(pid, host)`` written in a lock file, or None once it is gone; pid 0 if it names no process.
    A lock just created is empty for an instant: it is read again until its owner has written it
    (for a second at most)."""
    for _ in range(50):
        try:
            words = path.read_text().split()
        except FileNotFoundError:
            return None
        if len(words) >= 2 and words[0].isdigit():
            return int(words[0]), words[1]
        time.sleep(0.02)
    return 0, ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
