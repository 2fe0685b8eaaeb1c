"""privfast.demo: the demo's comparison, its notes on what the seeds predict, and the cli wrapper."""

import os
from pathlib import Path

import pytest

from privfast import cli, commands
from privfast.demo import DEMO_RUNS, RESULTS_POINTER, DemoResult, run_demo

CIFAR10_ROOT = os.environ.get("PRIVFAST_CIFAR10_ROOT")
needs_cifar10 = pytest.mark.skipif(
    not CIFAR10_ROOT,
    reason="PRIVFAST_CIFAR10_ROOT is not set: real CIFAR-10 files "
    "(python ../shared/data/make_cifar10.py DIR, then PRIVFAST_CIFAR10_ROOT=DIR)",
)


def check_result(result: DemoResult, out: Path) -> None:
    assert list(result.rows) == ["non-private", "DP-SGD", "DP-Mix"]
    assert result.rows["non-private"]["epsilon"] is None and result.rows["DP-SGD"]["epsilon"] > 0
    assert set(result.expectations) == set(result.rows)
    # The DP-Mix line never reads as the method's verdict: it states the prediction and where CIFAR-10 is.
    assert any(RESULTS_POINTER in note for note in result.notes)
    assert result.report == out / "report.md" and result.report.stat().st_size > 0
    assert RESULTS_POINTER in result.report.read_text()


def test_digits_demo_runs_the_three_runs_and_says_what_the_seeds_predict(tmp_path):
    result = run_demo(dataset="digits", out=tmp_path, epochs_scale=0.05, train_examples=150, progress=False)
    check_result(result, tmp_path)
    # Digits: no flips (a mirrored digit is another digit) and 1-pixel crops on 8x8 images.
    assert result.runs["DP-Mix"]["config"]["flip"] is False and result.runs["DP-Mix"]["config"]["crop_padding"] == 1


@needs_cifar10
def test_cifar10_demo_runs_the_same_comparison(tmp_path):
    result = run_demo(
        dataset="cifar10", data_root=CIFAR10_ROOT, out=tmp_path, epochs_scale=0.05, train_examples=150, progress=False
    )
    check_result(result, tmp_path)
    config = result.runs["DP-Mix"]["config"]
    assert config["dataset"] == "cifar10" and config["flip"] is True and config["crop_padding"] == 4
    assert sorted(result.runs) == sorted(DEMO_RUNS["cifar10"])


def test_run_demo_rejects_unknown_data_and_cifar_without_a_root(tmp_path):
    with pytest.raises(ValueError, match="runs on"):
        run_demo(dataset="mnist", out=tmp_path)
    with pytest.raises(ValueError, match="data_root"):
        run_demo(dataset="cifar10", out=tmp_path)


def test_cli_demo_only_parses_calls_and_prints(tmp_path, monkeypatch, capsys):
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        row = {
            "epochs": 1,
            "test_accuracy": 0.5,
            "train_accuracy": 0.6,
            "epsilon": None,
            "auc": 0.5,
            "decision_advantage": 0.0,
            "best_advantage": 0.0,
            "advantage": 0.0,
            "tpr_at_1pct_fpr": 0.01,
            "tpr_at_01pct_fpr": 0.0,
            "p_err": 0.5,
            "dp_perr_bound": 0.0,
        }
        return DemoResult(
            rows={"non-private": row},
            runs={},
            expectations={},
            notes=["a note"],
            report=tmp_path / "report.md",
            header="the header",
        )

    monkeypatch.setattr(commands, "run_demo", fake)
    assert (
        cli.main(
            [
                "demo",
                "--dataset",
                "cifar10",
                "--data-root",
                "/data",
                "--out",
                str(tmp_path),
                "--seed",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    assert calls == [
        dict(
            dataset="cifar10",
            data_root="/data",
            out=tmp_path,
            epochs_scale=1.0,
            train_examples=None,
            seed=3,
            progress=False,
        )
    ]
    out = capsys.readouterr().out
    assert "the header" in out and "a note" in out and "report:" in out
