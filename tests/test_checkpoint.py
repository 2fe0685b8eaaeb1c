"""The checkpoint format: unreadable files say which and why in one line, run directories stand for
their checkpoint, format 2 (``augmult`` for K_base) is migrated, and the run lock refuses a second
writer and takes over the lock of a dead one."""

import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch

from privfast.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    RunInUseError,
    RunLock,
    check_overwrite,
    checkpoint_file,
    load_trained,
    read_checkpoint,
)
from privfast.config import TrainConfig
from privfast.trainer import Trainer

TINY = dict(train_examples=96, width=4, batch_size=24, lr=0.5, attacks=("yeom",), audit_examples=48, audit_known=16)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory holding a 1-epoch DP-Mix checkpoint."""
    directory = tmp_path_factory.mktemp("run")
    Trainer(
        TrainConfig(method="dp-mix", k_base=2, k_self=1, epochs=1, **TINY),
        checkpoint=directory / "checkpoint.pt",
        progress=False,
    ).fit()
    return directory


def _one_line_naming(error, path):
    message = str(error.value)
    assert str(path) in message and "\n" not in message, message
    return message


def test_a_run_directory_stands_for_its_checkpoint(run, tmp_path):
    assert checkpoint_file(run) == run / "checkpoint.pt" and checkpoint_file(run / "x.pt") == run / "x.pt"
    model, config, history = load_trained(run)
    assert config.k_base == 2 and len(history) == 1
    assert read_checkpoint(run)["format"] == CHECKPOINT_FORMAT == 3
    with pytest.raises(CheckpointError, match=f"no checkpoint.pt in {tmp_path}: expected a run directory") as caught:
        read_checkpoint(tmp_path)
    _one_line_naming(caught, tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_trained(tmp_path / "missing.pt")


def _damaged(run, tmp_path):
    good = (run / "checkpoint.pt").read_bytes()
    files = {
        "truncated": good[: len(good) // 2],
        "corrupted": good[:100] + bytes(len(good) - 100),
        "empty": b"",
        "text": b"not a checkpoint at all\n",
    }
    for name, content in files.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"weights": 1}, tmp_path / "dict.pt")
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    torch.save({**checkpoint, "format": 9}, tmp_path / "future.pt")
    torch.save({key: value for key, value in checkpoint.items() if key != "history"}, tmp_path / "partial.pt")
    torch.save({**checkpoint, "config": {**checkpoint["config"], "method": "adam"}}, tmp_path / "badconfig.pt")
    return {
        "truncated": "cannot be read: truncated or corrupted",
        "corrupted": "cannot be read: truncated or corrupted",
        "empty": r"cannot be read: truncated or corrupted, or not a checkpoint \(EOFError: Ran out of input\)",
        "text": "cannot be read",
        "list": "is not a privfast training checkpoint",
        "dict": "is not a privfast training checkpoint",
        "future": r"has checkpoint format 9 \(written by a newer privfast\); this privfast reads formats 2, 3",
        "partial": "is an incomplete privfast training checkpoint: it lacks history",
        "badconfig": "holds an invalid training configuration",
    }


def test_every_unreadable_checkpoint_says_which_file_and_why_in_one_line(run, tmp_path):
    for name, message in _damaged(run, tmp_path).items():
        path = tmp_path / f"{name}.pt"
        with pytest.raises(CheckpointError, match=message) as caught:
            load_trained(path)
        _one_line_naming(caught, path)
    # A checkpoint whose weights do not fit the model its configuration describes.
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    torch.save({**checkpoint, "config": {**checkpoint["config"], "width": 8}}, tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match="holds weights that do not fit its configuration's convnet") as caught:
        load_trained(tmp_path / "wide.pt")
    _one_line_naming(caught, tmp_path / "wide.pt")
    assert issubclass(CheckpointError, ValueError)


def test_format_2_checkpoints_are_migrated(run, tmp_path):
    # Format 2 stored K_base as `augmult` and the noise multiplier only in the records.
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    config = {("augmult" if key == "k_base" else key): value for key, value in checkpoint["config"].items()}
    old = {**{k: v for k, v in checkpoint.items() if k != "noise_multiplier"}, "format": 2, "config": config}
    torch.save(old, tmp_path / "old.pt")

    migrated = read_checkpoint(tmp_path / "old.pt")
    assert migrated["format"] == 3 and migrated["config"]["k_base"] == 2 and "augmult" not in migrated["config"]
    assert migrated["noise_multiplier"] == checkpoint["history"][-1]["noise_multiplier"]
    _, loaded, _ = load_trained(tmp_path / "old.pt")
    assert loaded.k_base == 2 and loaded.augmult == 3

    # It resumes, and is written back in the current format.
    resumed = Trainer(
        TrainConfig(method="dp-mix", k_base=2, k_self=1, epochs=2, **TINY),
        checkpoint=tmp_path / "old.pt",
        progress=False,
    )
    assert [r["epoch"] for r in resumed.fit(resume=True)] == [1, 2]
    assert torch.load(tmp_path / "old.pt", weights_only=False)["format"] == CHECKPOINT_FORMAT


def test_check_overwrite_refuses_a_run_unless_told(run, tmp_path):
    with pytest.raises(
        CheckpointError,
        match=rf"{run} already holds a run \(dp-mix, 1 of 1 epochs\): --resume "
        "continues it, --overwrite replaces it",
    ):
        check_overwrite(run / "checkpoint.pt", resume=False, overwrite=False)
    check_overwrite(run / "checkpoint.pt", resume=True, overwrite=False)
    check_overwrite(run / "checkpoint.pt", resume=False, overwrite=True)
    check_overwrite(tmp_path / "checkpoint.pt", resume=False, overwrite=False)  # nothing there
    (tmp_path / "checkpoint.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"already holds a run \(an unreadable checkpoint.pt\)"):
        check_overwrite(tmp_path, resume=False, overwrite=False)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_run_lock_refuses_a_second_writer_naming_the_directory_and_process(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    lock = tmp_path / "checkpoint.pt.lock"
    with RunLock(checkpoint):
        assert lock.read_text().split()[0] == str(os.getpid())
        with RunLock(checkpoint):  # re-entrant: the command and its trainer both take it
            pass
        assert lock.exists()
    assert not lock.exists()

    # A live process holds it (our parent): refused, in one line naming the run directory and the pid.
    lock.write_text(f"{os.getppid()} {socket.gethostname()}\n")
    with pytest.raises(RunInUseError, match=rf"{tmp_path} is in use: process {os.getppid()} is training into it") as c:
        with RunLock(checkpoint):
            pass
    _one_line_naming(c, tmp_path)
    trainer = Trainer(TrainConfig(method="nonprivate", epochs=1, **TINY), checkpoint=checkpoint, progress=False)
    with pytest.raises(RunInUseError):
        trainer.fit()
    assert not checkpoint.exists() and lock.read_text().split()[0] == str(os.getppid())  # not taken from its owner

    # A process of another host may be alive: refused too.
    lock.write_text(f"{_dead_pid()} elsewhere\n")
    with pytest.raises(RunInUseError, match="on elsewhere is training into it"):
        with RunLock(checkpoint):
            pass

    # A dead process's lock is taken over, with a warning.
    dead = _dead_pid()
    lock.write_text(f"{dead} {socket.gethostname()}\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit()
    assert [str(w.message) for w in caught if "taking over" in str(w.message)] == [
        f"{lock}: taking over the lock of process {dead}, which no longer runs"
    ]
    assert checkpoint.exists() and not lock.exists()

    # A lock file naming no process (not written by privfast) is not taken over.
    lock.write_text("")
    with pytest.raises(RunInUseError, match="names no process"):
        with RunLock(checkpoint):
            pass
