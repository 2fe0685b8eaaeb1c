"""PrivacyEngine: Opacus's entry point, with augmentation multiplicity, DP-Mix and fast clipping.

An Opacus user changes the import; ``make_private`` takes the same arguments (Opacus's
``grad_sample_mode`` names, ``clipping="flat"``, ``criterion``) plus ``augmult`` / ``augmentation``.
Accountants, Poisson sampling and physical batching are Opacus's own.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Optional

import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from privfast._io import atomic_save
from privfast.augment import DPMix
from privfast.data_loader import SecureUniformWithReplacementSampler, observe_batches, rebuild_data_loader
from privfast.grad_sample import GradSampleModule
from privfast.grad_sample.engine import LOSS_REDUCTIONS, MEASURED_PLANS
from privfast.optim import SAM, DPOptimizer, DPSAMOptimizer
from privfast.optim.optimizer import check_privacy_args

# Opacus's grad_sample_mode names for its ways of building per-sample gradients (hooks, functorch, expanded
# weights): all clip the same exact per-example gradients, which "auto" computes by the cheapest rule per layer.
_OPACUS_MODES = {"hooks": "auto", "functorch": "auto", "ew": "auto"}


class _AugmentingCollate:
    """``collate`` followed by the augmenter, so that physical batches are augmented after splitting."""

    def __init__(self, collate, augmentation: DPMix):
        self.collate, self.augmentation = collate, augmentation

    def __call__(self, batch):
        x, y = self.collate(batch)
        return self.augmentation(x, y)


@contextlib.contextmanager
def _prv_domain_bound(mechanism: str):
    """Silence one Opacus warning of the PRV accountant that does not concern its result.

    PRV accounting (Gopi et al., "Numerical Composition of Differential Privacy", NeurIPS 2021)
    sizes the domain it discretizes the privacy loss on with an RDP bound over orders up to 63
    (``opacus.accountants.analysis.prv.domain.compute_safe_domain_size``). At large noise, which
    the noise search probes (sigma = 20, 10, 5), the best order lies beyond 63 and RDP warns
    "Optimal order is the largest alpha". The bound is then only looser: the domain is larger
    than needed, which is safe, and the epsilon computed on it keeps its error bound (with orders
    up to 2^20 instead: epsilons within 1e-12, the same searched noise multipliers). The RDP
    accountant (``"rdp"``) keeps the warning: there the bound is the epsilon.
    """
    with warnings.catch_warnings():
        if mechanism == "prv":
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
        yield


class PrivacyEngine:
    """Makes a model, optimizer and data loader private, and accounts for the privacy spent.

    Args:
        accountant: ``"prv"`` (the default, as in Opacus), ``"rdp"`` or ``"gdp"`` (Opacus's
            accountants).
        secure_mode: draw the noise keys and the Poisson batches from the operating system's
            entropy (not reproducible), where Opacus uses torchcsprng. A loader that is not
            Poisson-sampled (``poisson_sampling=False``) keeps its own shuffling.
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False):
        self.accountant = create_accountant(mechanism=accountant)
        self.secure_mode = secure_mode
        self.noise_generator: Optional[torch.Generator] = None

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        augmult: int = 1,
        augmentation: Optional[DPMix] = None,
        poisson_sampling: bool = True,
        grad_sample_mode: str = "auto",
        loss_reduction: str = "mean",
        microbatch_size: int = 1,
        noise_generator: Optional[torch.Generator] = None,
        check_finite: bool = True,
        batch_first: Optional[bool] = None,
        criterion: Optional[nn.Module] = None,
        clipping: str = "flat",
    ) -> tuple:
        """Wrap the training objects for DP-SGD with augmentation multiplicity.

        Args:
            module: the model (batch-first, no BatchNorm: see ``opacus.validators.ModuleValidator.fix``).
            optimizer: any torch optimizer over ``module``'s parameters; a :class:`~privfast.optim.SAM`
                becomes DP-SAM.
            data_loader: yields ``(x [B, ...], y [B])``.
            noise_multiplier: sigma >= 0; the noise std on the averaged gradient is
                ``sigma * C / expected_batch_size``.
            max_grad_norm: the clipping bound C > 0.
            augmult: K, the rows each example occupies in a batch, when the training loop expands
                the batch itself.
            augmentation: a :class:`~privfast.augment.SelfAug` / :class:`~privfast.augment.DPMix`;
                the returned loader yields its ``(x [B*K, ...], soft labels [B*K, classes])`` and K is
                taken from it.
            poisson_sampling: sample each example with probability ``1 / len(data_loader)`` (Opacus's
                DPDataLoader), as the accounting assumes.
            grad_sample_mode: ``"auto"``, ``"materialize"``, ``"ghost"`` or ``"bk"`` (see
                :class:`~privfast.grad_sample.GradSampleModule`). Opacus's ``"hooks"``, ``"functorch"``
                and ``"ew"`` run ``"auto"``: the same exact per-example clipping.
            loss_reduction: ``"mean"`` or ``"sum"``.
            microbatch_size: clip the mean gradient of this many consecutive examples (1: per-example
                clipping). Above 1 the sensitivity is 2C and the accounting says so.
            noise_generator: source of the noise keys; default: a new generator seeded from torch's
                default generator (so ``torch.manual_seed`` reproduces a run).
            check_finite: refuse to step on a non-finite per-example gradient (e.g. a NaN loss).
            batch_first: whether the model takes the examples in dimension 0 (``[N, T, ...]``) or 1
                (``[T, N, ...]``, torch's default for RNNs and attention); as in Opacus. None: True,
                but a layer call whose two leading dimensions both have N entries is refused rather
                than guessed. Layers inside a module that declares ``batch_first`` (Opacus's DP RNNs
                and attention, transformer layers) follow that module. Each batch the loader yields is
                checked against the model's input: the wrong layout raises instead of clipping time
                steps as examples.
            criterion: the loss, as Opacus takes it for ghost clipping. Where given, its reduction
                must be ``loss_reduction``. It comes back unchanged (a plain ``loss.backward()``
                clips in every mode), in Opacus's place for ``grad_sample_mode="ghost"``.
            clipping: ``"flat"``, the only one: each example's whole gradient is clipped to
                ``max_grad_norm``.

        Returns:
            ``(model, optimizer, data_loader)`` to train with as before; ``(model, optimizer,
            criterion, data_loader)`` for ``grad_sample_mode="ghost"`` with a ``criterion``, as
            Opacus returns them.

        Raises:
            ValueError: on bad privacy parameters, an optimizer over other parameters, a model
                DP-SGD cannot train, ``augmult`` disagreeing with ``augmentation``, microbatches
                with Poisson sampling (whose batches do not split into whole microbatches), a
                clipping other than flat, or a criterion reducing otherwise than ``loss_reduction``.
        """
        check_privacy_args(noise_multiplier, max_grad_norm)  # before building anything
        if clipping != "flat":
            raise ValueError(
                f"clipping={clipping!r} is not supported: privfast clips each example's whole gradient to "
                "max_grad_norm (clipping='flat'); per-layer and adaptive clipping are not implemented"
            )
        reduction = getattr(criterion, "reduction", None)
        if reduction in LOSS_REDUCTIONS and reduction != loss_reduction:
            # The engine turns row gradients into per-example ones by loss_reduction: a mismatch scales every
            # per-example gradient by the batch's rows (or their inverse) before clipping, with no error.
            raise ValueError(
                f"the criterion reduces by {reduction!r} but loss_reduction={loss_reduction!r}: pass "
                f"loss_reduction={reduction!r}, as the loss the model is trained with reduces"
            )
        opacus_ghost = criterion is not None and grad_sample_mode == "ghost"
        grad_sample_mode = _OPACUS_MODES.get(grad_sample_mode, grad_sample_mode)
        if augmentation is not None:
            if augmult not in (1, augmentation.augmult):
                raise ValueError(
                    f"augmult={augmult} but the augmentation makes K={augmentation.augmult} rows per example"
                )
            augmult = augmentation.augmult
        if microbatch_size > 1 and poisson_sampling:
            raise ValueError(
                "microbatches need batches that split into whole microbatches, which Poisson batches do not: pass "
                "poisson_sampling=False and a loader with a batch size divisible by microbatch_size and drop_last=True"
            )
        if noise_generator is not None and self.secure_mode:
            raise ValueError("secure_mode draws noise from the operating system: do not pass a noise_generator")
        model = GradSampleModule(
            module,
            mode=grad_sample_mode,
            augmult=augmult,
            microbatch_size=microbatch_size,
            loss_reduction=loss_reduction,
            batch_first=batch_first,
        )
        loader = self._prepare_data_loader(data_loader, poisson_sampling=poisson_sampling, augmentation=augmentation)
        loader = observe_batches(loader, model.expect_batch)
        sample_rate = 1 / len(data_loader)
        expected_batch_size = int(len(data_loader.dataset) * sample_rate)
        if noise_generator is None:
            device = next(module.parameters()).device
            noise_generator = torch.Generator(device=device)
            noise_generator.manual_seed(int(torch.randint(0, 2**62, ())))
        self.noise_generator = noise_generator
        optimizer_class = DPSAMOptimizer if isinstance(optimizer, SAM) else DPOptimizer
        private_optimizer = optimizer_class(
            optimizer,
            module=model,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=noise_generator,
            secure_mode=self.secure_mode,
            check_finite=check_finite,
        )

        def account(opt: DPOptimizer) -> None:
            self.accountant.step(noise_multiplier=opt.accounting_noise_multiplier, sample_rate=sample_rate)

        private_optimizer.attach_step_hook(account)
        if opacus_ghost:
            return model, private_optimizer, criterion, loader
        return model, private_optimizer, loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float,
        epsilon_tolerance: float = 0.01,
        **kwargs: Any,
    ):
        """As :meth:`make_private`, with the noise multiplier that spends ``(target_epsilon,
        target_delta)`` in ``epochs`` epochs (accounting for DP-SAM's two releases per step and
        the doubled sensitivity of microbatches).

        Raises:
            ValueError: on a non-positive target or epoch count, or a budget too small to reach.
        """
        if not (target_epsilon > 0 and 0 < target_delta < 1 and epochs > 0):
            raise ValueError(
                f"need target_epsilon > 0, 0 < target_delta < 1, epochs > 0; got "
                f"{target_epsilon}, {target_delta}, {epochs}"
            )
        sample_rate = 1 / len(data_loader)
        releases = DPSAMOptimizer.releases_per_step if isinstance(optimizer, SAM) else DPOptimizer.releases_per_step
        with _prv_domain_bound(self.accountant.mechanism()):
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                sample_rate=sample_rate,
                steps=int(epochs / sample_rate) * releases,
                accountant=self.accountant.mechanism(),
                epsilon_tolerance=epsilon_tolerance,
            )
        sensitivity = 2 if kwargs.get("microbatch_size", 1) > 1 else 1
        return self.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=sigma * sensitivity,
            max_grad_norm=max_grad_norm,
            **kwargs,
        )

    def _prepare_data_loader(
        self, data_loader: DataLoader, *, poisson_sampling: bool, augmentation: Optional[DPMix]
    ) -> DataLoader:
        if augmentation is not None:
            data_loader = rebuild_data_loader(
                data_loader, collate_fn=_AugmentingCollate(data_loader.collate_fn, augmentation)
            )
        if not poisson_sampling:
            return data_loader
        poisson = DPDataLoader.from_data_loader(data_loader)
        if not self.secure_mode:
            return poisson
        return rebuild_data_loader(
            poisson,
            batch_sampler=SecureUniformWithReplacementSampler(
                num_samples=len(poisson.dataset), sample_rate=poisson.sample_rate
            ),
        )

    def get_epsilon(self, delta: float) -> float:
        """The epsilon spent so far at ``delta``."""
        with _prv_domain_bound(self.accountant.mechanism()):
            return self.accountant.get_epsilon(delta)

    def membership_error_bound(self, delta: float) -> float:
        """Lower bound on a membership attacker's error at the epsilon spent so far (:func:`metrics.dp_perr_bound`)."""
        from privfast import metrics  # scipy and scikit-learn load only when asked

        return metrics.dp_perr_bound(self.get_epsilon(delta), delta)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The accountant's history, the noise generator's state (the noise counter) and the
        per-example gradient plans ``auto`` timed (so that a resumed run computes as before)."""
        return {
            "accountant": self.accountant.state_dict(),
            "noise_generator": None if self.noise_generator is None else self.noise_generator.get_state(),
            "grad_sample_plans": dict(MEASURED_PLANS),  # auto's timed choices: a resumed run computes alike
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; call after ``make_private`` so that the generator exists."""
        self.accountant.load_state_dict(state["accountant"])
        MEASURED_PLANS.update(state.get("grad_sample_plans", {}))
        if state["noise_generator"] is not None:
            if self.noise_generator is None:
                raise ValueError("this engine has no noise generator yet: call make_private before load_state_dict")
            self.noise_generator.set_state(state["noise_generator"])

    def save_checkpoint(
        self,
        *,
        path: str | os.PathLike,
        module: nn.Module,
        optimizer: Optional[Optimizer] = None,
        checkpoint_dict: Optional[dict] = None,
    ) -> None:
        """Write model, optimizer and engine state to ``path`` atomically (a crash leaves the old file).

        The accountant's state also goes where Opacus keeps it (``privacy_accountant_state_dict``), so that
        Opacus's ``load_checkpoint`` resumes the run too."""
        checkpoint = dict(checkpoint_dict or {})
        checkpoint["module_state_dict"] = module.state_dict()
        checkpoint["privacy_engine_state_dict"] = self.state_dict()
        checkpoint["privacy_accountant_state_dict"] = self.accountant.state_dict()
        if optimizer is not None:
            checkpoint["optimizer_state_dict"] = optimizer.state_dict()
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self, *, path: str | os.PathLike, module: nn.Module, optimizer: Optional[Optimizer] = None
    ) -> dict:
        """Load what :meth:`save_checkpoint` wrote into ``module``, ``optimizer`` and this engine.

        A checkpoint Opacus's ``save_checkpoint`` wrote resumes too: its accountant's history is loaded, and
        the noise continues from this engine's own generator (Opacus keeps no noise state).

        Raises:
            ValueError: when the file holds no privacy accounting (neither privfast's nor Opacus's).
        """
        checkpoint = torch.load(path, weights_only=False)
        if "privacy_engine_state_dict" not in checkpoint and "privacy_accountant_state_dict" not in checkpoint:
            raise ValueError(
                f"{path} holds no privacy accounting (written by save_checkpoint of privfast or Opacus?): resuming "
                "from it would restart the epsilon at zero"
            )
        module.load_state_dict(checkpoint["module_state_dict"])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        if "privacy_engine_state_dict" in checkpoint:
            self.load_state_dict(checkpoint["privacy_engine_state_dict"])
        else:
            self.accountant.load_state_dict(checkpoint["privacy_accountant_state_dict"])
        return checkpoint
