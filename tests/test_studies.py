"""Smoke tests of the studies/ scripts at a tiny size on real CIFAR-10 (skipped without PRIVFAST_CIFAR10_ROOT)."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

STUDIES = Path(__file__).resolve().parents[1] / "studies"
CIFAR10_ROOT = os.environ.get("PRIVFAST_CIFAR10_ROOT")
pytestmark = pytest.mark.skipif(
    not CIFAR10_ROOT,
    reason="PRIVFAST_CIFAR10_ROOT is not set: real CIFAR-10 files "
    "(python ../shared/data/make_cifar10.py DIR, then PRIVFAST_CIFAR10_ROOT=DIR)",
)


def load(name: str):
    sys.path.insert(0, str(STUDIES))  # the scripts import their shared helpers as `common`
    try:
        spec = importlib.util.spec_from_file_location(f"study_{name}", STUDIES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(STUDIES))


def run(name: str, tmp_path: Path, *argv: str) -> dict:
    assert (
        load(name).main(
            ["--data-root", CIFAR10_ROOT, "--out", str(tmp_path), "--seeds", "0", "1", "--threads", "1", *argv]
        )
        == 0
    )
    stem = argv[argv.index("--name") + 1] if "--name" in argv else name
    assert (tmp_path / f"{stem}.md").read_text().count("Scaled down:") == 1
    return json.loads((tmp_path / f"{stem}.json").read_text())


def test_dp_mix_study(tmp_path):
    result = run(
        "dp_mix",
        tmp_path,
        "--train",
        "64",
        "--test",
        "64",
        "--pool",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--width",
        "4",
        "--epsilons",
        "8",
        "--methods",
        "DP-SGD",
        "DP-Mix_Self",
    )
    assert {r["method"] for r in result["runs"]} == {"DP-SGD", "DP-Mix_Self"}
    # Same steps and noise for every method at one epsilon.
    assert len({(r["steps"], round(r["noise_multiplier"], 6)) for r in result["runs"]}) == 1


def test_early_stopping_study(tmp_path):
    result = run(
        "early_stopping",
        tmp_path,
        "--train",
        "120",
        "--test",
        "120",
        "--epochs",
        "1",
        "--width",
        "4",
        "--audit-examples",
        "110",
    )
    assert len(result["histories"]["DP-SGD"][0]) == 1 and "dp_perr_bound" in result["histories"]["DP-SGD"][0][-1]
    assert (tmp_path / "early_stopping.png").stat().st_size > 0


def test_label_smoothing_study(tmp_path):
    result = run(
        "label_smoothing",
        tmp_path,
        "--train",
        "120",
        "--test",
        "120",
        "--epochs",
        "1",
        "--width",
        "4",
        "--n-known",
        "20",
    )
    assert {r["mechanism"] for r in result["runs"]} == {"none", "LS", "MU"}
    assert result["lrc"][0]["none"]["none"] == 1.0


def test_ats_study(tmp_path):
    result = run(
        "ats",
        tmp_path,
        "--train",
        "40",
        "--test",
        "40",
        "--width",
        "4",
        "--semi-epochs",
        "1",
        "--acc-epochs",
        "1",
        "--policies",
        "2",
        "--scored",
        "2",
        "--attacked",
        "1",
        "--iterations",
        "2",
    )
    assert len(result["per_seed"]) == 2 and len(result["per_seed"][0]["policies"]) == 3
    # Every defense is attacked and trained; noise and pruning train on their defended gradients.
    for r in result["per_seed"]:
        assert (
            set(r["accuracy"])
            == set(r["defenses"])
            == {
                "no defense",
                "Gaussian noise 0.001",
                "pruning 70%",
                "ATS hybrid",
            }
        )
        assert all(0 <= a <= 1 for a in r["accuracy"].values())
