"""Training loop behind ``privfast train``: non-private, DP-SGD, Self-Aug, DP-Mix, DP-Mix_Diff, SAM or
DP-SAM, with a membership audit after every epoch, optional canaries, atomic checkpoints and exact resume.

A run is described by a :class:`~privfast.config.TrainConfig` (plain values, so it is stored in
every checkpoint and in the reports) and executed by :class:`Trainer`::

    config = TrainConfig(method="dp-mix", k_base=2, k_self=2, epochs=10, target_epsilon=8)
    trainer = Trainer(config, checkpoint="run/checkpoint.pt")
    history = trainer.fit()            # after a crash or Ctrl-C, fit(resume=True) goes on
    history[-1]["test_accuracy"], history[-1]["epsilon"], history[-1]["calibrated"]["auc"]

Exact resume: every source of randomness of an epoch (Poisson sampling, shuffling, augmentation
draws) is torch's global CPU generator, and the checkpoint (:mod:`privfast.checkpoint`) written
after each epoch holds its state together with the model, the optimizer, the accountant and the DP
noise generator. A run stopped after epoch e and resumed therefore makes the very same updates as
one never stopped. Ctrl-C lets the step in progress finish, saves the state reached with the
random state the epoch began with, and stops (:class:`TrainingInterrupted`); resuming replays that
epoch's draws up to the step reached (batches are drawn and augmented, not trained on) and goes on
from there, exactly. A run killed outright redoes the epoch in progress.

Data: :func:`~privfast.data.load_data` (the first ``train_examples`` rows of the training split;
dp-mix-diff's public pool is the last rows, :func:`~privfast.data.load_pool`). Canaries
(:func:`~privfast.canaries.make_canaries`, drawn from ``seed``) are appended ``canary_repeats``
times to the private training set and stored in the checkpoint for ``privfast audit``.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from privfast._io import nested_progress
from privfast.attacks.exposure import insert_canaries
from privfast.audit import MembershipAudit
from privfast.canaries import make_canaries
from privfast.checkpoint import TRAINING_STATE, RunLock, check_overwrite, read_checkpoint, write_checkpoint
from privfast.config import TrainConfig, check_resume
from privfast.data import Split, data_shape, load_data, load_pool
from privfast.models import build_model
from privfast.optim import SAM
from privfast.privacy_engine import PrivacyEngine

__all__ = ["Trainer", "TrainingInterrupted"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :meth:`Trainer.fit` between two steps; the state reached is in the checkpoint.

    A :class:`KeyboardInterrupt`, so that code which does not expect it stops as on any Ctrl-C.

    Attributes:
        checkpoint: the checkpoint holding the state reached (None: the trainer had none; nothing saved).
        epoch: the epoch (1-based) in progress, or the last one completed when ``step == steps``.
        step: steps of that epoch done.
        steps: steps of an epoch.
    """

    def __init__(self, checkpoint, *, epoch: int, step: int, steps: int):
        self.checkpoint, self.epoch, self.step, self.steps = checkpoint, epoch, step, steps
        where = f"after epoch {epoch}" if step == steps else f"after step {step} of {steps} of epoch {epoch}"
        saved = f"; saved in {checkpoint}" if checkpoint is not None else "; nothing saved (no checkpoint)"
        super().__init__(f"training stopped {where}{saved}")


class _StoppedWithinEpoch(Exception):
    def __init__(self, step: int, loss_sum: float, rows: int, epoch_rng: Tensor):
        self.step, self.loss_sum, self.rows, self.epoch_rng = step, loss_sum, rows, epoch_rng


class _DeferredInterrupt:
    """Within the block, the first Ctrl-C only sets ``requested`` (the loop ends the step in
    progress, saves and stops); a second one raises :class:`KeyboardInterrupt` at once. Installed
    only in the main thread and over Python's default handler (a program's own handler stays)."""

    def __init__(self, enabled: bool):
        self.enabled, self.requested, self._previous = enabled, False, None

    def __enter__(self) -> "_DeferredInterrupt":
        if (
            self.enabled
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: stopping after the step in progress and saving (Ctrl-C again stops at once, unsaved)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    # An empty Poisson batch still steps (the update is pure noise); its mean loss would be NaN.
    return F.cross_entropy(logits, targets) if len(targets) else logits.sum() * 0.0


class Trainer:
    """Trains one model by :class:`~privfast.config.TrainConfig`, auditing membership leakage after every epoch.

    Args:
        config: the run.
        data: ``(train, test)`` splits; default: :func:`~privfast.data.load_data` of ``config``.
        checkpoint: file rewritten (atomically) after every epoch, and read by ``fit(resume=True)``.
        callbacks: called as ``callback(trainer, record)`` after each epoch's record is complete.
        progress: show progress bars: over epochs, and over the steps of an epoch when standard
            error is a terminal (nested bars leave cursor escapes in a redirected log).
        distributed: a :class:`privfast.distributed.DistributedContext` to train across processes
            (private methods only); None trains in this process.

    Attributes:
        model: the plain model (not the per-example gradient wrapper).
        engine: the :class:`~privfast.privacy_engine.PrivacyEngine` of a private run, else None.
        history: one record per epoch: ``epoch``, ``train_loss``, ``test_accuracy``,
            ``train_accuracy``, one dict per attack (``auc``, ``decision_advantage``, ``p_err``,
            ``best_advantage``, ``tpr_at_fpr``), ``steps`` (optimizer steps so far), and for
            private runs ``epsilon``, ``dp_perr_bound`` (the lower bound
            ``(1 - delta) / (1 + e^epsilon)`` on P_err) and ``noise_multiplier`` (sigma).
        canaries: the inserted canaries ``x [M, C, H, W], y [M]`` (M = ``config.canaries``, may be 0).
        canary_references: their never-inserted reference candidates ``x [R, C, H, W], y [R]``.

    Raises:
        ValueError: distributed training of a non-private method, or more examples known to the
            audit's attacker (``--audit-known``) than it attacks.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        data: Optional[tuple[Split, Split]] = None,
        checkpoint: Optional[str | os.PathLike] = None,
        callbacks: Iterable[Callable[["Trainer", dict], object]] = (),
        progress: bool = True,
        distributed=None,
    ):
        if distributed is not None and not config.private:
            raise ValueError(
                f"distributed training (--nproc) is implemented for the private methods only, not "
                f"--method {config.method}"
            )
        self.config = config
        self.train_split, self.test_split = data if data is not None else load_data(config)
        attacked = min(len(self.train_split.y), len(self.test_split.y), config.audit_examples)
        if config.attacks and config.audit_known >= attacked:
            raise ValueError(
                f"--audit-known {config.audit_known} must be below {attacked}, the members and "
                "non-members the audit attacks (the fewest of --audit-examples "
                f"{config.audit_examples}, the {len(self.train_split.y)} training and the "
                f"{len(self.test_split.y)} test examples)"
            )
        self.checkpoint = checkpoint
        self.callbacks = list(callbacks)
        self.progress = progress
        self.distributed = distributed
        self.shape = data_shape(self.train_split, self.test_split)
        self.augmenter = config.augmenter(
            self.shape["num_classes"], pool=load_pool(config) if config.method == "dp-mix-diff" else None
        )
        self.canaries, self.canary_references = make_canaries(config, shape=self.shape)
        self.history: list[dict] = []
        self.engine: Optional[PrivacyEngine] = None

        torch.manual_seed(config.seed)
        self.model = build_model(config, **self.shape)
        sgd = dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        if config.method in ("sam", "dp-sam"):  # PrivacyEngine turns a SAM into DP-SAM
            optimizer = SAM(self.model.parameters(), torch.optim.SGD, rho=config.rho, **sgd)
        else:
            optimizer = torch.optim.SGD(self.model.parameters(), **sgd)
        # The audit's members stay the real training examples: canaries are scored by exposure.
        trained_on = insert_canaries(self.train_split, self.canaries, repeats=config.canary_repeats)
        dataset = TensorDataset(trained_on.x, trained_on.y)
        if config.private:
            self.engine = PrivacyEngine()
            self.trained, self.optimizer, self.loader = self._make_private(optimizer, dataset)
        else:
            self.trained, self.optimizer = self.model, optimizer
            self.loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True)
        self.audit = MembershipAudit(
            self.train_split,
            self.test_split,
            attacks=config.attacks,
            max_examples=config.audit_examples,
            n_known=config.audit_known,
            epsilon=(lambda: self.engine.get_epsilon(config.delta)) if self.engine else None,
            delta=config.delta,
            seed=config.seed,
        )

    def _make_private(self, optimizer: torch.optim.Optimizer, dataset: TensorDataset):
        config = self.config
        # The loop augments each batch (not the loader's collate), so that one loop serves the
        # single-process and the distributed loaders alike.
        args = dict(
            module=self.model,
            optimizer=optimizer,
            max_grad_norm=config.max_grad_norm,
            augmult=config.augmult,
            grad_sample_mode=config.grad_sample_mode,
            data_loader=DataLoader(dataset, batch_size=config.batch_size),
        )
        if config.target_epsilon is not None:
            args.update(target_epsilon=config.target_epsilon, target_delta=config.delta, epochs=config.epochs)
        else:
            args.update(noise_multiplier=config.noise_multiplier)
        if self.distributed is not None:
            return self.distributed.make_private(self.engine, **args)
        if config.target_epsilon is not None:
            return self.engine.make_private_with_epsilon(**args)
        return self.engine.make_private(**args)

    @property
    def noise_multiplier(self) -> Optional[float]:
        """sigma of a private run (searched when ``target_epsilon`` is set), else None."""
        return self.optimizer.noise_multiplier if self.engine is not None else None

    @property
    def _sam(self) -> Optional[SAM]:
        """The SAM optimizer of a sam / dp-sam run (inside DP-SAM's wrapper), else None."""
        return next(
            (o for o in (self.optimizer, getattr(self.optimizer, "original_optimizer", None)) if isinstance(o, SAM)),
            None,
        )

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints and reports (rank 0, or the only process)."""
        return self.distributed is None or self.distributed.rank == 0

    # -- training ---------------------------------------------------------------------------
    def _augment(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.augmenter(x, y) if self.augmenter is not None else (x, y)

    def _step(self, x: Tensor, y: Tensor) -> Tensor:
        """One optimizer step on an (augmented) batch; returns its summed loss (a float64 scalar on the
        device: reading it every step would stall a GPU step on a host sync)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = _soft_cross_entropy(self.trained(x), y)
        loss.backward()
        if self._sam is not None:
            # SAM's second gradient, at the perturbed weights, on the same (augmented) batch.
            self.optimizer.step(lambda: _soft_cross_entropy(self.trained(x), y).backward())
        else:
            self.optimizer.step()
        return loss.detach().double() * len(y)

    def _train_epoch(self, epoch: int, interrupt: _DeferredInterrupt, partial: Optional[dict] = None) -> float:
        """The mean training loss of epoch ``epoch`` (0-based), continued from ``partial`` (an
        interrupted checkpoint's state) when given.

        Raises:
            _StoppedWithinEpoch: Ctrl-C before the last step; the steps done are kept.
        """
        self.model.train()
        if partial is not None:
            torch.set_rng_state(partial["epoch_rng"])
        epoch_rng = torch.get_rng_state()
        batches = iter(self.loader)  # draws from the generator too (the loader's base seed, a shuffle)
        done, total, rows = 0, 0.0, 0
        device = next(self.model.parameters()).device
        if partial is not None:
            # Replay the draws of the steps already made (batch sampling, augmentations: nothing
            # else of a step touches the global generator) so that the loader stands where it stood.
            for _ in range(partial["step"]):
                self._augment(*next(batches))
            torch.set_rng_state(partial["rng"])
            done, total, rows = partial["step"], partial["loss_sum"], partial["rows"]
        total = torch.tensor(total, dtype=torch.float64, device=device)  # read once, at the end or a stop
        steps = len(self.loader)
        nested = nested_progress(self.progress)  # the bar over steps, inside the one over epochs
        with tqdm(
            total=steps, initial=done, desc=f"epoch {epoch + 1}", unit="step", disable=not nested, leave=False
        ) as bar:
            for x, y in batches:
                x, y = self._augment(x, y)
                total += self._step(x, y)
                rows += len(y)
                done += 1
                bar.update()
                if interrupt.requested and done < steps:
                    raise _StoppedWithinEpoch(done, float(total), rows, epoch_rng)
        return float(total) / rows if rows else math.nan

    def fit(self, *, resume: bool = False, overwrite: bool = False) -> list[dict]:
        """Train up to ``config.epochs`` epochs, auditing and checkpointing after each.

        While it runs, the checkpoint's :class:`~privfast.checkpoint.RunLock` refuses other
        writers. Ctrl-C lets the step in progress finish, saves the state reached (when there is a
        checkpoint) and raises :class:`TrainingInterrupted`; ``fit(resume=True)`` then goes on
        exactly. A second Ctrl-C stops at once, keeping the last checkpoint.

        Args:
            resume: continue from ``checkpoint`` if it exists; without a checkpoint file, start
                afresh. The configuration may differ from the stored one in ``epochs`` and
                ``data_root`` only, and in the spelling of the noise (``target_epsilon`` dropped
                for the ``noise_multiplier`` it chose, to train past the target) as long as the
                noise multiplier stays the one trained with.
            overwrite: start afresh even though ``checkpoint`` holds a run (replaced when this one
                completes its first epoch).

        Returns:
            :attr:`history`, one record per epoch trained so far.

        Raises:
            ValueError: ``resume`` without a checkpoint path, or a checkpoint of another run.
            privfast.checkpoint.CheckpointError: ``checkpoint`` holds a run and neither ``resume``
                nor ``overwrite`` was given; the checkpoint cannot be read; another process holds
                its lock (:class:`~privfast.checkpoint.RunInUseError`).
            TrainingInterrupted: Ctrl-C.
        """
        if resume and self.checkpoint is None:
            raise ValueError("resume=True needs the checkpoint path given to Trainer(checkpoint=...)")
        # Distributed: the launcher holds the lock (its processes' ranks all live as long as it does).
        lock = RunLock(self.checkpoint) if self.checkpoint is not None and self.distributed is None else None
        with lock or contextlib.nullcontext():
            if self.checkpoint is not None:
                check_overwrite(self.checkpoint, resume=resume, overwrite=overwrite)
            partial = None
            if resume and os.path.isfile(self.checkpoint):
                partial = self._restore(read_checkpoint(self.checkpoint))
            # Across processes a Ctrl-C reaches each at its own moment: stopping at once keeps them in step.
            with (
                _DeferredInterrupt(enabled=self.distributed is None) as interrupt,
                tqdm(
                    range(len(self.history), self.config.epochs),
                    desc=self.config.method,
                    unit="epoch",
                    disable=not self.progress,
                ) as bar,
            ):
                for epoch in bar:
                    try:
                        train_loss = self._train_epoch(epoch, interrupt, partial)
                    except _StoppedWithinEpoch as stop:
                        self._save_interrupted(epoch, stop)
                        raise TrainingInterrupted(
                            self.checkpoint, epoch=epoch + 1, step=stop.step, steps=len(self.loader)
                        ) from None
                    partial = None
                    self._end_epoch(epoch, train_loss, bar)
                    if interrupt.requested and epoch + 1 < self.config.epochs:
                        raise TrainingInterrupted(
                            self.checkpoint, epoch=epoch + 1, step=len(self.loader), steps=len(self.loader)
                        )
        return self.history

    def _end_epoch(self, epoch: int, train_loss: float, bar) -> None:
        # Distributed processes hold identical models and each audits its own: the records agree
        # without another collective (the audit's draws are seeded, not taken from the global RNG).
        record = {
            **self.audit(self.model, epoch + 1),
            "train_loss": train_loss,
            "steps": (epoch + 1) * len(self.loader),
        }  # every epoch makes len(loader) steps
        if self.engine is not None:  # searched when target_epsilon is set: the config does not hold it
            record["noise_multiplier"] = self.optimizer.noise_multiplier
        self.history.append(record)
        bar.set_postfix(
            acc=f"{record['test_accuracy']:.3f}", **({"eps": f"{record['epsilon']:.2f}"} if "epsilon" in record else {})
        )
        if self.checkpoint is not None:
            state = {**self._run_state(), **self._training_state()}  # a collective when distributed
            if self.is_main:
                write_checkpoint(state, self.checkpoint)
        for callback in self.callbacks:
            callback(self, record)

    # -- checkpoints --------------------------------------------------------------------------
    def _run_state(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "world_size": 1 if self.distributed is None else self.distributed.world_size,
            "noise_multiplier": self.noise_multiplier,
            "history": self.history,
            "audit_history": self.audit.history,
            "canaries": {
                "x": self.canaries.x,
                "y": self.canaries.y,
                "references_x": self.canary_references.x,
                "references_y": self.canary_references.y,
            },
        }

    def _training_state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            # SAM keeps the descent optimizer's state (momentum) in its base optimizer, outside its state_dict.
            "sam_base_optimizer": self._sam.base_optimizer.state_dict() if self._sam is not None else None,
            "privacy_engine": self.engine.state_dict() if self.engine is not None else None,
            # Each process's own stream (batches, augmentations), restored to the same process.
            "rng": torch.get_rng_state() if self.distributed is None else self.distributed.gather_rng_states(),
        }

    def _save_interrupted(self, epoch: int, stop: _StoppedWithinEpoch) -> None:
        """Keep the last completed epoch as it is (readers of the checkpoint see that run) and add
        the state reached within ``epoch`` for :meth:`fit` to resume from."""
        if self.checkpoint is None:
            return
        if self.history:  # the file holds this run's last completed epoch (written or restored here)
            saved = read_checkpoint(self.checkpoint)
            boundary = {key: saved[key] for key in TRAINING_STATE}
        else:
            boundary = dict.fromkeys(TRAINING_STATE)
        interrupted = {
            **self._training_state(),
            "epoch": epoch,
            "step": stop.step,
            "loss_sum": stop.loss_sum,
            "rows": stop.rows,
            "epoch_rng": stop.epoch_rng,
        }
        write_checkpoint({**self._run_state(), **boundary, "interrupted": interrupted}, self.checkpoint)

    def _restore(self, checkpoint: dict) -> Optional[dict]:
        """Load ``checkpoint`` into this trainer; returns its interrupted epoch's state, if any, to go on from."""
        try:
            check_resume(TrainConfig.from_dict(checkpoint["config"]), self.config)
        except ValueError as error:
            raise ValueError(f"{self.checkpoint}: {error}") from None
        world_size = 1 if self.distributed is None else self.distributed.world_size
        if checkpoint["world_size"] != world_size:
            raise ValueError(
                f"{self.checkpoint} was trained in {checkpoint['world_size']} process(es): resume it "
                f"with --nproc {checkpoint['world_size']}, not {world_size}"
            )
        if checkpoint["noise_multiplier"] != self.noise_multiplier:
            raise ValueError(
                self._noise_changed(TrainConfig.from_dict(checkpoint["config"]), checkpoint["noise_multiplier"])
            )
        interrupted = checkpoint.get("interrupted")
        if interrupted is not None and len(checkpoint["history"]) >= self.config.epochs:
            interrupted = None  # no epoch left to go on with: the completed ones are the run
        state = interrupted or checkpoint
        if state["model"] is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self._sam is not None:
                self._sam.base_optimizer.load_state_dict(state["sam_base_optimizer"])
                # Loading replaced the base optimizer's groups: share them with SAM again, as its constructor does.
                self._sam.param_groups = self._sam.base_optimizer.param_groups
            if self.engine is not None:
                self.engine.load_state_dict(state["privacy_engine"])
            rng = state["rng"]
            torch.set_rng_state(rng if self.distributed is None else rng[self.distributed.rank])
        self.history = list(checkpoint["history"])
        self.audit.history = list(checkpoint["audit_history"])
        return interrupted

    def _noise_changed(self, stored: TrainConfig, trained_with: Optional[float]) -> str:
        now = self.noise_multiplier
        if stored.target_epsilon is not None and self.config.target_epsilon is not None:
            return (
                f"{self.checkpoint} trained at the noise multiplier {trained_with!r} that --target-epsilon "
                f"{stored.target_epsilon:g} chose for --epochs {stored.epochs}; --epochs {self.config.epochs} at "
                f"--target-epsilon {self.config.target_epsilon:g} needs {now:.4g}, which the epochs trained "
                "did not have. For that run start a new one (another --out, or --overwrite); to go on at the "
                f"same noise, letting epsilon grow past {stored.target_epsilon:g}, resume with "
                f"--target-epsilon none --noise-multiplier {trained_with!r}"
            )
        return (
            f"{self.checkpoint} trained at the noise multiplier {trained_with!r}, this configuration gives "
            f"{now!r}: the noise cannot change on resume (give --noise-multiplier {trained_with!r}, or start a "
            "new run)"
        )
