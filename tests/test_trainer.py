"""Trainer: per-epoch records, epsilon targets, atomic checkpoints and exact resume, bad configurations."""

import math
import os

import pytest
import torch

from privfast.metrics import dp_perr_bound
from privfast.trainer import TrainConfig, Trainer, load_canaries, load_data, load_pool, load_trained

TINY = dict(train_examples=96, width=4, batch_size=24, lr=0.5, attacks=("yeom",), audit_examples=48,
            audit_known=16)


def _config(**overrides):
    return TrainConfig(**{**TINY, **overrides})


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("method,extra", [
    ("nonprivate", {}),
    ("dp-mix", dict(augmult=2, k_self=1, flip=False)),
    ("dp-mix-diff", dict(augmult=2, k_self=1, k_diff=1, pool_examples=50, flip=False)),
    ("dp-sam", dict(noise_multiplier=1.0)),
    ("sam", dict(canaries=3, canary_repeats=2)),
])
def test_resumed_run_equals_uninterrupted_run(tmp_path, method, extra):
    whole = Trainer(_config(method=method, epochs=2, **extra), checkpoint=tmp_path / "a.pt", progress=False)
    whole_history = whole.fit()

    first = Trainer(_config(method=method, epochs=1, **extra), checkpoint=tmp_path / "b.pt", progress=False)
    first.fit()
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt"]  # written atomically: no temporary file left
    torch.manual_seed(123)  # a fresh process would start from another RNG state: resume must not depend on it
    resumed = Trainer(_config(method=method, epochs=2, **extra), checkpoint=tmp_path / "b.pt", progress=False)
    resumed_history = resumed.fit(resume=True)

    assert len(resumed_history) == 2
    assert all(torch.equal(a, b) for a, b in zip(_params(whole.model), _params(resumed.model)))
    for a, b in zip(whole_history, resumed_history):
        assert a["test_accuracy"] == b["test_accuracy"] and a["yeom"]["auc"] == b["yeom"]["auc"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a.get("epsilon") == b.get("epsilon")
    if resumed.config.private:
        assert resumed.engine.get_epsilon(1e-5) == whole.engine.get_epsilon(1e-5)
        # The audit's own history survives too (the trainer's records extend it).
        assert len(resumed.audit.history) == 2
        assert all(a.items() <= r.items() for a, r in zip(resumed.audit.history, resumed_history))
    if resumed.config.canaries:  # the checkpoint records the inserted canaries and their references
        canaries, references = load_canaries(tmp_path / "b.pt")
        assert torch.equal(canaries.x, resumed.canaries.x) and len(canaries.y) == 3 and len(references.y) > 100
        # Inserted r times into the private set; the audit's members stay the real training examples.
        assert len(resumed.loader.dataset) == len(resumed.train_split.y) + 3 * 2


def test_records_hold_accuracy_attacks_epsilon_and_bound(tmp_path):
    seen = []
    trainer = Trainer(_config(method="dp-sgd", epochs=2, target_epsilon=3.0), checkpoint=tmp_path / "c.pt",
                      progress=False, callbacks=[lambda t, record: seen.append((t, record["epoch"]))])
    history = trainer.fit()
    assert seen == [(trainer, 1), (trainer, 2)]
    assert [r["epoch"] for r in history] == [1, 2]
    last = history[-1]
    assert 0 <= last["test_accuracy"] <= 1 and math.isfinite(last["train_loss"])
    assert last["epsilon"] == pytest.approx(3.0, rel=0.02)  # the searched noise spends the target in 2 epochs
    assert history[0]["epsilon"] < last["epsilon"]
    assert last["dp_perr_bound"] == pytest.approx(dp_perr_bound(last["epsilon"], 1e-5))
    assert last["noise_multiplier"] == trainer.noise_multiplier > 0
    assert math.isfinite(last["yeom"]["auc"]) and 0.01 in last["yeom"]["tpr_at_fpr"]

    model, config, stored = load_trained(tmp_path / "c.pt")
    assert config == trainer.config and stored == history
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(trainer.model)))


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    Trainer(_config(method="nonprivate", epochs=1), checkpoint=tmp_path / "d.pt", progress=False).fit()
    other = Trainer(_config(method="nonprivate", epochs=2, lr=0.01), checkpoint=tmp_path / "d.pt", progress=False)
    with pytest.raises(ValueError, match=r"another run \(lr: 0.5 -> 0.01\)"):
        other.fit(resume=True)
    Trainer(_config(method="dp-sgd", epochs=1, target_epsilon=2.0), checkpoint=tmp_path / "e.pt", progress=False).fit()
    longer = Trainer(_config(method="dp-sgd", epochs=2, target_epsilon=2.0), checkpoint=tmp_path / "e.pt",
                     progress=False)
    with pytest.raises(ValueError, match=r"epochs: 1 -> 2"):  # the noise was chosen to spend epsilon in 1 epoch
        longer.fit(resume=True)
    with pytest.raises(ValueError, match="checkpoint path"):
        Trainer(_config(method="nonprivate", epochs=1), progress=False).fit(resume=True)
    (tmp_path / "junk.pt").write_bytes(b"")
    torch.save({"weights": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a privfast training checkpoint"):
        load_trained(tmp_path / "junk.pt")


@pytest.mark.parametrize("bad,message", [
    (dict(method="sgd"), "method must be one of"),
    (dict(method="dp-mix", k_self=0), "k_self >= 1"),
    (dict(method="dp-sgd", k_self=2), "only applies to methods"),
    (dict(method="dp-sgd", augmult=2), "use method='self-aug'"),
    (dict(method="self-aug", augmult=1), "augmult=1 is dp-sgd"),
    (dict(method="dp-mix", augmult=2, k_self=1, k_diff=1), "k_diff >= 1 goes with method='dp-mix-diff'"),
    (dict(method="dp-mix-diff", augmult=2, k_self=1), "k_diff >= 1 goes with"),
    (dict(method="nonprivate", target_epsilon=1.0), "nonprivate runs are non-private"),
    (dict(method="sam", augmult=2), "sam runs are non-private"),
    (dict(method="dp-sam", rho=0.0), "rho must be > 0"),
    (dict(canary_repeats=0), "canary_repeats >= 1"),
    (dict(epochs=0), "epochs"),
    (dict(delta=1.0), "delta"),
])
def test_bad_configurations_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        _config(**bad)


def test_train_examples_larger_than_the_data_is_refused():
    with pytest.raises(ValueError, match="train_examples=5000 but digits has"):
        Trainer(_config(train_examples=5000), progress=False)
    # dp-mix-diff's public pool is cut from the training split: it cannot overlap the private set.
    with pytest.raises(ValueError, match="less the 200 of the public pool"):
        Trainer(_config(method="dp-mix-diff", augmult=2, k_self=1, k_diff=1, train_examples=1200), progress=False)


def test_self_aug_trains_on_k_augmentations_and_the_pool_is_disjoint():
    trainer = Trainer(_config(method="self-aug", augmult=3, epochs=1), progress=False)
    assert trainer.augmenter.augmult == 3 and trainer.fit()[-1]["epsilon"] > 0
    config = _config(method="dp-mix-diff", augmult=2, k_self=1, k_diff=2, pool_examples=40)
    mixer = Trainer(config, progress=False).augmenter
    train, _ = load_data(config)
    pool = load_pool(config)
    assert mixer.k_diff == 2 and len(pool.y) == 40
    # No public example is a private one (digits has no duplicate images across these rows).
    assert not (pool.x.flatten(1)[:, None] == train.x.flatten(1)[None]).all(-1).any()
