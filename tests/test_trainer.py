"""Trainer: per-epoch records, epsilon targets, atomic checkpoints and exact resume (after an epoch or
after Ctrl-C within one), runs that are never overwritten, bad configurations named by their flags,
per-data-set augmentation defaults, and logs without noise."""

import itertools
import math
import os
import signal
import warnings

import pytest
import torch

from privfast.canaries import load_canaries
from privfast.checkpoint import CheckpointError, load_trained, read_checkpoint
from privfast.config import TrainConfig
from privfast.data import DATASET_AUGMENTATION, DATASETS, load_data, load_pool
from privfast.metrics import dp_perr_bound
from privfast.trainer import Trainer, TrainingInterrupted

TINY = dict(train_examples=96, width=4, batch_size=24, lr=0.5, attacks=("yeom",), audit_examples=48, audit_known=16)


def _config(**overrides):
    return TrainConfig(**{**TINY, **overrides})


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _same_params(a, b):
    return all(torch.equal(x, y) for x, y in zip(_params(a), _params(b)))


@pytest.fixture
def ctrl_c_at(monkeypatch):
    """``ctrl_c_at(n, times=1)``: Ctrl-C (pressed ``times`` times) as the n-th step of the next fit begins."""
    original = Trainer._step

    def arm(n: int, times: int = 1):
        calls = itertools.count(1)

        def step(self, x, y):
            if next(calls) == n:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
            return original(self, x, y)

        monkeypatch.setattr(Trainer, "_step", step)

    return arm


@pytest.mark.parametrize(
    "method,extra",
    [
        ("nonprivate", {}),
        ("dp-mix", dict(k_base=2, k_self=1)),
        ("dp-mix-diff", dict(k_base=2, k_self=1, k_diff=1, pool_examples=50)),
        ("dp-sam", dict(noise_multiplier=1.0)),
        ("sam", dict(canaries=3, canary_repeats=2)),
    ],
)
def test_resumed_run_equals_uninterrupted_run(tmp_path, method, extra):
    whole = Trainer(_config(method=method, epochs=2, **extra), checkpoint=tmp_path / "a.pt", progress=False)
    whole_history = whole.fit()

    first = Trainer(_config(method=method, epochs=1, **extra), checkpoint=tmp_path / "b.pt", progress=False)
    first.fit()
    # Written atomically (no temporary file left), and the lock is gone with the writer.
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt"]
    torch.manual_seed(123)  # a fresh process would start from another RNG state: resume must not depend on it
    resumed = Trainer(_config(method=method, epochs=2, **extra), checkpoint=tmp_path / "b.pt", progress=False)
    resumed_history = resumed.fit(resume=True)

    assert len(resumed_history) == 2
    assert _same_params(whole.model, resumed.model)
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
    trainer = Trainer(
        _config(method="dp-sgd", epochs=2, target_epsilon=3.0),
        checkpoint=tmp_path / "c.pt",
        progress=False,
        callbacks=[lambda t, record: seen.append((t, record["epoch"]))],
    )
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
    assert _same_params(model, trainer.model)


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    Trainer(_config(method="nonprivate", epochs=1), checkpoint=tmp_path / "d.pt", progress=False).fit()
    other = Trainer(_config(method="nonprivate", epochs=2, lr=0.01), checkpoint=tmp_path / "d.pt", progress=False)
    with pytest.raises(ValueError, match=r"cannot change --lr 0.5 -> 0.01 on resume: only --epochs and --data-root"):
        other.fit(resume=True)
    with pytest.raises(ValueError, match="checkpoint path"):
        Trainer(_config(method="nonprivate", epochs=1), progress=False).fit(resume=True)
    fixed = Trainer(
        _config(method="dp-sgd", epochs=1, noise_multiplier=1.5), checkpoint=tmp_path / "f.pt", progress=False
    )
    fixed.fit()
    noisier = Trainer(
        _config(method="dp-sgd", epochs=2, noise_multiplier=2.0), checkpoint=tmp_path / "f.pt", progress=False
    )
    with pytest.raises(ValueError, match=r"trained at the noise multiplier 1.5, .* gives 2.0: the noise cannot change"):
        noisier.fit(resume=True)


def test_a_target_epsilon_run_extended_says_how_and_goes_on_at_its_noise(tmp_path):
    Trainer(_config(method="dp-sgd", epochs=1, target_epsilon=2.0), checkpoint=tmp_path / "e.pt", progress=False).fit()
    sigma = read_checkpoint(tmp_path / "e.pt")["noise_multiplier"]
    longer = Trainer(
        _config(method="dp-sgd", epochs=2, target_epsilon=2.0), checkpoint=tmp_path / "e.pt", progress=False
    )
    # The noise was chosen to spend epsilon 2 in 1 epoch: the message says what to do instead.
    with pytest.raises(
        ValueError,
        match=rf"--target-epsilon 2 chose for --epochs 1; --epochs 2 at --target-epsilon 2 "
        rf"needs .*resume with --target-epsilon none --noise-multiplier {sigma!r}",
    ):
        longer.fit(resume=True)
    # Doing so goes on with the same noise: the same run as one trained 2 epochs at that noise from the start.
    extended = Trainer(
        _config(method="dp-sgd", epochs=2, noise_multiplier=sigma), checkpoint=tmp_path / "e.pt", progress=False
    )
    history = extended.fit(resume=True)
    fixed = Trainer(_config(method="dp-sgd", epochs=2, noise_multiplier=sigma), progress=False)
    fixed.fit()
    assert [r["epoch"] for r in history] == [1, 2] and _same_params(extended.model, fixed.model)
    assert history[-1]["epsilon"] == fixed.history[-1]["epsilon"] > 2.0  # epsilon grew past the old target
    assert read_checkpoint(tmp_path / "e.pt")["config"]["target_epsilon"] is None


def test_an_existing_run_is_never_overwritten_by_accident(tmp_path):
    path = tmp_path / "run.pt"
    Trainer(_config(method="nonprivate", epochs=1), checkpoint=path, progress=False).fit()
    again = Trainer(_config(method="nonprivate", epochs=1, lr=0.2), checkpoint=path, progress=False)
    with pytest.raises(
        CheckpointError,
        match=r"already holds a run \(nonprivate, 1 of 1 epochs\): --resume continues "
        "it, --overwrite replaces it",
    ):
        again.fit()
    assert read_checkpoint(path)["config"]["lr"] == 0.5
    again.fit(overwrite=True)
    assert read_checkpoint(path)["config"]["lr"] == 0.2


@pytest.mark.parametrize(
    "method,extra,stop_at",
    [
        ("nonprivate", {}, 6),  # shuffled batches; in epoch 2 (4 steps an epoch)
        ("dp-mix", dict(k_base=2, k_self=1), 2),  # Poisson batches and augmentations; in epoch 1: nothing completed yet
        ("dp-sam", dict(noise_multiplier=1.0, canaries=2), 7),
    ],
)
def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(tmp_path, ctrl_c_at, method, extra, stop_at):
    config = _config(method=method, epochs=3, **extra)
    whole = Trainer(config, progress=False)
    whole.fit()

    ctrl_c_at(stop_at)
    stopped = Trainer(config, checkpoint=tmp_path / "c.pt", progress=False)
    with pytest.raises(TrainingInterrupted) as caught:
        stopped.fit()
    steps = len(stopped.loader)
    epoch, step = divmod(stop_at, steps)
    assert (caught.value.epoch, caught.value.step, caught.value.steps) == (epoch + 1, step, steps)
    assert f"after step {step} of {steps} of epoch {epoch + 1}; saved in {tmp_path / 'c.pt'}" in str(caught.value)
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]  # the lock was released

    saved = read_checkpoint(tmp_path / "c.pt")
    assert len(saved["history"]) == epoch and saved["interrupted"]["step"] == step
    if epoch:  # readers see the last completed epoch, as it was saved
        model, _, history = load_trained(tmp_path / "c.pt")
        assert history == whole.history[:epoch] and history == stopped.history
    else:
        with pytest.raises(CheckpointError, match="no trained model yet: the run stopped in its first epoch"):
            load_trained(tmp_path / "c.pt")

    torch.manual_seed(99)
    resumed = Trainer(config, checkpoint=tmp_path / "c.pt", progress=False)
    history = resumed.fit(resume=True)
    assert _same_params(whole.model, resumed.model)
    assert [r["train_loss"] for r in history] == pytest.approx([r["train_loss"] for r in whole.history], rel=1e-12)
    assert [r.get("epsilon") for r in history] == [r.get("epsilon") for r in whole.history]
    assert "interrupted" not in read_checkpoint(tmp_path / "c.pt")


def test_ctrl_c_after_the_last_step_completes_the_epoch_and_a_second_one_stops_at_once(tmp_path, ctrl_c_at):
    config = _config(method="dp-sgd", epochs=3)
    ctrl_c_at(4)  # the last step of epoch 1: the epoch is completed, audited and saved, then training stops
    trainer = Trainer(config, checkpoint=tmp_path / "c.pt", progress=False)
    with pytest.raises(TrainingInterrupted, match="stopped after epoch 1; saved in"):
        trainer.fit()
    saved = read_checkpoint(tmp_path / "c.pt")
    assert len(saved["history"]) == 1 and saved.get("interrupted") is None

    ctrl_c_at(2, times=2)  # twice: the second interrupts at once, unsaved (the last checkpoint stays)
    resumed = Trainer(config, checkpoint=tmp_path / "c.pt", progress=False)
    with pytest.raises(KeyboardInterrupt) as caught:
        resumed.fit(resume=True)
    assert not isinstance(caught.value, TrainingInterrupted)
    assert read_checkpoint(tmp_path / "c.pt")["history"] == saved["history"]
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


@pytest.mark.parametrize(
    "bad,message",
    [
        (dict(method="sgd"), "--method must be one of nonprivate, dp-sgd"),
        (dict(method="dp-mix", k_self=0), r"--method dp-mix mixes self-augmentations: give --k-self >= 1"),
        (dict(method="dp-sgd", k_self=2), "--k-self 2 applies to --method dp-mix and dp-mix-diff only"),
        (dict(method="dp-sgd", k_base=2), "--method dp-sgd takes no --k-base .*use --method self-aug"),
        (dict(method="self-aug", k_base=1), r"--k-base 1 is --method dp-sgd"),
        (dict(method="dp-mix", k_base=2, k_self=1, k_diff=1), "--k-diff >= 1 goes with --method dp-mix-diff"),
        (dict(method="dp-mix-diff", k_base=2, k_self=1), "--k-diff >= 1 goes with"),
        (dict(method="nonprivate", target_epsilon=1.0), "--method nonprivate is non-private"),
        (dict(method="sam", k_base=2), "--method sam is non-private: it takes no --k-base"),
        (dict(method="dp-sam", rho=0.0), "--rho must be > 0"),
        (dict(canary_repeats=0), "--canary-repeats >= 1"),
        (dict(epochs=0), "--epochs 0"),
        (dict(delta=1.0), "--delta"),
        (dict(audit_known=48), "--audit-known 48 must be >= 0 and below --audit-examples 48"),
    ],
)
def test_bad_configurations_are_refused_naming_their_flags(bad, message):
    with pytest.raises(ValueError, match=message) as caught:
        _config(**bad)
    assert "_" not in str(caught.value)  # flags, not field names


def test_train_examples_larger_than_the_data_is_refused():
    with pytest.raises(ValueError, match="--train-examples 5000 but digits has"):
        Trainer(_config(train_examples=5000), progress=False)
    # dp-mix-diff's public pool is cut from the training split: it cannot overlap the private set.
    with pytest.raises(ValueError, match=r"less the 200 of the public pool \(--pool-examples\)"):
        Trainer(_config(method="dp-mix-diff", k_base=2, k_self=1, k_diff=1, train_examples=1200), progress=False)
    # More known examples than the audit attacks (the training set is smaller than --audit-examples).
    with pytest.raises(ValueError, match="--audit-known 30 must be below 24, the members and non-members"):
        Trainer(_config(train_examples=24, audit_examples=100, audit_known=30), progress=False)


def test_k_base_counts_self_augmentations_and_augmult_is_the_total():
    trainer = Trainer(_config(method="self-aug", k_base=3, epochs=1), progress=False)
    assert trainer.config.augmult == trainer.augmenter.augmult == 3 and trainer.fit()[-1]["epsilon"] > 0
    assert trainer.trained.augmult == 3  # the engine clips over the K rows of an example
    mix = _config(method="dp-mix", k_base=8, k_self=8)
    assert mix.augmult == 16 and mix.augmenter(10).augmult == 16
    assert "augmult" not in mix.to_dict() and mix.to_dict()["k_base"] == 8
    with pytest.raises(TypeError):
        TrainConfig(augmult=2)  # the old name of k_base is not silently taken for the total


def test_the_pool_of_dp_mix_diff_is_disjoint_from_the_private_set():
    config = _config(method="dp-mix-diff", k_base=2, k_self=1, k_diff=2, pool_examples=40)
    mixer = Trainer(config, progress=False).augmenter
    train, _ = load_data(config)
    pool = load_pool(config)
    assert mixer.k_diff == 2 and len(pool.y) == 40
    # No public example is a private one (digits has no duplicate images across these rows).
    assert not (pool.x.flatten(1)[:, None] == train.x.flatten(1)[None]).all(-1).any()


def test_augmentation_defaults_suit_the_data_set():
    assert set(DATASET_AUGMENTATION) == set(DATASETS)
    digits = TrainConfig(method="dp-mix", k_base=2, k_self=1)
    assert (digits.crop_padding, digits.flip) == (1, False)  # 8x8 digits: a mirrored 3 is no digit
    augmenter = digits.augmenter(10)
    assert (augmenter.crop_padding, augmenter.flip) == (1, False)
    cifar = TrainConfig(dataset="cifar10", method="self-aug", k_base=2)
    assert (cifar.crop_padding, cifar.flip) == (4, True)
    assert (TrainConfig(dataset="fashion-mnist").crop_padding, TrainConfig(dataset="synthetic").flip) == (3, False)
    explicit = TrainConfig(flip=True, crop_padding=0)  # given values win
    assert (explicit.crop_padding, explicit.flip) == (0, True)
    # The values used are stored, so a run resumes with them even if a default changes.
    assert TrainConfig.from_dict(digits.to_dict()).to_dict() == digits.to_dict() and digits.to_dict()["flip"] is False


def test_a_target_epsilon_run_warns_of_nothing(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(_config(method="dp-sgd", epochs=1, target_epsilon=1.0), progress=False).fit()
    assert not [w for w in caught if "Optimal order" in str(w.message)], [str(w.message) for w in caught]


def test_progress_in_a_log_has_one_bar_without_cursor_moves(tmp_path, capsys):
    Trainer(_config(method="dp-sgd", epochs=2), progress=True).fit()
    err = capsys.readouterr().err  # not a terminal: no nested bar, no cursor-up escapes
    assert "\x1b[A" not in err and "epoch 1:" not in err
    assert "2/2" in err and ("epoch/s" in err or "s/epoch" in err)
