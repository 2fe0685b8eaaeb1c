"""Collects the rows of benchmarks/bench_models.py and prints them as one table at the end of the run."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import pytest
import torch

_ROWS: list[dict] = []
RESULTS = Path(__file__).with_name("results-models.json")


@pytest.fixture
def model_rows() -> list[dict]:
    return _ROWS


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _ROWS:
        return
    from privfast.throughput import format_markdown

    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}"
    )
    terminalreporter.write_sep("=", "private training step: privfast vs Opacus vs non-private")
    terminalreporter.write_line(f"machine: {machine}; commit {_commit()}")
    terminalreporter.write_line(format_markdown(_ROWS))
    RESULTS.write_text(json.dumps({"machine": machine, "commit": _commit(), "rows": _ROWS}, indent=1))
    terminalreporter.write_line(f"written: {RESULTS}")
