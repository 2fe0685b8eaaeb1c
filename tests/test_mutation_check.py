"""tools/mutation_check.py still applies: every planted bug's old text occurs exactly once in the source.

The mutation run itself is slow and stays out of the suite (``python tools/mutation_check.py``);
this only keeps a refactor from making a mutation silently stop applying.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mutation_check():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "tools" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_every_mutation_applies_exactly_once(mutation_check):
    assert mutation_check.find_problems(ROOT) == []


def test_the_required_bugs_are_planted(mutation_check):
    names = {m.name for m in mutation_check.MUTATIONS}
    assert {
        "noise-over-K",
        "accountant-sigma-not-halved",
        "lira-variance-as-std",
        "lira-offline-over-variance",
        "lira-fix-variance-ignored",
        "clip-eps-dropped",
        "noise-over-batch-twice",
        "fold-ignores-K",
    } <= names
    for m in mutation_check.MUTATIONS:
        assert m.tests and all(t.startswith("tests/") for t in m.tests), m.name
        assert (ROOT / m.tests[0].split("::")[0]).is_file(), m.name


def test_find_problems_reports_a_missing_text(mutation_check, tmp_path):
    """Against a tree where the texts are absent, every mutation is reported (none passes silently)."""
    problems = mutation_check.find_problems(tmp_path)
    assert len(problems) == len(mutation_check.MUTATIONS)
