"""Reports of training runs: the privacy-utility table, per-epoch curves and loss histograms.

A *run* is what :class:`privfast.trainer.Trainer` leaves: its configuration and its per-epoch
history. :func:`write_report` puts several runs side by side, the way the seed papers compare
training algorithms:

- a table of the last epoch: test accuracy, epsilon, attack AUC, advantage, TPR at 1% FPR, the
  attack's error P_err and the DP lower bound on it ``(1 - delta) / (1 + e^epsilon)``
  (seed generalization-vs-dp-against-mia.txt);
- per-epoch curves: accuracy, attack advantage and epsilon over training, and test accuracy
  against advantage, one point per epoch (that seed's privacy-utility curves, where early
  stopping shows up as a point of the curve);
- member and non-member loss histograms with their Jensen-Shannon distance
  (seed augmentation-vs-membership-inference.txt, Fig. 1), and the loss rank correlation (LRC)
  between every two runs' models on the same training examples (its Figs. 6-8: how alike two
  training algorithms make a model's per-example losses, hence its vulnerable examples).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from torch import Tensor, nn

from privfast.attacks.training import example_losses
from privfast.data import Split
from privfast.metrics import js_distance, loss_rank_correlation

__all__ = ["COLUMNS", "format_table", "lrc_matrix", "plot_curves", "plot_epsilon", "plot_loss_histograms",
           "plot_lrc", "plot_reconstructions", "plot_roc", "summarize", "write_report"]

COLUMNS = (
    # (key of summarize's dict, header, format)
    ("test_accuracy", "test acc", "{:.3f}"),
    ("epsilon", "epsilon", "{:.2f}"),
    ("auc", "AUC", "{:.3f}"),
    ("advantage", "advantage", "{:+.3f}"),
    ("tpr_at_1pct_fpr", "TPR@1%FPR", "{:.3f}"),
    ("p_err", "P_err", "{:.3f}"),
    ("dp_perr_bound", "DP bound P_err", "{:.4f}"),
)
"""The columns of the comparison table."""


def summarize(history: Sequence[dict], *, attack: str) -> dict:
    """The numbers of the table for one run: its last epoch, seen by ``attack``.

    Args:
        history: :attr:`privfast.trainer.Trainer.history` (or a :class:`~privfast.audit.MembershipAudit`'s).
        attack: an attack the run was audited with.

    Returns:
        ``epochs``, ``test_accuracy``, ``train_accuracy``, ``epsilon`` (None for a non-private
        run), ``auc``, ``advantage`` (of the attack's own decision), ``tpr_at_1pct_fpr``,
        ``p_err`` and ``dp_perr_bound`` (0, the trivial bound, without DP).
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
        "advantage": result["advantage"],
        "tpr_at_1pct_fpr": result["tpr_at_fpr"][0.01],
        "p_err": result["p_err"],
        "dp_perr_bound": last.get("dp_perr_bound", 0.0),
    }


def _cell(value, fmt: str) -> str:
    return "inf" if value is None or (isinstance(value, float) and math.isinf(value)) else fmt.format(value)


def format_table(rows: Mapping[str, dict], *, markdown: bool = False) -> str:
    """The comparison table, one row per run.

    Args:
        rows: run name -> :func:`summarize` dict.
        markdown: a Markdown table instead of aligned plain text.
    """
    header = ["run", *(title for _, title, _ in COLUMNS)]
    body = [[name, *(_cell(row[key], fmt) for key, _, fmt in COLUMNS)] for name, row in rows.items()]
    if markdown:
        lines = [header, ["---"] * len(header), *body]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                     for line in [header, *body])


def _figure(rows: int, cols: int, size: tuple[float, float]):
    # matplotlib.figure.Figure needs no pyplot state and no display: safe in CI and in threads.
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def plot_curves(runs: Mapping[str, Sequence[dict]], path: str | os.PathLike, *, attack: str) -> Path:
    """Per-epoch curves of several runs in one figure (PNG).

    Panels: test accuracy by epoch; the attack's advantage by epoch; test accuracy against the
    attack's error P_err (one point per epoch, the last one starred: seed 001's privacy-utility
    curve); epsilon by epoch with the DP bound on P_err beside the attack's measured P_err.

    Args:
        runs: run name -> per-epoch history.
        path: the PNG file to write.
        attack: the audited attack to plot.

    Returns:
        ``path``.
    """
    fig, axes = _figure(2, 2, (11, 8))
    (acc_ax, adv_ax), (pu_ax, eps_ax) = axes
    perr_ax = None
    for i, (name, history) in enumerate(runs.items()):
        color = f"C{i}"
        epochs = [r["epoch"] for r in history]
        accuracy = [r["test_accuracy"] for r in history]
        advantage = [r[attack]["advantage"] for r in history]
        acc_ax.plot(epochs, accuracy, "o-", color=color, label=name)
        adv_ax.plot(epochs, advantage, "o-", color=color, label=name)
        p_err = [r[attack]["p_err"] for r in history]
        pu_ax.plot(p_err, accuracy, ".-", color=color, alpha=0.7, label=name)
        pu_ax.plot(p_err[-1:], accuracy[-1:], "*", color=color, markersize=14)
        if "epsilon" in history[0]:
            eps_ax.plot(epochs, [r["epsilon"] for r in history], "o-", color=color, label=f"{name} epsilon")
            perr_ax = perr_ax or eps_ax.twinx()
            perr_ax.plot(epochs, [r["dp_perr_bound"] for r in history], "--", color=color,
                         label=f"{name} DP bound on P_err")
            perr_ax.plot(epochs, [r[attack]["p_err"] for r in history], ":", color=color,
                         label=f"{name} measured P_err")
    acc_ax.set(xlabel="epoch", ylabel="test accuracy", title="utility")
    adv_ax.set(xlabel="epoch", ylabel=f"{attack} advantage (TPR - FPR)", title="membership leakage")
    pu_ax.set(xlabel=f"{attack} P_err (0.5: no leakage)", ylabel="test accuracy",
              title="privacy-utility (one point per epoch)")
    eps_ax.set(xlabel="epoch", ylabel="epsilon", title="privacy spent")
    for ax in (acc_ax, adv_ax, pu_ax):
        ax.legend(fontsize="small")
    if perr_ax is not None:
        perr_ax.set(ylabel="P_err", ylim=(0, 0.55))
        handles = eps_ax.get_legend_handles_labels()
        more = perr_ax.get_legend_handles_labels()
        eps_ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize="x-small")
    else:
        eps_ax.text(0.5, 0.5, "no private run", ha="center", va="center", transform=eps_ax.transAxes)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_epsilon(runs: Mapping[str, Sequence[dict]], path: str | os.PathLike) -> Optional[Path]:
    """Epsilon against optimizer steps of the private runs, one point per epoch (PNG).

    Args:
        runs: run name -> per-epoch history whose records hold ``steps`` and, if private, ``epsilon``.
        path: the PNG file to write.

    Returns:
        ``path``, or None (nothing written) when no run is private.
    """
    private = {name: history for name, history in runs.items() if "epsilon" in history[0]}
    if not private:
        return None
    fig, axes = _figure(1, 1, (5.5, 3.8))
    ax = axes[0][0]
    for name, history in private.items():
        ax.plot([r["steps"] for r in history], [r["epsilon"] for r in history], "o-", label=name)
    ax.set(xlabel="optimizer steps", ylabel="epsilon", title="privacy spent (delta as configured)")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_roc(rocs: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike) -> Path:
    """ROC curves of membership attacks on log-log axes (PNG), where the low-FPR regime shows (LiRA, Fig. 1).

    Args:
        rocs: curve name -> ``{"fpr": [P], "tpr": [P]}`` (e.g. ``AttackResult.summary["roc"]``).
        path: the PNG file to write.

    Returns:
        ``path``.
    """
    fig, axes = _figure(1, 1, (5, 5))
    ax = axes[0][0]
    floor = 1.0
    for name, roc in rocs.items():
        fpr, tpr = np.asarray(roc["fpr"], dtype=float), np.asarray(roc["tpr"], dtype=float)
        keep = (fpr > 0) & (tpr > 0)  # zeros have no place on log axes
        ax.plot(fpr[keep], tpr[keep], label=name)
        floor = min(floor, fpr[keep].min(initial=1.0))
    ax.plot([floor, 1], [floor, 1], "k:", label="chance")
    ax.set(xscale="log", yscale="log", xlabel="false positive rate", ylabel="true positive rate",
           title="membership attacks (log-log ROC)")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_loss_histograms(models: Mapping[str, nn.Module], members: Split, nonmembers: Split,
                         path: str | os.PathLike, *, bins: int = 40) -> dict[str, float]:
    """Histograms of the per-example losses of members and non-members, one panel per model (PNG).

    Args:
        models: run name -> trained model.
        members: training examples ``(x [N_m, ...], y [N_m])``.
        nonmembers: held-out examples ``(x [N_n, ...], y [N_n])``.
        path: the PNG file to write.
        bins: histogram bins (shared by the two sets of one model).

    Returns:
        Run name -> Jensen-Shannon distance between the two histograms (0: indistinguishable).
    """
    fig, axes = _figure(1, len(models), (4 * len(models), 3.3))
    distances = {}
    for ax, (name, model) in zip(axes[0], models.items()):
        member_losses = example_losses(model, *members).cpu().numpy()
        nonmember_losses = example_losses(model, *nonmembers).cpu().numpy()
        distances[name] = js_distance(member_losses, nonmember_losses, bins=bins)
        top = max(member_losses.max(), nonmember_losses.max())
        ax.hist(member_losses, bins=bins, range=(0, top), alpha=0.6, density=True, label="members")
        ax.hist(nonmember_losses, bins=bins, range=(0, top), alpha=0.6, density=True, label="non-members")
        ax.set(title=f"{name}: JS distance {distances[name]:.3f}", xlabel="cross-entropy loss", yscale="log")
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return distances


def lrc_matrix(models: Mapping[str, nn.Module], members: Split) -> dict[str, dict[str, float]]:
    """Loss rank correlation of every two models on the same training examples (seed 000, Figs. 6-8).

    Args:
        models: run name -> trained model.
        members: the examples ``(x [N, ...], y [N])`` whose losses are ranked.

    Returns:
        ``lrc[a][b]``: Spearman correlation of model a's and model b's per-example losses (1 on the diagonal).
    """
    losses = {name: example_losses(model, *members) for name, model in models.items()}
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
    fig, axes = _figure(1, 1, (1.3 * len(names) + 2.5, 1.1 * len(names) + 1.5))
    ax = axes[0][0]
    image = ax.imshow(values, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
           title="loss rank correlation (training examples)")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize="small")
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_reconstructions(rows: Mapping[str, Tensor], path: str | os.PathLike, *,
                         titles: Optional[Mapping[str, Sequence[str]]] = None) -> Path:
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return Path(path)


def write_report(out_dir: str | os.PathLike, runs: Mapping[str, dict], *, attack: str,
                 models: Optional[Mapping[str, nn.Module]] = None, members: Optional[Split] = None,
                 nonmembers: Optional[Split] = None, title: str = "privfast report",
                 notes: Sequence[str] = ()) -> Path:
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
    plot_curves({name: run["history"] for name, run in runs.items()}, out / "curves.png", attack=attack)
    epsilon_plot = plot_epsilon({name: run["history"] for name, run in runs.items()}, out / "epsilon.png")
    distances = lrc = None
    if models is not None:
        distances = plot_loss_histograms(models, members, nonmembers, out / "losses.png")
        lrc = lrc_matrix(models, members)
        plot_lrc(lrc, out / "lrc.png")
    results = {name: {**run, "summary": rows[name],
                      **({"js_distance": distances[name], "lrc": lrc[name]} if distances else {})}
               for name, run in runs.items()}
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    lines = [f"# {title}", "", *notes, "" if notes else None,
             f"Last epoch of each run, attacked by `{attack}` (members: training examples; non-members: "
             "the test set). P_err = (FPR + FNR) / 2 of the attack's own decision; the DP bound is "
             "(1 - delta) / (1 + e^epsilon), which no attack can go below.", "",
             format_table(rows, markdown=True), "",
             "![per-epoch curves](curves.png)", "",
             *(["Epsilon against optimizer steps:", "", "![epsilon vs steps](epsilon.png)", ""]
               if epsilon_plot else [])]
    if distances:
        lines += ["Loss histograms of members and non-members (Jensen-Shannon distance in each title):", "",
                  "![loss histograms](losses.png)", "",
                  "Loss rank correlation (Spearman) between the runs' models on the training examples:", "",
                  "| | " + " | ".join(lrc) + " |", "|---" * (len(lrc) + 1) + "|",
                  *("| " + a + " | " + " | ".join(f"{lrc[a][b]:.3f}" for b in lrc) + " |" for a in lrc), "",
                  "![LRC heatmap](lrc.png)", ""]
    lines += ["## Configurations", ""]
    for name, run in runs.items():
        config = ", ".join(f"{k}={v}" for k, v in run["config"].items())
        sigma = run["history"][-1].get("noise_multiplier")
        used = f"noise multiplier used: {sigma:.4g}; " if sigma is not None else ""
        lines += [f"- **{name}**: {used}{config}"]
    (out / "report.md").write_text("\n".join(line for line in lines if line is not None) + "\n")
    return out / "report.md"
