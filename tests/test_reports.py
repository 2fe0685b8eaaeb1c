"""Reports: the comparison table, the per-epoch curves, the loss histograms and the files written."""

import json

import matplotlib.image
import pytest
import torch

from privfast.attacks.training import train_classifier
from privfast.data import Split
from privfast.metrics import dp_perr_bound
from privfast.models import MLP
from privfast.reports import (
    format_table,
    lrc_matrix,
    plot_curves,
    plot_epsilon,
    plot_loss_histograms,
    plot_lrc,
    plot_reconstructions,
    plot_roc,
    summarize,
    write_report,
)


def _record(epoch, accuracy, advantage, epsilon=None):
    record = {"epoch": epoch, "steps": 10 * epoch, "test_accuracy": accuracy, "train_accuracy": accuracy + 0.05, "train_loss": 1.0 / epoch,
              "calibrated": {"auc": 0.5 + advantage / 2, "advantage": advantage, "p_err": (1 - advantage) / 2,
                             "best_advantage": advantage, "tpr_at_fpr": {0.001: 0.0, 0.01: advantage / 4}}}
    if epsilon is not None:
        record |= {"epsilon": epsilon, "dp_perr_bound": dp_perr_bound(epsilon, 1e-5), "noise_multiplier": 1.25}
    return record


RUNS = {
    "non-private": {"config": {"method": "nonprivate"},
                    "history": [_record(e, 0.6 + 0.1 * e, 0.05 * e) for e in (1, 2, 3)]},
    "DP-SGD": {"config": {"method": "dp-sgd"},
               "history": [_record(e, 0.5 + 0.1 * e, 0.01 * e, 0.5 * e) for e in (1, 2, 3)]},
}


def test_summary_and_table_show_the_last_epoch():
    rows = {name: summarize(run["history"], attack="calibrated") for name, run in RUNS.items()}
    assert rows["DP-SGD"]["epsilon"] == 1.5 and rows["non-private"]["epsilon"] is None
    assert rows["DP-SGD"]["dp_perr_bound"] == pytest.approx((1 - 1e-5) / (1 + 2.718281828459045 ** 1.5))
    assert rows["non-private"]["dp_perr_bound"] == 0.0
    assert rows["non-private"]["tpr_at_1pct_fpr"] == pytest.approx(0.15 / 4)
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["run", "test", "acc"] and len(lines) == 3
    assert lines[1].split()[:3] == ["non-private", "0.900", "inf"] and "+0.150" in lines[1]
    assert "1.50" in lines[2] and f"{rows['DP-SGD']['dp_perr_bound']:.4f}" in lines[2]
    markdown = format_table(rows, markdown=True).splitlines()
    assert markdown[1].startswith("| --- |") and markdown[2].startswith("| non-private | 0.900 | inf |")
    with pytest.raises(ValueError, match="'lira' was not audited"):
        summarize(RUNS["DP-SGD"]["history"], attack="lira")
    with pytest.raises(ValueError, match="no epoch recorded"):
        summarize([], attack="calibrated")


def test_curves_are_written_as_png(tmp_path):
    path = plot_curves({name: run["history"] for name, run in RUNS.items()}, tmp_path / "curves.png",
                       attack="calibrated")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # something was drawn


def test_loss_histograms_separate_a_memorizing_model(tmp_path):
    g = torch.Generator().manual_seed(0)
    members = Split(torch.randn(48, 1, 4, 4, generator=g), torch.randint(0, 4, (48,), generator=g))
    nonmembers = Split(torch.randn(48, 1, 4, 4, generator=g), torch.randint(0, 4, (48,), generator=g))
    torch.manual_seed(0)
    fresh = MLP(16, 4, hidden=(64,))
    torch.manual_seed(0)
    memorizing = train_classifier(MLP(16, 4, hidden=(64,)), *members, epochs=150, lr=1e-2, batch_size=16)
    distances = plot_loss_histograms({"fresh": fresh, "memorizing": memorizing}, members, nonmembers,
                                     tmp_path / "losses.png")
    assert 0 <= distances["fresh"] < distances["memorizing"] <= 1
    assert distances["memorizing"] > 0.5  # random labels: members near zero loss, non-members far from it
    assert matplotlib.image.imread(tmp_path / "losses.png").shape[1] > 600  # two panels side by side

    lrc = lrc_matrix({"fresh": fresh, "memorizing": memorizing, "same": memorizing}, members)
    assert lrc["same"]["memorizing"] == pytest.approx(1.0) and lrc["fresh"]["fresh"] == 1.0
    assert lrc["fresh"]["memorizing"] == lrc["memorizing"]["fresh"] < 0.9

    write_report(tmp_path / "with_models", {"a": RUNS["DP-SGD"], "b": RUNS["non-private"]}, attack="calibrated",
                 models={"a": fresh, "b": memorizing}, members=members, nonmembers=nonmembers)
    text = (tmp_path / "with_models" / "report.md").read_text()
    assert "![loss histograms](losses.png)" in text and f"| a | 1.000 | {lrc['fresh']['memorizing']:.3f} |" in text
    assert "![LRC heatmap](lrc.png)" in text and _png(tmp_path / "with_models" / "lrc.png").shape[0] > 100


def _png(path):
    """The image at ``path``, failing unless it is a PNG that decodes to pixels with something drawn."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image[..., :3].std() > 0.02
    return image


def test_roc_epsilon_and_lrc_figures_are_pngs(tmp_path):
    fpr = [0.0, 0.001, 0.01, 0.1, 1.0]
    rocs = {"lira": {"fpr": fpr, "tpr": [0.0, 0.02, 0.05, 0.3, 1.0]}, "chance-like": {"fpr": fpr, "tpr": fpr}}
    assert _png(plot_roc(rocs, tmp_path / "roc.png")).shape[0] > 300
    path = plot_epsilon({name: run["history"] for name, run in RUNS.items()}, tmp_path / "epsilon.png")
    assert path == tmp_path / "epsilon.png" and _png(path).shape[1] > 300
    # Only non-private runs: no epsilon to plot, no file.
    assert plot_epsilon({"np": RUNS["non-private"]["history"]}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    _png(plot_lrc({"a": {"a": 1.0, "b": 0.3}, "b": {"a": 0.3, "b": 1.0}}, tmp_path / "lrc.png"))


def test_reconstruction_grid(tmp_path):
    images = torch.rand(3, 3, 8, 8)
    path = plot_reconstructions({"clean": images, "reconstructed": images.flip(0)}, tmp_path / "r.png",
                                titles={"reconstructed": ["1 dB", "2 dB", "3 dB"]})
    assert matplotlib.image.imread(path).shape[0] > 200
    with pytest.raises(ValueError, match="same shape"):
        plot_reconstructions({"a": images, "b": images[:2]}, tmp_path / "bad.png")


def test_write_report_writes_markdown_json_and_plots(tmp_path):
    path = write_report(tmp_path / "report", RUNS, attack="calibrated", title="test report", notes=["ran fast"])
    assert path == tmp_path / "report" / "report.md"
    text = path.read_text()
    assert text.startswith("# test report") and "ran fast" in text and "![per-epoch curves](curves.png)" in text
    assert "| DP-SGD |" in text and "losses.png" not in text and "![epsilon vs steps](epsilon.png)" in text
    assert "**DP-SGD**: noise multiplier used: 1.25; method=dp-sgd" in text and "**non-private**: method=" in text
    assert (tmp_path / "report" / "curves.png").stat().st_size > 1000
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["DP-SGD"]["summary"]["epsilon"] == 1.5 and len(results["non-private"]["history"]) == 3
    with pytest.raises(ValueError, match="need members and nonmembers"):
        write_report(tmp_path / "x", RUNS, attack="calibrated", models={"a": MLP(16, 4)})
