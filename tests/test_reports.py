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
    ADVANTAGE_NOTE,
    curves_figure,
    epsilon_figure,
    format_audit,
    format_table,
    load_audits,
    loss_histogram_figure,
    lrc_matrix,
    plot_curves,
    plot_epsilon,
    plot_loss_histograms,
    plot_lrc,
    plot_reconstructions,
    plot_roc,
    roc_figure,
    summarize,
    table,
    write_report,
)


def _record(epoch, accuracy, advantage, epsilon=None):
    record = {
        "epoch": epoch,
        "steps": 10 * epoch,
        "test_accuracy": accuracy,
        "train_accuracy": accuracy + 0.05,
        "train_loss": 1.0 / epoch,
        "calibrated": {
            "auc": 0.5 + advantage / 2,
            "decision_advantage": advantage,
            "p_err": (1 - advantage) / 2,
            "best_advantage": advantage + 0.1,
            "tpr_at_fpr": {0.001: 0.0, 0.01: advantage / 4},
        },
    }
    if epsilon is not None:
        record |= {"epsilon": epsilon, "dp_perr_bound": dp_perr_bound(epsilon, 1e-5), "noise_multiplier": 1.25}
    return record


RUNS = {
    "non-private": {
        "config": {"method": "nonprivate"},
        "history": [_record(e, 0.6 + 0.1 * e, 0.05 * e) for e in (1, 2, 3)],
    },
    "DP-SGD": {
        "config": {"method": "dp-sgd"},
        "history": [_record(e, 0.5 + 0.1 * e, 0.01 * e, 0.5 * e) for e in (1, 2, 3)],
    },
}


def test_summary_and_table_show_the_last_epoch():
    rows = {name: summarize(run["history"], attack="calibrated") for name, run in RUNS.items()}
    assert rows["DP-SGD"]["epsilon"] == 1.5 and rows["non-private"]["epsilon"] is None
    assert rows["DP-SGD"]["dp_perr_bound"] == pytest.approx((1 - 1e-5) / (1 + 2.718281828459045**1.5))
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
    path = plot_curves(
        {name: run["history"] for name, run in RUNS.items()}, tmp_path / "curves.png", attack="calibrated"
    )
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
    distances = plot_loss_histograms(
        {"fresh": fresh, "memorizing": memorizing}, members, nonmembers, tmp_path / "losses.png"
    )
    assert 0 <= distances["fresh"] < distances["memorizing"] <= 1
    assert distances["memorizing"] > 0.5  # random labels: members near zero loss, non-members far from it
    assert matplotlib.image.imread(tmp_path / "losses.png").shape[1] > 600  # two panels side by side

    lrc = lrc_matrix({"fresh": fresh, "memorizing": memorizing, "same": memorizing}, members)
    assert lrc["same"]["memorizing"] == pytest.approx(1.0) and lrc["fresh"]["fresh"] == 1.0
    assert lrc["fresh"]["memorizing"] == lrc["memorizing"]["fresh"] < 0.9

    write_report(
        tmp_path / "with_models",
        {"a": RUNS["DP-SGD"], "b": RUNS["non-private"]},
        attack="calibrated",
        models={"a": fresh, "b": memorizing},
        members=members,
        nonmembers=nonmembers,
    )
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
    path = plot_reconstructions(
        {"clean": images, "reconstructed": images.flip(0)},
        tmp_path / "r.png",
        titles={"reconstructed": ["1 dB", "2 dB", "3 dB"]},
    )
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


# -- what the reports say they measured ----------------------------------------------------------
def test_one_table_formatter_aligns_text_and_markdown():
    text = table(["name", "value"], [["a", "1.5"], ["longer", "10.25"]]).splitlines()
    assert text == ["name    value", "a         1.5", "longer  10.25"]  # first column left, numbers right
    markdown = table(["name", "value"], [["a", 1]], markdown=True, align="lr").splitlines()
    assert markdown == ["| name | value |", "| --- | ---: |", "| a | 1 |"]
    assert table(["a", "b"], [["x", "y"]], align="ll").splitlines()[1] == "x  y"
    with pytest.raises(ValueError, match="2 cells"):
        table(["a", "b"], [["only one"]])


def test_the_two_advantages_have_two_names():
    rows = {name: summarize(run["history"], attack="calibrated") for name, run in RUNS.items()}
    assert rows["non-private"]["decision_advantage"] == pytest.approx(0.15)
    assert rows["non-private"]["best_advantage"] == pytest.approx(0.25)
    header, first = format_table(rows).splitlines()[:2]
    assert "decision advantage" in header and "best-threshold advantage" in header
    assert "+0.150" in first and "+0.250" in first
    assert "after seeing every score" in ADVANTAGE_NOTE and "own threshold" in ADVANTAGE_NOTE
    # A run recorded before the names were split, read back from JSON (string FPR levels), still reports.
    old = json.loads(
        json.dumps(
            [
                {
                    **_record(1, 0.9, 0.2),
                    "calibrated": {"auc": 0.6, "advantage": 0.2, "p_err": 0.4, "tpr_at_fpr": {0.001: 0.01, 0.01: 0.05}},
                }
            ]
        )
    )
    summary = summarize(old, attack="calibrated")
    assert summary["decision_advantage"] == 0.2 and summary["best_advantage"] is None
    assert summary["tpr_at_1pct_fpr"] == 0.05 and summary["tpr_at_01pct_fpr"] == 0.01
    assert format_table({"old": summary}).splitlines()[1].split()[5] == "-"  # no best-threshold advantage


def _runs(n):
    """``n`` synthetic runs of 3 epochs (few enough for fractional ticks by default)."""
    return {
        f"run {i}": [_record(e, 0.5 + 0.05 * e + 0.01 * i, 0.02 * e, 0.5 * e if i else None) for e in range(1, 4)]
        for i in range(n)
    }


def _inside_the_canvas(fig):
    width, height = fig.get_size_inches() * fig.dpi
    assert width <= 2000 and height <= 1400, (width, height)


def _legend_outside_the_axes(fig, below=False):
    fig.draw_without_rendering()  # runs the constrained layout
    legend = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        if ax.get_visible():
            box = ax.get_window_extent()
            assert legend.y1 <= box.y0 + 1 if below else legend.x0 >= box.x1 - 1


@pytest.mark.parametrize("n", [1, 12])
def test_curves_stay_readable_from_1_to_12_runs(n):
    fig = curves_figure(_runs(n), attack="calibrated")
    _inside_the_canvas(fig)
    _legend_outside_the_axes(fig)
    assert not any(ax.get_legend() for ax in fig.axes)  # no legend over the data
    labels = fig.legends[0].get_texts()
    assert [t.get_text() for t in labels][:n] == list(_runs(n))
    for ax in fig.axes:
        twin = len(ax.get_shared_x_axes().get_siblings(ax)) > 1  # the P_err axis shares the epsilon panel's x
        assert ax.get_ylabel() and (ax.get_xlabel() or twin)
        if ax.get_xlabel() == "epoch":
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks)


@pytest.mark.parametrize("n", [1, 12])
def test_epsilon_figure_shows_runs_that_spend_the_same_epsilon(n):
    fig = epsilon_figure(_runs(n + 1))  # run 0 is non-private and left out
    _inside_the_canvas(fig)
    _legend_outside_the_axes(fig)
    lines = fig.axes[0].get_lines()
    assert len(lines) == n
    styles = {(line.get_marker(), line.get_linestyle(), line.get_color()) for line in lines}
    assert len(styles) == n  # identical curves still differ in marker, dashes and color
    ticks = fig.axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)


@pytest.mark.parametrize("n", [1, 12])
def test_loss_histograms_wrap_into_a_labelled_grid(n):
    g = torch.Generator().manual_seed(0)
    members = Split(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))
    models = {f"model {i}": MLP(4, 3, hidden=(4,)) for i in range(n)}
    fig, distances = loss_histogram_figure(models, members, members)
    _inside_the_canvas(fig)
    _legend_outside_the_axes(fig)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == n and len(distances) == n
    rows, cols = shown[0].get_subplotspec().get_geometry()[:2]
    assert (rows, cols) == ((1, 1) if n == 1 else (3, 4))  # 12 panels: 3 rows of 4, not a row of 12
    for ax in shown:
        assert ax.get_xlabel() == "cross-entropy loss" and ax.get_ylabel().startswith("density")


def test_roc_legend_gives_auc_and_low_fpr_tpr_and_merges_shared_scores():
    fpr = [0.0, 0.001, 0.01, 0.1, 1.0]
    loss_roc = {"fpr": fpr, "tpr": [0.0, 0.02, 0.05, 0.3, 1.0]}
    fig = roc_figure({"yeom": loss_roc, "calibrated": dict(loss_roc), "lira_online": {"fpr": fpr, "tpr": fpr}})
    _legend_outside_the_axes(fig, below=True)  # long entries go below, where they do not squeeze the axes
    assert fig.axes[0].get_window_extent().width > 0.6 * fig.bbox.width
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == 3  # one curve for the two attacks of the same score, LiRA, chance
    auc = sum((b - a) * (c + d) / 2 for a, b, c, d in zip(fpr, fpr[1:], loss_roc["tpr"], loss_roc["tpr"][1:]))
    assert labels[0] == f"yeom = calibrated (same score): AUC {auc:.3f}, TPR@0.1%FPR 0.020"
    assert labels[1] == "lira_online: AUC 0.500, TPR@0.1%FPR 0.001"


AUDIT = {
    "source": "runs/a/checkpoint.pt",
    "method": "dp-sgd",
    "epoch": 3,
    "config": {},
    "members": 60,
    "nonmembers": 60,
    "known": 20,
    "shadows": 4,
    "shared_scores": [["yeom", "calibrated"]],
    "record": {
        "epoch": 3,
        "test_accuracy": 0.8,
        "train_accuracy": 0.9,
        "epsilon": 2.0,
        "dp_perr_bound": 0.1,
        "yeom": {
            "decision_advantage": 0.05,
            "p_err": 0.475,
            "auc": 0.55,
            "best_advantage": 0.12,
            "tpr_at_fpr": {"0.001": 0.0, "0.01": 0.02},
        },
        "lira_online": {
            "decision_advantage": None,
            "p_err": None,
            "auc": 0.6,
            "best_advantage": 0.2,
            "tpr_at_fpr": {"0.001": 0.01, "0.01": 0.04},
        },
    },
    "canaries": {
        "inserted": 2,
        "references": 100,
        "repeats": 4,
        "max_exposure": 6.66,
        "labels": [1, 2],
        "losses": [0.1, 0.2],
        "exposure": [5.0, 3.0],
        "exposure_extrapolated": [7.0, 3.5],
        "extrapolation_note": None,
    },
}


def test_format_audit_names_what_it_measured():
    text = format_audit(AUDIT)
    rows = {
        line.split()[0]: line.split() for line in text.splitlines() if line.split()[:1] in (["yeom"], ["lira_online"])
    }
    assert rows["yeom"][4:6] == ["+0.050", "+0.120"] and rows["lira_online"][4:6] == ["-", "+0.200"]
    assert "yeom, calibrated score every example alike" in text and ADVANTAGE_NOTE in text
    assert "2 canaries inserted 4 times each" in text and "mean" in text
    markdown = format_audit(AUDIT, markdown=True)
    assert "| attack | test acc |" in markdown and "### Canary exposure" in markdown


def test_report_includes_the_audits_written_next_to_the_checkpoint(tmp_path):
    run = tmp_path / "DP-SGD"
    run.mkdir()
    assert load_audits(run) == {}
    (run / "audit.json").write_text(json.dumps(AUDIT))
    (run / "epsilon_audit.json").write_text(
        json.dumps(
            {
                "method": "one-run",
                "accountant_epsilon": 1.5,
                "epsilon": 0.4,
                "epsilon_low": 0.4,
                "epsilon_high": 0.4,
                "confidence": 0.95,
            }
        )
    )
    (run / "rmia").mkdir()  # privfast audit --attack rmia writes its own roc.png there
    (run / "rmia" / "rmia.json").write_text(
        json.dumps({"results": {"rmia_online": {"auc": 0.61, "tpr_at_fpr": {"0.001": 0.003, "0.01": 0.03}}}})
    )
    audits = load_audits(run)
    assert sorted(audits) == ["epsilon", "membership", "rmia"]
    path = write_report(tmp_path / "report", RUNS, attack="calibrated", audits={"DP-SGD": audits, "non-private": {}})
    text = path.read_text()
    assert "## Audits" in text and "### DP-SGD: membership attacks" in text and "non-private: membership" not in text
    assert "| DP-SGD | one-run | 1.500 | 0.400 [0.400, 0.400] | 95% |" in text
    assert "| DP-SGD | rmia_online | 0.610 | 0.003 | 0.030 |" in text and "Canary exposure" in text
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["DP-SGD"]["audits"]["membership"]["shadows"] == 4 and "audits" not in results["non-private"]
    (run / "audit.json").write_text(json.dumps({"record": AUDIT["record"], "shadows": 4, "canaries": None}))
    old = write_report(tmp_path / "old", RUNS, attack="calibrated", audits={"DP-SGD": load_audits(run)}).read_text()
    assert "written by an older privfast" in old
    (run / "rmia" / "rmia.json").write_text("{truncated")
    with pytest.raises(ValueError, match="rmia.json: not a readable audit"):
        load_audits(run)
    assert "## Audits" not in write_report(tmp_path / "plain", RUNS, attack="calibrated").read_text()


def test_audits_older_than_the_checkpoint_are_left_out(tmp_path):
    # privfast train --overwrite (or --resume) writes a new checkpoint: the audit beside it was of the old model.
    import os

    run = tmp_path / "run"
    run.mkdir()
    (run / "audit.json").write_text(json.dumps(AUDIT))
    (run / "checkpoint.pt").write_bytes(b"new model")
    os.utime(run / "audit.json", (1_000_000, 1_000_000))
    with pytest.warns(UserWarning, match="older than .*checkpoint.pt"):
        assert load_audits(run) == {}
    os.utime(run / "audit.json")  # audited after the checkpoint: kept
    assert sorted(load_audits(run)) == ["membership"]
