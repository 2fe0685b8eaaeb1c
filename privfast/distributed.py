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

:class:`DistributedContext` plugs into :class:`privfast.trainer.Trainer` (``distributed=``) and
:func:`launch_training` starts the processes (``privfast train --nproc N``). LiRA's shadow models
are sharded too: :func:`launch_shadow_models` (``privfast audit --nproc N``), and so are ATS's
candidate policies: :func:`launch_search` (``privfast search --nproc N``).
"""

from __future__ import annotations

import io
import os
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from privfast.optim import DPOptimizer, SAM
from privfast.privacy_engine import PrivacyEngine

__all__ = ["DistributedContext", "DistributedDPOptimizer", "PoissonShardSampler", "launch", "launch_search",
           "launch_shadow_models", "launch_training"]


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
            raise ValueError("secure_mode draws different noise in each process; distributed DP-SGD needs the same "
                             "seeded noise generator in every process")
        if kwargs.get("generator") is None:
            raise ValueError("pass the same seeded noise generator to every process (generator=...)")
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call dist.init_process_group first "
                               "(or use privfast.distributed.launch)")
        super().__init__(optimizer, **kwargs)

    @classmethod
    def wrap(cls, optimizer: DPOptimizer) -> "DistributedDPOptimizer":
        """The distributed version of a :class:`~privfast.optim.DPOptimizer` (same settings and step hook)."""
        distributed = cls(
            optimizer.original_optimizer, module=optimizer.module, noise_multiplier=optimizer.noise_multiplier,
            max_grad_norm=optimizer.max_grad_norm, expected_batch_size=optimizer.expected_batch_size,
            loss_reduction=optimizer.loss_reduction, generator=optimizer.generator,
            secure_mode=optimizer.secure_mode, check_finite=optimizer.check_finite,
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

    def __init__(self, num_examples: int, *, sample_rate: float, rank: int, world_size: int, seed: int = 0,
                 generator: Optional[torch.Generator] = None):
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


def _broadcast_int(value: int) -> int:
    box = torch.tensor([value], dtype=torch.int64)
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
            raise RuntimeError("torch.distributed is not initialized: call dist.init_process_group first "
                               "(or use privfast.distributed.launch)")
        return cls(dist.get_rank(), dist.get_world_size())

    def make_private(self, engine: PrivacyEngine, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                     data_loader: DataLoader, max_grad_norm: float, augmult: int = 1, grad_sample_mode: str = "auto",
                     **privacy: float) -> tuple[nn.Module, DistributedDPOptimizer, DataLoader]:
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
            module=module, optimizer=optimizer, data_loader=data_loader, max_grad_norm=max_grad_norm, augmult=augmult,
            poisson_sampling=False, grad_sample_mode=grad_sample_mode,
            noise_generator=torch.Generator().manual_seed(noise_seed), **privacy,
        )
        dataset = data_loader.dataset
        sampler = PoissonShardSampler(len(dataset), sample_rate=1 / len(data_loader), rank=self.rank,
                                      world_size=self.world_size)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=_CollateMaybeEmpty(dataset))
        return model, DistributedDPOptimizer.wrap(private_optimizer), loader

    def gather_rng_states(self) -> list[Tensor]:
        """Every process's global RNG state, in rank order (a collective: call it in all processes)."""
        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, torch.get_rng_state())
        return states


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, threads: int, fn: Callable, args: Sequence, results) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        # As bytes: a tensor put as is travels as a shared-memory handle that its process must still be
        # alive to hand over, and this process may exit before the launcher reads the queue.
        buffer = io.BytesIO()
        torch.save(fn(DistributedContext(rank, world_size), *args), buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], *args: Any, nproc: int, threads: Optional[int] = None) -> list[Any]:
    """Run ``fn(context, *args)`` in ``nproc`` new processes joined by a gloo process group (CPU).

    Args:
        fn: a module-level function (it is pickled to the processes); its first argument is the
            process's :class:`DistributedContext`.
        *args: further arguments, picklable.
        nproc: number of processes, >= 1.
        threads: torch threads per process; default: the CPU cores shared out.

    Returns:
        What ``fn`` returned in each process, in rank order.

    Raises:
        RuntimeError: a process failed (its traceback is in the message).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    port = _free_port()
    processes = [context.Process(target=_worker, args=(rank, nproc, port, threads, fn, args, results))
                 for rank in range(nproc)]
    for process in processes:
        process.start()
    outcomes = {}
    try:
        while len(outcomes) < nproc:
            if results.empty():
                # A process killed outright (out of memory, a signal) reports nothing: do not wait for it.
                dead = [r for r, p in enumerate(processes) if p.exitcode not in (None, 0) and r not in outcomes]
                if dead:
                    raise RuntimeError(f"process {dead[0]} of {nproc} died with exit code "
                                       f"{processes[dead[0]].exitcode} before reporting")
                time.sleep(0.05)
                continue
            rank, ok, value = results.get()
            if not ok:
                raise RuntimeError(f"process {rank} of {nproc} failed:\n{value}")
            outcomes[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for process in processes:
            if process.is_alive() and len(outcomes) < nproc:
                process.terminate()  # a failed peer would leave the others blocked in a collective
            process.join()
    return [outcomes[rank] for rank in range(nproc)]


def _train_process(context: DistributedContext, config, checkpoint, resume: bool, progress: bool) -> list[dict]:
    from privfast.trainer import Trainer

    trainer = Trainer(config, checkpoint=checkpoint, progress=progress and context.rank == 0, distributed=context)
    return trainer.fit(resume=resume)


def launch_training(config, *, nproc: int, checkpoint=None, resume: bool = False, progress: bool = True) -> list[dict]:
    """Train ``config`` (a private :class:`~privfast.trainer.TrainConfig`) across ``nproc`` processes.

    Rank 0 writes the checkpoint; every process resumes from it with its own RNG state.

    Returns:
        The per-epoch history (the same in every process).
    """
    histories = launch(_train_process, config, checkpoint, resume, progress, nproc=nproc)
    return histories[0]


def _shadow_process(context: DistributedContext, make_model: Callable[[], nn.Module], x: Tensor, y: Tensor,
                    n_shadows: int, seed: int, recipe: dict) -> tuple[dict, dict, Tensor]:
    from privfast.attacks.training import train_shadow_models

    # Each process draws its own complementary pairs of halves: every example is IN for exactly
    # half of each process's shadows, hence for half of all of them, as the online attack needs.
    generator = torch.Generator().manual_seed(seed * context.world_size + context.rank)
    shadows = train_shadow_models(make_model, x, y, n_shadows=n_shadows // context.world_size, generator=generator,
                                  **recipe)
    return shadows.params, shadows.buffers, shadows.in_mask


def launch_shadow_models(make_model: Callable[[], nn.Module], x: Tensor, y: Tensor, *, n_shadows: int, nproc: int,
                         seed: int = 0, **recipe: Any):
    """LiRA's shadow models sharded across ``nproc`` processes, each training ``n_shadows / nproc`` vectorized.

    Args:
        make_model: builds a fresh model; picklable (a module-level function or a ``functools.partial`` of one).
        x: the attacker's population ``[N, ...]``.
        y: its labels ``[N]``.
        n_shadows: shadow models S in all; S / nproc must be even (each process trains complementary pairs).
        nproc: processes.
        seed: process r draws its splits, initializations and batches from seed ``seed * nproc + r``.
        **recipe: :func:`privfast.attacks.train_shadow_models`'s training arguments (``epochs``, ``lr``, ...).

    Returns:
        One :class:`privfast.attacks.training.ShadowModels` holding every process's shadows, in rank order.
    """
    from privfast.attacks.training import ShadowModels

    if n_shadows % (2 * nproc):
        raise ValueError(f"n_shadows={n_shadows} must be a multiple of 2 * nproc = {2 * nproc}: every process trains "
                         "complementary pairs of halves")
    parts = launch(_shadow_process, make_model, x, y, n_shadows, seed, recipe, nproc=nproc)
    params = {name: torch.cat([part[0][name] for part in parts]) for name in parts[0][0]}
    buffers = {name: torch.cat([part[1][name] for part in parts]) for name in parts[0][1]}
    with torch.random.fork_rng(devices=[]):  # the architecture only: leave the caller's RNG alone
        base = make_model().to("meta")
    return ShadowModels(base, params, buffers, torch.cat([part[2] for part in parts]))


def _search_process(context: DistributedContext, model_semi_trained: nn.Module, model_init: nn.Module, x: Tensor,
                    y: Tensor, options: dict) -> list:
    from privfast.search import search

    return search(model_semi_trained, model_init, (x, y), shard=(context.rank, context.world_size), progress=False,
                  **options).table


def launch_search(model_semi_trained: nn.Module, model_init: nn.Module, data, *, nproc: int, top_n: int = 2,
                  **options: Any):
    """ATS's policy search with its candidates sharded across ``nproc`` processes (round-robin).

    Every process samples the same candidates and scores its share; since each candidate's random
    draws are its own, the merged table is the one a single process would score.

    Args:
        model_semi_trained: network trained for a few epochs (S_pri).
        model_init: the same architecture at random initialization (S_acc).
        data: ``(x [N, C, H, W], y [N])``.
        nproc: processes.
        top_n: policies kept for the hybrid.
        **options: :func:`privfast.search.search`'s other keyword arguments (``candidates``,
            ``acc_threshold``, ``images``, ``seed``, ...).

    Returns:
        The :class:`privfast.search.SearchResult` of all candidates.
    """
    from privfast.search import SearchResult

    tables = launch(_search_process, model_semi_trained, model_init, data[0], data[1], {**options, "top_n": top_n},
                    nproc=nproc)
    return SearchResult.from_table([tables[i % nproc][i] for i in range(len(tables[0]))], top_n)
