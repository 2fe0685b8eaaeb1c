"""DP-SGD across processes (torch.distributed): each process clips its share of the batch, the
clipped sums are added up, and the noise is added once.

Why this is the same mechanism as single-process DP-SGD:

- **Sampling.** Each process Poisson-samples its own shard of the data set (a fixed partition)
  with the global rate q. Every example is then drawn independently with probability q, which is
  exactly Poisson sampling of the whole data set, the accounting's assumption.
- **Clipping.** Per-example clipping is local to an example, so clipping on the process that holds
  it and summing across processes (one all-reduce of the clipped sums) gives the global clipped sum.
- **Noise.** All processes hold noise generators with the same seed and draw the same Gaussian
  vector with the counter-based kernel, so each adds the *same* noise to the *same* reduced sum:
  the release carries noise of std sigma*C once, not once per process, and no second collective is
  needed to keep the models identical.

:class:`DistributedContext` plugs into :class:`privfast.trainer.Trainer` (``distributed=``).
This module is the mechanism only; :mod:`privfast.launch` starts the processes (``--nproc N`` on one
machine, or ``torchrun``) and runs training, LiRA's shadow models and ATS's search across them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from privfast.optim import SAM, DPOptimizer
from privfast.privacy_engine import PrivacyEngine

__all__ = ["DistributedContext", "DistributedDPOptimizer", "PoissonShardSampler", "collective_device"]


class DistributedDPOptimizer(DPOptimizer):
    """:class:`~privfast.optim.DPOptimizer` whose clipped sums are all-reduced before the noise is added.

    Every process must hold the same model, an identically seeded noise ``generator`` and take the
    same number of steps (empty batches included). Args as :class:`~privfast.optim.DPOptimizer`.

    Raises:
        ValueError: with ``secure_mode`` (its noise would differ across processes) or without a generator.
        RuntimeError: when torch.distributed is not initialized.
    """

    def __init__(self, optimizer, **kwargs):
        if kwargs.get("secure_mode"):
            raise ValueError(
                "secure_mode draws different noise in each process; distributed DP-SGD needs the same "
                "seeded noise generator in every process"
            )
        if kwargs.get("generator") is None:
            raise ValueError("pass the same seeded noise generator to every process (generator=...)")
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call dist.init_process_group first "
                "(or use privfast.launch.launch, or torchrun)"
            )
        super().__init__(optimizer, **kwargs)

    @classmethod
    def wrap(cls, optimizer: DPOptimizer) -> "DistributedDPOptimizer":
        """The distributed version of a :class:`~privfast.optim.DPOptimizer` (same settings and step hook)."""
        distributed = cls(
            optimizer.original_optimizer,
            module=optimizer.module,
            noise_multiplier=optimizer.noise_multiplier,
            max_grad_norm=optimizer.max_grad_norm,
            expected_batch_size=optimizer.expected_batch_size,
            loss_reduction=optimizer.loss_reduction,
            generator=optimizer.generator,
            secure_mode=optimizer.secure_mode,
            check_finite=optimizer.check_finite,
        )
        distributed.step_hook = optimizer.step_hook
        return distributed

    def add_noise(self) -> None:
        """All-reduce the clipped sums (one flat buffer, one collective), then add the shared noise."""
        params = self.params
        summed = [self._summed.get(p, torch.zeros_like(p)) for p in params]
        flat = torch.cat([s.reshape(-1) for s in summed])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        self._summed = {p: chunk.view_as(p) for p, chunk in zip(params, flat.split([p.numel() for p in params]))}
        super().add_noise()


class PoissonShardSampler(Sampler[list[int]]):
    """Batch sampler: this process's shard of the data set, each example drawn with probability q per step.

    Unlike Opacus's distributed sampler it yields empty batches too, so that every process takes
    the same number of steps (a skipped step would leave the others waiting in the all-reduce).

    Args:
        num_examples: size of the whole data set.
        sample_rate: q, the global sampling rate.
        rank: this process's index.
        world_size: number of processes.
        seed: seeds the partition into shards (the same in every process).
        generator: source of the sampling draws (default: torch's global generator); it must
            differ across processes.
    """

    def __init__(
        self,
        num_examples: int,
        *,
        sample_rate: float,
        rank: int,
        world_size: int,
        seed: int = 0,
        generator: Optional[torch.Generator] = None,
    ):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        if num_examples < world_size:
            raise ValueError(f"{num_examples} examples cannot be shared by {world_size} processes")
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed))
        self.shard = order[rank::world_size]
        self.sample_rate = sample_rate
        self.steps = int(1 / sample_rate)
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            mask = torch.rand(len(self.shard), generator=self.generator) < self.sample_rate
            yield self.shard[mask].tolist()


class _CollateMaybeEmpty:
    """``default_collate``, and empty tensors of the right shape for an empty batch."""

    def __init__(self, dataset: Dataset):
        self.templates = dataset[0]

    def __call__(self, batch: list):
        if batch:
            return torch.utils.data.default_collate(batch)
        return tuple(torch.empty(0, *t.shape, dtype=t.dtype) for t in self.templates)


def collective_device() -> torch.device:
    """Where the default group's collectives take tensors: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_int(value: int) -> int:
    box = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.broadcast(box, src=0)
    return int(box)


@dataclass
class DistributedContext:
    """This process's place in a distributed private run (torch.distributed must be initialized).

    Attributes:
        rank: this process's index.
        world_size: number of processes.
    """

    rank: int
    world_size: int

    @classmethod
    def current(cls) -> "DistributedContext":
        """The context of the initialized default process group."""
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call dist.init_process_group first "
                "(or use privfast.launch.launch, or torchrun)"
            )
        return cls(dist.get_rank(), dist.get_world_size())

    def make_private(
        self,
        engine: PrivacyEngine,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        max_grad_norm: float,
        augmult: int = 1,
        grad_sample_mode: str = "auto",
        **privacy: float,
    ) -> tuple[nn.Module, DistributedDPOptimizer, DataLoader]:
        """As :meth:`PrivacyEngine.make_private`, for this process's part of a distributed run.

        Call it in every process with the same arguments. Rank 0's initial weights are copied to
        all processes; the accounting (sample rate ``1 / len(data_loader)``, the expected batch size
        of the whole data set) is that of the undistributed run.

        Args:
            engine: accounts for the privacy spent (identically in every process).
            module: the model.
            optimizer: any torch optimizer over ``module``'s parameters (not SAM).
            data_loader: a loader over the *whole* training set with the global batch size.
            max_grad_norm: the clipping bound C.
            augmult: K, the rows per example in a batch (the loop expands the batch itself).
            grad_sample_mode: see :class:`~privfast.grad_sample.GradSampleModule`.
            **privacy: ``noise_multiplier=sigma``, or ``target_epsilon``, ``target_delta`` and
                ``epochs`` (as :meth:`PrivacyEngine.make_private_with_epsilon`).

        Returns:
            ``(model, optimizer, loader)``; the loader yields this process's Poisson batches ``(x, y)``.
        """
        if isinstance(optimizer, SAM):
            raise ValueError("DP-SAM is not supported across processes; use a plain torch optimizer")
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)
        noise_seed = _broadcast_int(int(torch.randint(0, 2**62, ())))
        # Every process starts from the same global RNG state (the run's seed); from here on the
        # processes draw their own batches and augmentations, so their streams must differ.
        torch.manual_seed(int(torch.randint(0, 2**62, ())) + self.rank)
        make_private = engine.make_private_with_epsilon if "target_epsilon" in privacy else engine.make_private
        model, private_optimizer, _ = make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            max_grad_norm=max_grad_norm,
            augmult=augmult,
            poisson_sampling=False,
            grad_sample_mode=grad_sample_mode,
            noise_generator=torch.Generator().manual_seed(noise_seed),
            **privacy,
        )
        dataset = data_loader.dataset
        sampler = PoissonShardSampler(
            len(dataset), sample_rate=1 / len(data_loader), rank=self.rank, world_size=self.world_size
        )
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=_CollateMaybeEmpty(dataset))
        return model, DistributedDPOptimizer.wrap(private_optimizer), loader

    def gather_rng_states(self) -> list[Tensor]:
        """Every process's global RNG state, in rank order (a collective: call it in all processes)."""
        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, torch.get_rng_state())
        return states
