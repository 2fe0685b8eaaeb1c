"""What the studies share: command-line flags, CIFAR-10 loaded once, mean and spread over seeds, output files.

Each study is run as ``python studies/<name>.py --data-root DIR --out DIR``; its defaults are sized
for a 2-core CPU (a few thousand training images, a narrow model, few epochs) and every scaled-down
quantity is a flag, so the same script runs at full scale on a larger machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

# `python studies/x.py` puts studies/ first on the path, not the repository: find privfast there
# when it is not installed (an editable install resolves it either way).
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(1, str(_REPO))

import torch  # noqa: E402

from privfast.data import Split, load_cifar  # noqa: E402

__all__ = ["base_parser", "cifar_subsets", "describe_machine", "mean_std", "fmt", "markdown_table", "write_outputs"]


def base_parser(description: str, *, seeds: Sequence[int] = (0, 1)) -> argparse.ArgumentParser:
    """Flags every study takes: data, output directory, seeds and threads."""
    parser = argparse.ArgumentParser(
        description=description.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--data-root",
        default=os.environ.get("PRIVFAST_CIFAR10_ROOT"),
        help="directory holding cifar-10-batches-py (default: $PRIVFAST_CIFAR10_ROOT)",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON, Markdown and plots")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds), help="one run per seed (>= 2: a spread)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    return parser


def cifar_subsets(root, *, train: int, test: int, pool: int = 0) -> tuple[Split, Split, Split]:
    """CIFAR-10's first ``train`` training images, ``test`` random test images, and a disjoint pool.

    The converted test split is ordered by class (the training split is shuffled), so its first
    rows would all be airplanes: the test images are a fixed random subset instead.

    The pool is the last ``pool`` rows of the training split (never trained on privately, disjoint
    from the test split), as :func:`privfast.data.load_pool` takes it.
    """
    if root is None:
        raise SystemExit("no CIFAR-10: pass --data-root DIR (python ../shared/data/make_cifar10.py DIR writes it)")
    full_train, full_test = load_cifar(root)
    if train + pool > len(full_train.y):
        raise SystemExit(f"train + pool = {train + pool} exceeds CIFAR-10's {len(full_train.y)} training images")
    keep = torch.randperm(len(full_test.y), generator=torch.Generator().manual_seed(0))[:test]
    return (
        Split(full_train.x[:train], full_train.y[:train]),
        Split(full_test.x[keep], full_test.y[keep]),
        Split(full_train.x[len(full_train.y) - pool :], full_train.y[len(full_train.y) - pool :]),
    )


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs are dropped."""
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt(values: Iterable[float], spec: str = "{:.3f}") -> str:
    """``mean ± std (n)`` of the values, for a table cell."""
    values = list(values)
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{spec.format(mean)} ± {spec.format(std).lstrip('+')} (n={len(values)})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def describe_machine() -> dict:
    """Where and on what the numbers were measured: commit, CPU threads, torch."""
    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(_REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    return {
        "commit": commit,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def write_outputs(
    out: Path,
    name: str,
    *,
    title: str,
    scaled_down: str,
    tables: Mapping[str, str],
    results: dict,
    notes: Sequence[str] = (),
    command: str | None = None,
) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` under ``out`` and print the Markdown.

    Args:
        out: output directory (created).
        name: file stem.
        title: the study's heading.
        scaled_down: what differs from the paper's setting, stated in the report.
        tables: caption -> Markdown table.
        results: everything measured (stored as JSON with the machine description).
        notes: verdicts and remarks, one paragraph each.
        command: the command line that produced it (default: this process's).
    """
    out.mkdir(parents=True, exist_ok=True)
    machine = describe_machine()
    command = command or "python " + " ".join(sys.argv)
    (out / f"{name}.json").write_text(
        json.dumps(
            {"machine": machine, "command": command, "scaled_down": scaled_down, **results}, indent=1, default=str
        )
    )
    parts = [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine['cpus']} CPUs, {machine['threads']} torch thread(s), torch {machine['torch']}, "
        f"commit {machine['commit']}, {machine['date_utc']} UTC.",
        "",
        f"Scaled down: {scaled_down}",
        "",
    ]
    for caption, table in tables.items():
        parts += [f"## {caption}", "", table, ""]
    parts += [note + "\n" for note in notes]
    text = "\n".join(parts)
    (out / f"{name}.md").write_text(text)
    print(text)
    return out / f"{name}.md"
