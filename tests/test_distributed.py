"""Distributed DP-SGD: two processes (gloo, CPU; spawned or started by torchrun) make the same update as
one process on the whole batch, shard sampling is Poisson sampling of the whole set, a 2-process Trainer
run resumes, and LiRA's shadow models and ATS's candidate policies shard across processes."""

import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from privfast import launch as launcher
from privfast.attacks.training import train_shadow_models
from privfast.config import TrainConfig
from privfast.distributed import DistributedDPOptimizer, PoissonShardSampler
from privfast.grad_sample import GradSampleModule
from privfast.launch import launch, launch_search, launch_shadow_models, launch_training
from privfast.models import ConvNet
from privfast.optim import DPOptimizer
from privfast.search import search
from privfast.trainer import Trainer

NOISE_SEED = 11


def _model(state):
    model = ConvNet(width=4)
    model.load_state_dict(state)
    return model


def _step(model, optimizer, x, y):
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def _optimizer(cls, model, batch):
    wrapped = GradSampleModule(model)
    optimizer = cls(
        torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        module=wrapped,
        noise_multiplier=0.7,
        max_grad_norm=0.3,
        expected_batch_size=batch,
        generator=torch.Generator().manual_seed(NOISE_SEED),
    )
    return wrapped, optimizer


def _two_steps(context, state, x, y, shares):
    """Step 1: rank r takes its half of the batch; step 2: rank 0 takes the whole batch, rank 1 none."""
    model = _model(state)
    wrapped, optimizer = _optimizer(DistributedDPOptimizer, model, len(y))
    for share in shares[context.rank]:
        _step(wrapped, optimizer, x[share], y[share])
    return [p.detach() for p in model.parameters()]


def test_two_processes_make_the_single_process_update():
    inputs, single = _two_step_case()
    per_rank = launch(_two_steps, *inputs, nproc=2, threads=1)
    for rank_params in per_rank:
        for a, b in zip(rank_params, single):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(per_rank[0][0], inputs[0]["features.0.weight"])  # it did train


def _two_step_case():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    torch.manual_seed(0)
    state = ConvNet(width=4).state_dict()
    shares = [[slice(0, 4), slice(0, 8)], [slice(4, 8), slice(0, 0)]]
    model = _model(state)
    wrapped, optimizer = _optimizer(DPOptimizer, model, len(y))
    for _ in range(2):
        _step(wrapped, optimizer, x, y)
    return (state, x, y, shares), [p.detach() for p in model.parameters()]


TORCHRUN_SCRIPT = """
import os, torch
from test_distributed import _two_steps
from privfast.launch import launch
per_rank = launch(_two_steps, *torch.load({inputs!r}, weights_only=False))
torch.save(per_rank, os.path.join({out!r}, "rank" + os.environ["RANK"] + ".pt"))
"""


def test_torchrun_two_processes_make_the_single_process_update(tmp_path):
    """torchrun --nproc_per_node 2 on the CPU: each rank joins torchrun's group (env://, gloo) in launch."""
    inputs, single = _two_step_case()
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "two_steps.py"
    script.write_text(TORCHRUN_SCRIPT.format(inputs=str(tmp_path / "inputs.pt"), out=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k not in launcher.TORCHRUN_VARIABLES}
    tests = Path(__file__).resolve().parent  # the script imports this module, and privfast from the checkout
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), str(tests), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):  # every rank holds every rank's result, each equal to the single-process model
        per_rank = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(per_rank) == 2
        for params in per_rank:
            for a, b in zip(params, single):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torchrun_environment_is_detected_and_excludes_nproc(monkeypatch):
    for name in launcher.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not launcher.under_torchrun() and not launcher.is_distributed(1) and launcher.is_distributed(2)
    for name, value in zip(launcher.TORCHRUN_VARIABLES, ("1", "2", "127.0.0.1", "29511")):
        monkeypatch.setenv(name, value)
    assert launcher.under_torchrun() and launcher.is_distributed(1)
    assert launcher.backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    with pytest.raises(ValueError, match="torchrun already started the processes"):
        launch(_fail_on_rank_one, nproc=2)
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # restored after the test
    launcher.quiet_other_ranks()  # rank 1: its output goes nowhere
    assert sys.stdout.name == os.devnull


def test_the_mechanism_imports_no_launcher_job():
    """distributed.py is the DP mechanism: the trainer, attacks, search and launchers sit above it."""
    import ast

    import privfast.distributed

    tree = ast.parse(Path(privfast.distributed.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    above = ("privfast.trainer", "privfast.attacks", "privfast.search", "privfast.launch", "privfast.cli")
    assert not {m for m in imported if m and m.startswith(above)}


def test_shards_partition_the_data_and_sample_at_rate_q():
    samplers = [
        PoissonShardSampler(
            1000, sample_rate=0.1, rank=r, world_size=3, seed=5, generator=torch.Generator().manual_seed(r)
        )
        for r in range(3)
    ]
    shards = torch.cat([s.shard for s in samplers])
    assert sorted(shards.tolist()) == list(range(1000))  # disjoint and complete
    batches = [list(s) for s in samplers]
    assert all(len(b) == 10 for b in batches)  # int(1 / q) steps in every process, empty batches included
    drawn = sum(len(batch) for rank in batches for batch in rank)
    assert drawn == pytest.approx(1000 * 0.1 * 10, rel=0.1)  # each example drawn with probability q per step
    for sampler, rank in zip(samplers, batches):
        assert set(sum(rank, [])) <= set(sampler.shard.tolist())
    with pytest.raises(ValueError, match="rank"):
        PoissonShardSampler(10, sample_rate=0.5, rank=2, world_size=2)


def test_two_process_trainer_run_checkpoints_and_resumes(tmp_path):
    config = dict(
        method="dp-sgd",
        train_examples=96,
        width=4,
        batch_size=24,
        lr=0.5,
        noise_multiplier=1.2,
        attacks=("yeom",),
        audit_examples=48,
        audit_known=16,
    )
    first = launch_training(TrainConfig(epochs=1, **config), nproc=2, checkpoint=tmp_path / "c.pt", progress=False)
    stored = torch.load(tmp_path / "c.pt", weights_only=False)
    assert stored["world_size"] == 2 and len(stored["rng"]) == 2
    assert not torch.equal(stored["rng"][0], stored["rng"][1])  # the processes draw different batches

    resumed = launch_training(
        TrainConfig(epochs=2, **config), nproc=2, checkpoint=tmp_path / "c.pt", resume=True, progress=False
    )
    assert [r["epoch"] for r in resumed] == [1, 2] and resumed[0] == first[0]
    single = Trainer(TrainConfig(epochs=2, **config), progress=False)
    single.fit()
    # The same sample rate, noise and steps: the accounting is the undistributed run's.
    assert resumed[-1]["epsilon"] == pytest.approx(single.history[-1]["epsilon"], rel=1e-12)
    with pytest.raises(ValueError, match="private methods"):
        Trainer(TrainConfig(**{**config, "method": "nonprivate"}), distributed=object())


def _fail_on_rank_one(context):
    if context.rank == 1:
        raise ArithmeticError("rank one broke")
    return context.rank


def test_a_failing_process_is_reported_with_its_traceback():
    with pytest.raises(RuntimeError, match="process 1 of 2 failed(.|\n)*ArithmeticError: rank one broke"):
        launch(_fail_on_rank_one, nproc=2, threads=1)


def test_shadow_models_sharded_across_two_processes_are_each_ranks_own_vectorized_shadows():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)
    make_model = partial(ConvNet, width=4)
    recipe = dict(epochs=2, batch_size=8, progress=False)
    shadows = launch_shadow_models(make_model, x, y, n_shadows=4, nproc=2, seed=3, **recipe)
    assert shadows.num_models == 4 and (shadows.in_mask.sum(0) == 2).all()  # every example IN for half
    # Rank r's shadows are train_shadow_models' with the generator seeded 3 * 2 + r.
    for rank in range(2):
        alone = train_shadow_models(
            make_model, x, y, n_shadows=2, generator=torch.Generator().manual_seed(6 + rank), **recipe
        )
        assert torch.equal(alone.in_mask, shadows.in_mask[2 * rank : 2 * rank + 2])
        for name, value in alone.params.items():
            torch.testing.assert_close(shadows.params[name][2 * rank : 2 * rank + 2], value, rtol=1e-4, atol=1e-5)
    assert shadows.logits(x[:5]).shape == (4, 5, 10)  # the merged set attacks like any ShadowModels
    with pytest.raises(ValueError, match="multiple of 2 \\* processes"):
        launch_shadow_models(make_model, x, y, n_shadows=6, nproc=2, **recipe)


def test_ats_search_sharded_across_two_processes_scores_every_candidate_as_one_process_does():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(12, 1, 8, 8, generator=g), torch.randint(0, 10, (12,), generator=g)
    torch.manual_seed(0)
    semi, init = ConvNet(width=4), ConvNet(width=4)
    options = dict(candidates=5, acc_threshold=-math.inf, images=2, seed=4, policies_per_pass=2)  # keep all
    alone = search(semi, init, (x, y), progress=False, **options)
    sharded = launch_search(semi, init, (x, y), nproc=2, **options)
    assert [r.policy for r in sharded.table] == [r.policy for r in alone.table]
    torch.testing.assert_close(
        torch.tensor([[r.privacy, r.accuracy] for r in sharded.table]),
        torch.tensor([[r.privacy, r.accuracy] for r in alone.table]),
        rtol=1e-4,
        atol=1e-6,
    )
    assert not any(math.isnan(r.privacy) for r in sharded.table)  # each candidate scored on one of the shards
    assert sharded.selected == alone.selected and sharded.hybrid == alone.hybrid
