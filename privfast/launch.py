"""Process launchers for distributed private runs: ``--nproc N`` on one machine, or ``torchrun``.

Two ways to start the processes that :mod:`privfast.distributed`'s mechanism runs in:

- ``--nproc N`` (:func:`launch` with ``nproc=N``): spawns N processes on this machine joined by a
  gloo group (CPU). The single-machine shortcut.
- ``torchrun`` (one process per GPU or per node; it sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
  and ``MASTER_PORT``): :func:`launch` runs its function in the calling process, which joins
  torchrun's group with ``env://`` initialization, over NCCL where CUDA is present, else gloo.

:func:`launch_training`, :func:`launch_shadow_models` and :func:`launch_search` run the
corresponding jobs either way and return the merged result. Under torchrun they return on rank 0
only: the other ranks exit (status 0) once their share is done, so that only rank 0 goes on to
print and write files. These launchers sit above the trainer, the attacks and the search, and
import them (and the mechanism, which loads Opacus) on first use, so that a command's start-up
pays for none of it; the mechanism imports none of these.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

if TYPE_CHECKING:
    from privfast.distributed import DistributedContext

__all__ = [
    "backend",
    "is_distributed",
    "is_rank_zero",
    "launch",
    "launch_search",
    "launch_shadow_models",
    "launch_training",
    "quiet_other_ranks",
    "under_torchrun",
]

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""The environment torchrun (and any ``env://`` launcher) gives each process."""


def under_torchrun() -> bool:
    """True when this process was started by torchrun (or another launcher setting the ``env://`` variables)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def is_rank_zero() -> bool:
    """Whether this process speaks for the run: rank 0 under torchrun, or any process otherwise (a
    spawning launcher, or a single-process run)."""
    return not under_torchrun() or int(os.environ["RANK"]) == 0


def is_distributed(nproc: int) -> bool:
    """Whether a command runs across processes: ``--nproc`` above 1, or started by torchrun."""
    return nproc > 1 or under_torchrun()


def backend() -> str:
    """The process-group backend for this machine: NCCL where CUDA is present, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def quiet_other_ranks() -> None:
    """Under torchrun, silence standard output on every rank but 0 (standard error still shows)."""
    if under_torchrun() and int(os.environ["RANK"]) != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (lives as long as the process)


def _result_bytes(value: Any) -> bytes:
    # As bytes: a tensor put on a queue as is travels as a shared-memory handle that its process must
    # still be alive to hand over; and under torchrun the ranks may sit on other machines and devices.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _result(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, threads: int, fn: Callable, args: Sequence, results) -> None:
    from privfast.distributed import DistributedContext

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results.put((rank, True, _result_bytes(fn(DistributedContext(rank, world_size), *args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def _spawn(fn: Callable[..., Any], args: Sequence, nproc: int, threads: Optional[int]) -> list[Any]:
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    port = _free_port()
    processes = [
        context.Process(target=_worker, args=(rank, nproc, port, threads, fn, args, results)) for rank in range(nproc)
    ]
    for process in processes:
        process.start()
    outcomes = {}
    try:
        while len(outcomes) < nproc:
            if results.empty():
                # A process killed outright (out of memory, a signal) reports nothing: do not wait for it.
                dead = [r for r, p in enumerate(processes) if p.exitcode not in (None, 0) and r not in outcomes]
                if dead:
                    raise RuntimeError(
                        f"process {dead[0]} of {nproc} died with exit code "
                        f"{processes[dead[0]].exitcode} before reporting"
                    )
                time.sleep(0.05)
                continue
            rank, ok, value = results.get()
            if not ok:
                raise RuntimeError(f"process {rank} of {nproc} failed:\n{value}")
            outcomes[rank] = _result(value)
    finally:
        for process in processes:
            if process.is_alive() and len(outcomes) < nproc:
                process.terminate()  # a failed peer would leave the others blocked in a collective
            process.join()
    return [outcomes[rank] for rank in range(nproc)]


def _in_torchrun(fn: Callable[..., Any], args: Sequence) -> list[Any]:
    """``fn`` in this process, one rank of torchrun's group (joined here unless the caller already did)."""
    from privfast.distributed import DistributedContext

    joined_here = not dist.is_initialized()
    if joined_here:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process on each node
        dist.init_process_group(backend(), init_method="env://")
    try:
        context = DistributedContext.current()
        outcomes: list[Any] = [None] * context.world_size
        dist.all_gather_object(outcomes, _result_bytes(fn(context, *args)))
    finally:
        if joined_here:
            dist.destroy_process_group()
    return [_result(data) for data in outcomes]


def launch(fn: Callable[..., Any], *args: Any, nproc: int = 1, threads: Optional[int] = None) -> list[Any]:
    """Run ``fn(context, *args)`` in every process of a distributed run; return each one's result.

    Under torchrun this process is one of them (torchrun chose their number); otherwise ``nproc``
    new processes are spawned on this machine, joined by a gloo process group (CPU).

    Args:
        fn: a module-level function (it is pickled to the processes); its first argument is the
            process's :class:`~privfast.distributed.DistributedContext`.
        *args: further arguments, picklable.
        nproc: processes to spawn, >= 1; must stay 1 under torchrun.
        threads: torch threads per spawned process; default: the CPU cores shared out.

    Returns:
        What ``fn`` returned in each process, in rank order, with tensors on the CPU (under
        torchrun, in every process).

    Raises:
        ValueError: ``nproc < 1``, or ``nproc > 1`` under torchrun (both would start processes).
        RuntimeError: a spawned process failed (its traceback is in the message).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if under_torchrun():
        if nproc > 1:
            raise ValueError(
                f"--nproc {nproc} under torchrun: torchrun already started the processes (use one or the other)"
            )
        return _in_torchrun(fn, args)
    return _spawn(fn, args, nproc, threads)


def _rank_zero_goes_on() -> None:
    """Under torchrun, end every rank but 0 here: its share is done, and rank 0 prints and writes."""
    if under_torchrun() and int(os.environ["RANK"]) != 0:
        sys.stdout.flush()
        raise SystemExit(0)


def _train_process(
    context: DistributedContext, config, checkpoint, resume: bool, overwrite: bool, progress: bool
) -> list[dict]:
    from privfast.trainer import Trainer

    trainer = Trainer(config, checkpoint=checkpoint, progress=progress and context.rank == 0, distributed=context)
    return trainer.fit(resume=resume, overwrite=overwrite)


def launch_training(
    config, *, nproc: int = 1, checkpoint=None, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> list[dict]:
    """Train ``config`` (a private :class:`~privfast.config.TrainConfig`) across processes.

    The launching process (under torchrun, rank 0) holds the checkpoint's
    :class:`~privfast.checkpoint.RunLock` meanwhile; a checkpoint holding a run is refused unless
    ``resume`` or ``overwrite``, as by :meth:`privfast.trainer.Trainer.fit`. Ctrl-C stops every
    process at once: the last completed epoch stays saved.

    Args:
        config: the run.
        nproc: processes to spawn on this machine (ignored as 1 under torchrun, which sets the number).
        checkpoint: the checkpoint path; rank 0 writes it, every process resumes from it with its own RNG state.
        resume: continue the run in ``checkpoint``.
        overwrite: replace the run in ``checkpoint`` by a new one.
        progress: show rank 0's progress bar.

    Returns:
        The per-epoch history (the same in every process); under torchrun, on rank 0 only.
    """
    from privfast.checkpoint import RunLock, check_overwrite

    with RunLock(checkpoint) if checkpoint is not None and is_rank_zero() else contextlib.nullcontext():
        if checkpoint is not None:
            check_overwrite(checkpoint, resume=resume, overwrite=overwrite)
        histories = launch(_train_process, config, checkpoint, resume, overwrite, progress, nproc=nproc)
    _rank_zero_goes_on()
    return histories[0]


def _shadow_process(
    context: DistributedContext,
    make_model: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    n_shadows: int,
    seed: int,
    recipe: dict,
) -> tuple[dict, dict, Tensor]:
    from privfast.attacks.training import train_shadow_models

    # Each process draws its own complementary pairs of halves: every example is IN for exactly
    # half of each process's shadows, hence for half of all of them, as the online attack needs.
    generator = torch.Generator().manual_seed(seed * context.world_size + context.rank)
    shadows = train_shadow_models(
        make_model, x, y, n_shadows=n_shadows // context.world_size, generator=generator, **recipe
    )
    return shadows.params, shadows.buffers, shadows.in_mask


def _world_size(nproc: int) -> int:
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else nproc


def launch_shadow_models(
    make_model: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    *,
    n_shadows: int,
    nproc: int = 1,
    seed: int = 0,
    **recipe: Any,
):
    """LiRA's shadow models sharded across processes, each training ``n_shadows / processes`` vectorized.

    Args:
        make_model: builds a fresh model; picklable (a module-level function or a ``functools.partial`` of one).
        x: the attacker's population ``[N, ...]``.
        y: its labels ``[N]``.
        n_shadows: shadow models S in all; S / processes must be even (each process trains complementary pairs).
        nproc: processes to spawn on this machine (1 under torchrun, which sets the number).
        seed: process r of P draws its splits, initializations and batches from seed ``seed * P + r``.
        **recipe: :func:`privfast.attacks.train_shadow_models`'s training arguments (``epochs``, ``lr``, ...).

    Returns:
        One :class:`privfast.attacks.training.ShadowModels` holding every process's shadows, in rank
        order; under torchrun, on rank 0 only.
    """
    from privfast.attacks.training import ShadowModels

    processes = _world_size(nproc)
    if n_shadows % (2 * processes):
        raise ValueError(
            f"n_shadows={n_shadows} must be a multiple of 2 * processes = {2 * processes}: every "
            "process trains complementary pairs of halves"
        )
    parts = launch(_shadow_process, make_model, x, y, n_shadows, seed, recipe, nproc=nproc)
    _rank_zero_goes_on()
    params = {name: torch.cat([part[0][name] for part in parts]) for name in parts[0][0]}
    buffers = {name: torch.cat([part[1][name] for part in parts]) for name in parts[0][1]}
    with torch.random.fork_rng(devices=[]):  # the architecture only: leave the caller's RNG alone
        base = make_model().to("meta")
    return ShadowModels(base, params, buffers, torch.cat([part[2] for part in parts]))


def _search_process(
    context: DistributedContext,
    model_semi_trained: nn.Module,
    model_init: nn.Module,
    x: Tensor,
    y: Tensor,
    options: dict,
) -> list:
    from privfast.search import search

    return search(
        model_semi_trained, model_init, (x, y), shard=(context.rank, context.world_size), progress=False, **options
    ).table


def launch_search(
    model_semi_trained: nn.Module, model_init: nn.Module, data, *, nproc: int = 1, top_n: int = 2, **options: Any
):
    """ATS's policy search with its candidates sharded across processes (round-robin).

    Every process samples the same candidates and scores its share; since each candidate's random
    draws are its own, the merged table is the one a single process would score.

    Args:
        model_semi_trained: network trained for a few epochs (S_pri).
        model_init: the same architecture at random initialization (S_acc).
        data: ``(x [N, C, H, W], y [N])``.
        nproc: processes to spawn on this machine (1 under torchrun, which sets the number).
        top_n: policies kept for the hybrid.
        **options: :func:`privfast.search.search`'s other keyword arguments (``candidates``,
            ``acc_threshold``, ``images``, ``seed``, ...).

    Returns:
        The :class:`privfast.search.SearchResult` of all candidates; under torchrun, on rank 0 only.
    """
    from privfast.search import SearchResult

    tables = launch(
        _search_process, model_semi_trained, model_init, data[0], data[1], {**options, "top_n": top_n}, nproc=nproc
    )
    _rank_zero_goes_on()
    processes = len(tables)
    return SearchResult.from_table([tables[i % processes][i] for i in range(len(tables[0]))], top_n)
