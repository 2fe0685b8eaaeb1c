"""Reports: the tables every command prints, the privfast report of several runs, and its plots.

A *run* is what :class:`privfast.trainer.Trainer` leaves: its configuration and its per-epoch
history. :func:`write_report` puts several runs side by side:

- a table of the last epoch: test accuracy, epsilon, attack AUC, the two advantages (below), TPR
  at 1% FPR, the attack's error P_err and the DP lower bound on it ``(1 - delta) / (1 + e^epsilon)``
  (Liu, Oya & Kerschbaum, "Generalization techniques empirically outperform differential privacy
  against membership inference", arXiv 2021);
- per-epoch curves: accuracy, the attack's decision advantage and epsilon over training, and test
  accuracy against P_err, one point per epoch (their privacy-utility curves, where early stopping
  shows up as a point of the curve);
- member and non-member loss histograms with their Jensen-Shannon distance, and the loss rank
  correlation (LRC) between every two runs' models on the same training examples (Kaya &
  Dumitras, "When does data augmentation help with membership inference attacks?", ICML 2021,
  Fig. 1 and Figs. 6-8);
- the audits ``privfast audit`` wrote next to each run's checkpoint, when present: membership
  attacks with LiRA and canary exposure (:func:`format_audit`), epsilon lower bounds, RMIA.

Two advantages are reported, under different names, because they measure different things
(:data:`ADVANTAGE_NOTE`). :func:`table` is the one table formatter of every command.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # torch loads in about a second: only the functions that need it import it
    from torch import Tensor, nn

    from privfast.audit import ModelAudit
    from privfast.data import Split

__all__ = [
    "ADVANTAGE_NOTE",
    "AUDIT_FILES",
    "COLUMNS",
    "curves_figure",
    "epsilon_figure",
    "format_audit",
    "format_exposure",
    "format_table",
    "load_audits",
    "loss_histogram_figure",
    "lrc_matrix",
    "plot_curves",
    "plot_epsilon",
    "plot_loss_histograms",
    "plot_lrc",
    "plot_reconstructions",
    "plot_roc",
    "roc_figure",
    "summarize",
    "table",
    "write_audit",
    "write_report",
]

COLUMNS = (
    # (key of summarize's dict, header, format)
    ("test_accuracy", "test acc", "{:.3f}"),
    ("epsilon", "epsilon", "{:.2f}"),
    ("auc", "AUC", "{:.3f}"),
    ("decision_advantage", "decision advantage", "{:+.3f}"),
    ("best_advantage", "best-threshold advantage", "{:+.3f}"),
    ("tpr_at_1pct_fpr", "TPR@1%FPR", "{:.3f}"),
    ("p_err", "P_err", "{:.3f}"),
    ("dp_perr_bound", "DP bound P_err", "{:.4f}"),
)
"""The columns of the comparison table."""

ADVANTAGE_NOTE = (
    "decision advantage: TPR - FPR of the attack's own threshold, calibrated on the examples the attacker "
    "knows and scored on the others (what an attacker achieves; '-' for attacks read at a chosen FPR, such as "
    "LiRA); P_err = (1 - decision advantage) / 2. best-threshold advantage: the best threshold chosen after "
    "seeing every score and its label, known examples included (an upper bound on any threshold on that score, "
    "not an attack)."
)
"""What the two advantages of :data:`COLUMNS` measure; printed under every table that shows them."""

AUDIT_FILES = {
    "membership": ("audit.json",),
    "epsilon": ("epsilon_audit.json",),
    "rmia": ("rmia/rmia.json", "rmia.json"),
}
"""The files ``privfast audit`` writes next to a checkpoint, by kind (RMIA in a folder of its own,
as its ``roc.png`` would replace the membership audit's), which :func:`load_audits` reads."""

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
_LINESTYLES = ("-", "--", "-.", ":")
_DPI = 110


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------
def table(
    header: Sequence[str], rows: Sequence[Sequence[object]], *, markdown: bool = False, align: Optional[str] = None
) -> str:
    """A table as aligned plain text or Markdown: the one formatter of every command's tables.

    Args:
        header: the column titles.
        rows: one sequence of cells per row (converted with ``str``), as many as ``header``.
        markdown: a Markdown table instead of aligned text.
        align: one ``"l"`` or ``"r"`` per column (default: the first column left, the others right).

    Returns:
        The lines of the table, joined by newlines.
    """
    align = align or "l" + "r" * (len(header) - 1)
    body = [[str(cell) for cell in row] for row in rows]
    if len(align) != len(header) or any(len(row) != len(header) for row in body):
        raise ValueError(f"every row and align need {len(header)} cells (the header's)")
    if markdown:
        rule = ["---" if a == "l" else "---:" for a in align]
        return "\n".join("| " + " | ".join(line) + " |" for line in [list(header), rule, *body])
    lines = [list(header), *body]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) if a == "l" else cell.rjust(w) for cell, w, a in zip(line, widths, align)).rstrip()
        for line in lines
    )


def _tpr(tpr_at_fpr: Mapping, level: float) -> float:
    """``tpr_at_fpr[level]``, also when a JSON round trip made the level a string."""
    return tpr_at_fpr[level] if level in tpr_at_fpr else tpr_at_fpr[str(level)]


def summarize(history: Sequence[dict], *, attack: str) -> dict:
    """The numbers of the table for one run: its last epoch, seen by ``attack``.

    Args:
        history: :attr:`privfast.trainer.Trainer.history` (or a :class:`~privfast.audit.MembershipAudit`'s).
        attack: an attack the run was audited with.

    Returns:
        ``epochs``, ``test_accuracy``, ``train_accuracy``, ``epsilon`` (None for a non-private
        run), ``auc``, ``decision_advantage`` (of the attack's own decision; None for an attack
        without one), ``best_advantage`` (the best threshold, chosen knowing every label),
        ``tpr_at_1pct_fpr``, ``tpr_at_01pct_fpr``, ``p_err`` and ``dp_perr_bound`` (0, the
        trivial bound, without DP).
    """
    if not history:
        raise ValueError("the run has no epoch recorded; train at least one epoch first")
    last = history[-1]
    if not isinstance(last.get(attack), dict):
        audited = [k for k, v in last.items() if isinstance(v, dict)]
        raise ValueError(f"attack {attack!r} was not audited in this run; audited: {audited}")
    result = last[attack]
    return {
        "epochs": last["epoch"],
        "test_accuracy": last["test_accuracy"],
        "train_accuracy": last["train_accuracy"],
        "epsilon": last.get("epsilon"),
        "auc": result["auc"],
        # Runs recorded before the two advantages were named apart call the decision's "advantage".
        "decision_advantage": result.get("decision_advantage", result.get("advantage")),
        "best_advantage": result.get("best_advantage"),
        "tpr_at_1pct_fpr": _tpr(result["tpr_at_fpr"], 0.01),
        "tpr_at_01pct_fpr": _tpr(result["tpr_at_fpr"], 0.001),
        "p_err": result["p_err"],
        "dp_perr_bound": last.get("dp_perr_bound", 0.0),
    }


def _cell(value, fmt: str, missing: str = "-") -> str:
    if value is None:
        return missing
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return "inf" if isinstance(value, float) and math.isinf(value) else fmt.format(value)


def format_table(rows: Mapping[str, dict], *, markdown: bool = False, first: str = "run") -> str:
    """The comparison table, one row per run (or per attack).

    Args:
        rows: run name -> :func:`summarize` dict.
        markdown: a Markdown table instead of aligned plain text.
        first: the title of the first column.
    """
    header = [first, *(title for _, title, _ in COLUMNS)]
    body = [
        [name, *(_cell(row[key], fmt, "inf" if key == "epsilon" else "-") for key, _, fmt in COLUMNS)]
        for name, row in rows.items()
    ]
    return table(header, body, markdown=markdown)


def format_exposure(canaries: Mapping, *, markdown: bool = False) -> str:
    """The canary exposure table of :meth:`privfast.audit.CanaryExposure.to_dict`, with a note on
    an unreliable extrapolation under it."""
    header = ["canary", "label", "loss", "exposure (bits)", "extrapolated (bits)"]
    fitted = canaries["exposure_extrapolated"]
    body = [
        [str(i), str(label), f"{loss:.3f}", f"{e:.2f}", f"{f:.2f}"]
        for i, (label, loss, e, f) in enumerate(
            zip(canaries["labels"], canaries["losses"], canaries["exposure"], fitted)
        )
    ]
    body.append(
        [
            "mean",
            "",
            f"{np.mean(canaries['losses']):.3f}",
            f"{np.mean(canaries['exposure']):.2f}",
            f"{np.mean(fitted):.2f}",
        ]
    )
    lines = [table(header, body, markdown=markdown)]
    if canaries.get("extrapolation_note"):
        note = f"extrapolated exposure unreliable: {canaries['extrapolation_note']}"
        lines += ["", f"*{note}*"] if markdown else [note]
    return "\n".join(lines)


def _audit_dict(audit: Union["ModelAudit", Mapping]) -> Mapping:
    return audit if isinstance(audit, Mapping) else audit.to_dict()


def format_audit(audit: Union["ModelAudit", Mapping], *, markdown: bool = False) -> str:
    """A membership audit as text or Markdown: what was attacked, one row per attack, which
    attacks share a score, and the canaries' exposure.

    Args:
        audit: a :class:`~privfast.audit.ModelAudit`, or its :meth:`~privfast.audit.ModelAudit.to_dict`
            (e.g. read back from ``audit.json``).
        markdown: Markdown instead of aligned text.
    """
    audit = _audit_dict(audit)
    record = audit["record"]
    attacks = [name for name, value in record.items() if isinstance(value, dict)]
    lira = f"LiRA with {audit['shadows']} shadow models" if audit["shadows"] else "no LiRA (0 shadow models)"
    lines = [
        f"{audit['method']}, epoch {audit['epoch']}: test accuracy {record['test_accuracy']:.3f}, train "
        f"accuracy {record['train_accuracy']:.3f}; {audit['members']} members (training examples) and "
        f"{audit['nonmembers']} non-members (test set) attacked, {audit['known']} of each known to the "
        f"calibrated attacks; {lira}.",
        "",
        format_table({name: summarize([record], attack=name) for name in attacks}, markdown=markdown, first="attack"),
        "",
        ADVANTAGE_NOTE,
    ]
    for group in audit.get("shared_scores", []):
        lines.append(
            f"{', '.join(group)} score every example alike (-loss for the threshold attacks): one ROC "
            "curve, one AUC and best-threshold advantage; they differ only in their decision."
        )
    canaries = audit.get("canaries")
    if canaries is not None:
        lines += [
            "",
            f"{'### Canary' if markdown else 'canary'} exposure: {canaries['inserted']} canaries inserted "
            f"{canaries['repeats']} times each, ranked among {canaries['references']} candidates never "
            f"inserted (at most {canaries['max_exposure']:.2f} bits; about 1 bit means not memorized)",
            "",
            format_exposure(canaries, markdown=markdown),
        ]
    return "\n".join(lines)


def write_audit(audit: "ModelAudit", out: str | os.PathLike, *, source: Optional[str] = None) -> list[Path]:
    """Write ``audit.json``, ``audit.md`` and the log-log ROC ``roc.png`` of a membership audit.

    Args:
        audit: what :func:`privfast.audit.audit_model` returned.
        out: the directory (created if needed); ``privfast report`` reads ``audit.json`` when it is
            the checkpoint's directory.
        source: where the model came from (a checkpoint path), for the heading.

    Returns:
        The three paths.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    values = {"source": source, **audit.to_dict()}
    (out / "audit.json").write_text(json.dumps(values, indent=1, default=str))
    roc = plot_roc({name: result.summary["roc"] for name, result in audit.results.items()}, out / "roc.png")
    heading = f"## Membership audit of `{source}`" if source else "## Membership audit"
    (out / "audit.md").write_text(
        "\n".join([heading, "", format_audit(values, markdown=True), "", "![ROC, log-log](roc.png)", ""])
    )
    return [out / "audit.json", out / "audit.md", roc]


def load_audits(run_dir: str | os.PathLike) -> dict[str, dict]:
    """The audits ``privfast audit`` wrote in ``run_dir`` (:data:`AUDIT_FILES`), by kind; those absent are left out,
    and so (with a warning) are those older than the run's checkpoint, which audited an earlier model."""
    found = {}
    checkpoint = Path(run_dir) / "checkpoint.pt"
    trained = checkpoint.stat().st_mtime if checkpoint.is_file() else None
    for kind, names in AUDIT_FILES.items():
        path = next((Path(run_dir) / name for name in names if (Path(run_dir) / name).is_file()), None)
        if path is not None and trained is not None and path.stat().st_mtime < trained:
            # Written before the checkpoint: an audit of an earlier model (a run resumed or overwritten since).
            warnings.warn(f"{path} is older than {checkpoint} (it audited an earlier model): left out of the report")
            continue
        if path is not None:
            try:
                found[kind] = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise ValueError(f"{path}: not a readable audit ({error})") from None
    return found


def _audit_section(audits: Mapping[str, Mapping[str, dict]]) -> list[str]:
    """The Markdown lines of the audits found next to the runs' checkpoints."""
    lines = ["## Audits", "", "Written by `privfast audit` next to each run's checkpoint.", ""]
    for name, found in audits.items():
        if "membership" in found:
            try:
                text = format_audit(found["membership"], markdown=True)
            except (KeyError, TypeError):  # an audit.json of an older privfast lacks some fields
                text = "*audit.json was written by an older privfast: run `privfast audit` again.*"
            lines += [f"### {name}: membership attacks", "", text, ""]
    bounds = [
        [
            name,
            found["epsilon"]["method"],
            f"{found['epsilon']['accountant_epsilon']:.3f}",
            f"{found['epsilon']['epsilon']:.3f} [{found['epsilon']['epsilon_low']:.3f}, "
            f"{found['epsilon']['epsilon_high']:.3f}]",
            f"{100 * found['epsilon']['confidence']:g}%",
        ]
        for name, found in audits.items()
        if "epsilon" in found
    ]
    if bounds:
        lines += [
            "### Epsilon: the accountant's against an audit's",
            "",
            table(["run", "audit", "accountant eps", "empirical eps [interval]", "confidence"], bounds, markdown=True),
            "",
            "one-run: a lower bound (both ends of the interval are the bound); white-box: an estimate with "
            "its confidence interval.",
            "",
        ]
    rmia = [
        [name, attack, f"{r['auc']:.3f}", f"{_tpr(r['tpr_at_fpr'], 0.001):.3f}", f"{_tpr(r['tpr_at_fpr'], 0.01):.3f}"]
        for name, found in audits.items()
        if "rmia" in found
        for attack, r in found["rmia"]["results"].items()
    ]
    if rmia:
        lines += [
            "### RMIA and LiRA on the same shadow models",
            "",
            table(["run", "attack", "AUC", "TPR@0.1%FPR", "TPR@1%FPR"], rmia, markdown=True),
            "",
        ]
    return lines


# ------------------------------------------------------------------------------------------------
# Figures: readable from 1 to 12 runs (wrapping grids, legends outside the axes, integer epochs)
# ------------------------------------------------------------------------------------------------
def _figure(rows: int, cols: int, size: tuple[float, float]):
    # matplotlib.figure.Figure needs no pyplot state and no display: safe in CI and in threads.
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    """Rows and columns of a grid of ``n`` panels that wraps after ``max_cols``."""
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _style(i: int) -> dict:
    """Run ``i``'s line style: color, marker and dashes all vary, so that runs whose curves coincide
    (DP-SGD and DP-Mix spend the same epsilon) still show each other's markers."""
    return {
        "color": f"C{i % 10}",
        "marker": _MARKERS[i % len(_MARKERS)],
        "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
        "markerfacecolor": "none" if i % 2 else None,
        "markersize": 7 if i % 2 else 5,
    }


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_outside(fig, handles=None, labels=None, *, below: bool = False) -> None:
    """One figure legend outside the axes: right of them in columns of at most 20 entries, or
    below them (for a few long entries, which would squeeze the axes beside them)."""
    if handles is None:
        handles, labels = fig.axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside lower center" if below else "outside right upper",
            fontsize="small",
            ncols=1 if below else math.ceil(len(handles) / 20),
        )


def _save(fig, path: str | os.PathLike) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return Path(path)


def _value(record: dict, attack: str, key: str) -> float:
    value = record[attack].get(key, record[attack].get("advantage") if key == "decision_advantage" else None)
    return math.nan if value is None else value


def curves_figure(runs: Mapping[str, Sequence[dict]], *, attack: str):
    """The figure of :func:`plot_curves` (a matplotlib ``Figure``)."""
    from matplotlib.lines import Line2D

    fig, axes = _figure(2, 2, (12, 8))
    (acc_ax, adv_ax), (pu_ax, eps_ax) = axes
    perr_ax = None
    for i, (name, history) in enumerate(runs.items()):
        style = _style(i)
        epochs = [r["epoch"] for r in history]
        accuracy = [r["test_accuracy"] for r in history]
        acc_ax.plot(epochs, accuracy, **style, label=name)
        adv_ax.plot(epochs, [_value(r, attack, "decision_advantage") for r in history], **style)
        p_err = [_value(r, attack, "p_err") for r in history]
        pu_ax.plot(p_err, accuracy, **{**style, "alpha": 0.7})
        pu_ax.plot(p_err[-1:], accuracy[-1:], "*", color=style["color"], markersize=14)
        if "epsilon" in history[0]:
            eps_ax.plot(epochs, [r["epsilon"] for r in history], **{**style, "linestyle": "-"})
            perr_ax = perr_ax or eps_ax.twinx()
            perr_ax.plot(epochs, [r["dp_perr_bound"] for r in history], "--", color=style["color"])
            perr_ax.plot(epochs, p_err, ":", color=style["color"])
    acc_ax.set(xlabel="epoch", ylabel="test accuracy", title="utility")
    adv_ax.set(xlabel="epoch", ylabel=f"{attack} decision advantage", title="membership leakage")
    pu_ax.set(
        xlabel=f"{attack} P_err (0.5: no leakage)",
        ylabel="test accuracy",
        title="privacy-utility (one point per epoch, last starred)",
    )
    eps_ax.set(xlabel="epoch", ylabel="epsilon (solid)", title="privacy spent")
    for ax in (acc_ax, adv_ax, eps_ax):
        _integer_epochs(ax)
    handles, labels = acc_ax.get_legend_handles_labels()
    if perr_ax is not None:
        perr_ax.set(ylabel="P_err: DP bound (dashed), measured (dotted)", ylim=(0, 0.55))
        handles += [Line2D([], [], color="k", linestyle=ls) for ls in ("-", "--", ":")]
        labels += ["epsilon", "DP bound on P_err", "measured P_err"]
    else:
        eps_ax.text(0.5, 0.5, "no private run", ha="center", va="center", transform=eps_ax.transAxes)
    _legend_outside(fig, handles, labels)
    return fig


def plot_curves(runs: Mapping[str, Sequence[dict]], path: str | os.PathLike, *, attack: str) -> Path:
    """Per-epoch curves of several runs in one figure (PNG).

    Panels: test accuracy by epoch; the attack's decision advantage by epoch; test accuracy
    against the attack's error P_err (one point per epoch, the last one starred: Liu et al.'s
    privacy-utility curve); epsilon by epoch with the DP bound on P_err beside the attack's
    measured P_err. One legend, outside the panels: a color and marker per run.

    Args:
        runs: run name -> per-epoch history.
        path: the PNG file to write.
        attack: the audited attack to plot.

    Returns:
        ``path``.
    """
    return _save(curves_figure(runs, attack=attack), path)


def epsilon_figure(runs: Mapping[str, Sequence[dict]]):
    """The figure of :func:`plot_epsilon`, or None when no run is private."""
    private = {name: history for name, history in runs.items() if "epsilon" in history[0]}
    if not private:
        return None
    fig, axes = _figure(1, 1, (7, 4))
    ax = axes[0][0]
    for i, (name, history) in enumerate(private.items()):
        ax.plot([r["steps"] for r in history], [r["epsilon"] for r in history], **_style(i), label=name)
    ax.set(xlabel="optimizer steps", ylabel="epsilon", title="privacy spent (delta as configured)")
    _integer_epochs(ax)
    _legend_outside(fig)
    return fig


def plot_epsilon(runs: Mapping[str, Sequence[dict]], path: str | os.PathLike) -> Optional[Path]:
    """Epsilon against optimizer steps of the private runs, one point per epoch (PNG); runs with the
    same epsilon curve stay visible through their different markers and dashes.

    Args:
        runs: run name -> per-epoch history whose records hold ``steps`` and, if private, ``epsilon``.
        path: the PNG file to write.

    Returns:
        ``path``, or None (nothing written) when no run is private.
    """
    fig = epsilon_figure(runs)
    return None if fig is None else _save(fig, path)


def roc_figure(rocs: Mapping[str, Mapping[str, Sequence[float]]]):
    """The figure of :func:`plot_roc`."""
    fig, axes = _figure(1, 1, (6.5, 6.5))
    ax = axes[0][0]
    curves: list[tuple[list[str], np.ndarray, np.ndarray]] = []
    for name, roc in rocs.items():  # attacks with the same ROC (the same score) share one curve
        fpr, tpr = np.asarray(roc["fpr"], dtype=float), np.asarray(roc["tpr"], dtype=float)
        same = next((c for c in curves if np.array_equal(c[1], fpr) and np.array_equal(c[2], tpr)), None)
        if same is None:
            curves.append(([name], fpr, tpr))
        else:
            same[0].append(name)
    floor = 1.0
    for i, (names, fpr, tpr) in enumerate(curves):
        auc = float(np.trapezoid(tpr, fpr))
        low = float(tpr[fpr <= 0.001].max(initial=0.0))
        label = " = ".join(names) + (" (same score)" if len(names) > 1 else "")
        keep = (fpr > 0) & (tpr > 0)  # zeros have no place on log axes
        ax.plot(
            fpr[keep],
            tpr[keep],
            color=f"C{i % 10}",
            linestyle=_LINESTYLES[i // 10 % 4],
            label=f"{label}: AUC {auc:.3f}, TPR@0.1%FPR {low:.3f}",
        )
        floor = min(floor, fpr[keep].min(initial=1.0))
    ax.plot([floor, 1], [floor, 1], "k:", label="chance")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="false positive rate",
        ylabel="true positive rate",
        title="membership attacks (log-log ROC)",
    )
    _legend_outside(fig, below=True)
    return fig


def plot_roc(rocs: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike) -> Path:
    """ROC curves of membership attacks on log-log axes (PNG), where the low-FPR regime shows
    (Carlini et al., "Membership inference attacks from first principles", S&P 2022, Fig. 1).

    Each legend entry gives the curve's AUC and its TPR at 0.1% FPR; attacks with the same ROC
    (yeom, calibrated and calibrated_per_class all score by ``-loss``) share one entry.

    Args:
        rocs: curve name -> ``{"fpr": [P], "tpr": [P]}`` (e.g. ``AttackResult.summary["roc"]``).
        path: the PNG file to write.

    Returns:
        ``path``.
    """
    return _save(roc_figure(rocs), path)


def _losses(models: Mapping[str, "nn.Module"], data: "Split") -> dict[str, np.ndarray]:
    from privfast.attacks import example_losses

    return {name: example_losses(model, *data).cpu().numpy() for name, model in models.items()}


def loss_histogram_figure(models: Mapping[str, "nn.Module"], members: "Split", nonmembers: "Split", *, bins: int = 40):
    """The figure of :func:`plot_loss_histograms` and the Jensen-Shannon distances ``(figure, {run: distance})``."""
    from privfast.metrics import js_distance

    rows, cols = _grid(len(models))
    fig, axes = _figure(rows, cols, (3.6 * cols + 1.8, 3.0 * rows))
    member_losses, nonmember_losses = _losses(models, members), _losses(models, nonmembers)
    distances = {}
    for ax, name in zip(axes.flat, models):
        m, n = member_losses[name], nonmember_losses[name]
        distances[name] = js_distance(m, n, bins=bins)
        top = max(m.max(), n.max())
        ax.hist(m, bins=bins, range=(0, top), alpha=0.6, density=True, color="C0", label="members")
        ax.hist(n, bins=bins, range=(0, top), alpha=0.6, density=True, color="C1", label="non-members")
        ax.set(
            title=f"{name}: JS distance {distances[name]:.3f}",
            xlabel="cross-entropy loss",
            ylabel="density (log scale)",
            yscale="log",
        )
    for ax in axes.flat[len(models) :]:
        ax.set_visible(False)
    _legend_outside(fig)
    return fig, distances


def plot_loss_histograms(
    models: Mapping[str, "nn.Module"], members: "Split", nonmembers: "Split", path: str | os.PathLike, *, bins: int = 40
) -> dict[str, float]:
    """Histograms of the per-example losses of members and non-members, one panel per model (PNG),
    in a grid that wraps after 4 panels.

    Args:
        models: run name -> trained model.
        members: training examples ``(x [N_m, ...], y [N_m])``.
        nonmembers: held-out examples ``(x [N_n, ...], y [N_n])``.
        path: the PNG file to write.
        bins: histogram bins (shared by the two sets of one model).

    Returns:
        Run name -> Jensen-Shannon distance between the two histograms (0: indistinguishable).
    """
    fig, distances = loss_histogram_figure(models, members, nonmembers, bins=bins)
    _save(fig, path)
    return distances


def lrc_matrix(models: Mapping[str, "nn.Module"], members: "Split") -> dict[str, dict[str, float]]:
    """Loss rank correlation of every two models on the same training examples (Kaya & Dumitras, Figs. 6-8).

    Args:
        models: run name -> trained model.
        members: the examples ``(x [N, ...], y [N])`` whose losses are ranked.

    Returns:
        ``lrc[a][b]``: Spearman correlation of model a's and model b's per-example losses (1 on the diagonal).
    """
    from privfast.metrics import loss_rank_correlation

    losses = _losses(models, members)
    return {a: {b: 1.0 if a == b else loss_rank_correlation(losses[a], losses[b]) for b in losses} for a in losses}


def plot_lrc(lrc: Mapping[str, Mapping[str, float]], path: str | os.PathLike) -> Path:
    """Heatmap of :func:`lrc_matrix` (PNG), each cell annotated.

    Args:
        lrc: ``lrc[a][b]`` for every two runs.
        path: the PNG file to write.

    Returns:
        ``path``.
    """
    names = list(lrc)
    values = np.array([[lrc[a][b] for b in names] for a in names])
    cell = 1.3 if len(names) <= 6 else 0.75  # 12 runs stay under 12 inches
    fig, axes = _figure(1, 1, (cell * len(names) + 2.5, cell * len(names) + 1.5))
    ax = axes[0][0]
    image = ax.imshow(values, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set(
        xticks=range(len(names)),
        yticks=range(len(names)),
        xticklabels=names,
        yticklabels=names,
        title="loss rank correlation (training examples)",
    )
    ax.tick_params(axis="x", labelrotation=45 if len(names) > 4 else 0)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(
                j,
                i,
                f"{values[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize="small" if len(names) <= 6 else "x-small",
            )
    fig.colorbar(image, ax=ax, label="Spearman correlation")
    return _save(fig, path)


def plot_reconstructions(
    rows: Mapping[str, "Tensor"], path: str | os.PathLike, *, titles: Optional[Mapping[str, Sequence[str]]] = None
) -> Path:
    """A grid of images (PNG), one labelled row per batch, one column per image: e.g. ATS's Fig. 4
    (clean images; their reconstructions; the transformed images; the reconstructions of those).

    Args:
        rows: row label -> images ``[N, C, H, W]`` in [0, 1], the same N, C, H, W in every row.
        path: the PNG file to write (its directory is created).
        titles: row label -> one caption per image (e.g. its PSNR).

    Returns:
        ``path``.
    """
    shapes = {tuple(images.shape) for images in rows.values()}
    if not rows or len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise ValueError(f"expected batches [N, C, H, W] of the same shape, got {sorted(shapes)}")
    n = next(iter(rows.values())).shape[0]
    fig, axes = _figure(len(rows), n, (1.6 * n + 1.5, 1.8 * len(rows)))
    for r, (label, images) in enumerate(rows.items()):
        for i in range(n):
            image = images[i].detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
            ax = axes[r, i]
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label, fontsize="small")
            if titles is not None and label in titles:
                ax.set_xlabel(titles[label][i], fontsize="small")
    return _save(fig, path)


def write_report(
    out_dir: str | os.PathLike,
    runs: Mapping[str, dict],
    *,
    attack: str,
    models: Optional[Mapping[str, "nn.Module"]] = None,
    members: Optional["Split"] = None,
    nonmembers: Optional["Split"] = None,
    title: str = "privfast report",
    notes: Sequence[str] = (),
    audits: Optional[Mapping[str, Mapping[str, dict]]] = None,
) -> Path:
    """Write ``report.md``, ``results.json``, ``curves.png``, ``epsilon.png`` (private runs) and, with models,
    ``losses.png`` and ``lrc.png`` into ``out_dir``.

    Args:
        out_dir: created if needed.
        runs: run name -> ``{"config": dict, "history": [per-epoch records]}``.
        attack: the audited attack whose numbers fill the table.
        models: run name -> trained model, to draw the loss histograms (with ``members`` and
            ``nonmembers``); None skips them.
        members: the members the histograms use.
        nonmembers: the non-members the histograms use.
        title: the report's heading.
        notes: extra lines under the heading (e.g. wall time).
        audits: run name -> :func:`load_audits` of its directory: the membership, epsilon and
            RMIA audits ``privfast audit`` wrote there, rendered in an "Audits" section.

    Returns:
        The path of ``report.md``.
    """
    if not runs:
        raise ValueError("no run to report")
    if models is not None and (members is None or nonmembers is None):
        raise ValueError("loss histograms need members and nonmembers along with models")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = {name: summarize(run["history"], attack=attack) for name, run in runs.items()}
    histories = {name: run["history"] for name, run in runs.items()}
    plot_curves(histories, out / "curves.png", attack=attack)
    epsilon_plot = plot_epsilon(histories, out / "epsilon.png")
    distances = lrc = None
    if models is not None:
        distances = plot_loss_histograms(models, members, nonmembers, out / "losses.png")
        lrc = lrc_matrix(models, members)
        plot_lrc(lrc, out / "lrc.png")
    audits = {name: found for name, found in (audits or {}).items() if found}
    results = {
        name: {
            **run,
            "summary": rows[name],
            **({"js_distance": distances[name], "lrc": lrc[name]} if distances else {}),
            **({"audits": audits[name]} if name in audits else {}),
        }
        for name, run in runs.items()
    }
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    lines = [
        f"# {title}",
        "",
        *notes,
        "" if notes else None,
        f"Last epoch of each run, attacked by `{attack}` (members: training examples; non-members: "
        "the test set). The DP bound on P_err is (1 - delta) / (1 + e^epsilon), which no attack's decision "
        "can go below.",
        "",
        format_table(rows, markdown=True),
        "",
        ADVANTAGE_NOTE,
        "",
        "![per-epoch curves](curves.png)",
        "",
        *(["Epsilon against optimizer steps:", "", "![epsilon vs steps](epsilon.png)", ""] if epsilon_plot else []),
    ]
    if distances:
        names = list(lrc)
        lines += [
            "Loss histograms of members and non-members (Jensen-Shannon distance in each title):",
            "",
            "![loss histograms](losses.png)",
            "",
            "Loss rank correlation (Spearman) between the runs' models on the training examples:",
            "",
            table(["", *names], [[a, *(f"{lrc[a][b]:.3f}" for b in names)] for a in names], markdown=True),
            "",
            "![LRC heatmap](lrc.png)",
            "",
        ]
    if audits:
        lines += _audit_section(audits)
    lines += ["## Configurations", ""]
    for name, run in runs.items():
        config = ", ".join(f"{k}={v}" for k, v in run["config"].items())
        sigma = run["history"][-1].get("noise_multiplier")
        used = f"noise multiplier used: {sigma:.4g}; " if sigma is not None else ""
        lines += [f"- **{name}**: {used}{config}"]
    (out / "report.md").write_text("\n".join(line for line in lines if line is not None) + "\n")
    return out / "report.md"
