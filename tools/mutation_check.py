#!/usr/bin/env python3
"""Plant known privacy bugs in a copy of privfast, one at a time, and check that the tests catch each.

Every mutation replaces one exact piece of source text (which must occur exactly once, so that a
refactor cannot make a mutation silently stop applying) and names the pytest subset that should
fail on it. The repository's working tree is copied to a temporary directory (the compiled
``privfast/_C*.so`` included), a baseline run checks that the subsets pass unmutated, then each
mutation is written into the copy, its subset run against the copy (``PYTHONPATH`` pointing
there), and the file restored. The source tree itself is never modified.

Usage::

    python tools/mutation_check.py            # all mutations (a few minutes on 2 cores)
    python tools/mutation_check.py --list     # what would be planted
    python tools/mutation_check.py --only lira-variance-as-std --only clip-eps-dropped

Exit status: 0 when every mutation is killed; 1 when one survives, a subset errors (collection
or import failure instead of a test failure) or the baseline fails; 2 when a mutation's old text
is not found exactly once. Mutations that need a CUDA device are skipped without one.

Not part of ``pytest tests`` (it is slow); ``tests/test_mutation_check.py`` only checks that every
mutation still applies.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NOISE = "tests/test_privacy_noise.py"
NOISE_STEPS = f"{NOISE}::test_update_noise_and_accounting"
CLIP_UNITS = f"{NOISE}::test_each_example_is_clipped_once_over_its_k_rows"
LIRA_FORMULAS = "tests/test_attacks_lira.py::test_lira_scores_equal_the_gaussian_formulas"
LIRA_DIRECTION = "tests/test_attacks_lira.py::test_lira_scores_rank_members_first_on_the_hand_made_case"


@dataclass(frozen=True)
class Mutation:
    """One planted bug.

    Attributes:
        name: short identifier for ``--only``.
        file: path relative to the repository root.
        old: source text replaced; must occur exactly once in ``file``.
        new: its replacement.
        description: the bug, in words.
        tests: pytest arguments (files, node ids, ``-k`` expressions) that must fail on it.
        needs_cuda: only a CUDA run can catch it.
    """

    name: str
    file: str
    old: str
    new: str
    description: str
    tests: tuple[str, ...]
    needs_cuda: bool = field(default=False)


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "noise-over-K",
        "privfast/optim/optimizer.py",
        "noise_std=self.noise_multiplier * self.max_grad_norm,",
        "noise_std=self.noise_multiplier * self.max_grad_norm / self.module.augmult,",
        "noise std sigma*C/K instead of sigma*C when K augmentations are averaged",
        (NOISE_STEPS,),
    ),
    Mutation(
        "noise-over-batch-twice",
        "privfast/optim/optimizer.py",
        "noise_std=self.noise_multiplier * self.max_grad_norm,",
        "noise_std=self.noise_multiplier * self.max_grad_norm / self.expected_batch_size,",
        "noise divided by the expected batch size on top of the 1/B scale of the update",
        (NOISE_STEPS,),
    ),
    Mutation(
        "noise-scale-without-microbatch",
        "privfast/optim/optimizer.py",
        "return self.module.microbatch_size / self.expected_batch_size",
        "return 1.0 / self.expected_batch_size",
        "update scaled by 1/B instead of m/B with microbatches of m: noise (and signal) m times too small",
        (NOISE_STEPS,),
    ),
    Mutation(
        "expected-batch-in-rows",
        "privfast/privacy_engine.py",
        "expected_batch_size = int(len(data_loader.dataset) * sample_rate)",
        "expected_batch_size = int(len(data_loader.dataset) * sample_rate) * augmult",
        "expected batch size counted in rows (B*K): noise on the averaged gradient K times too small",
        (NOISE_STEPS,),
    ),
    Mutation(
        "accountant-sigma-not-halved",
        "privfast/privacy_engine.py",
        "noise_multiplier=opt.accounting_noise_multiplier",
        "noise_multiplier=opt.noise_multiplier",
        "accountant told sigma instead of sigma/2 with microbatches (epsilon under-reported)",
        (NOISE,),
    ),
    Mutation(
        "sensitivity-always-1",
        "privfast/optim/optimizer.py",
        "return 2 if self.module.microbatch_size > 1 else 1",
        "return 1",
        "microbatch sensitivity taken as C instead of 2C (epsilon under-reported)",
        (NOISE,),
    ),
    Mutation(
        "sample-rate-over-K",
        "privfast/privacy_engine.py",
        "sample_rate=sample_rate)",
        "sample_rate=sample_rate / augmult)",
        "accountant given the row sampling rate q/K (epsilon under-reported)",
        (NOISE,),
    ),
    Mutation(
        "dp-sam-accounts-once",
        "privfast/optim/sam.py",
        "        self.pre_step()\n        self.original_optimizer.first_step()",
        "        self.clip_and_accumulate()\n        self.add_noise()\n        self.original_optimizer.first_step()",
        "DP-SAM's ascent release noised but not accounted: one accountant step per SAM step instead of two",
        (NOISE,),
    ),
    Mutation(
        "dp-sam-one-release-planned",
        "privfast/optim/sam.py",
        "releases_per_step = 2",
        "releases_per_step = 1",
        "make_private_with_epsilon plans DP-SAM as one release per step (sigma too small for the target)",
        (f"{NOISE}::test_make_private_with_epsilon_spends_the_target_after_the_planned_epochs",),
    ),
    Mutation(
        "fold-ignores-K",
        "privfast/grad_sample/engine.py",
        "return self.augmult * self.microbatch_size",
        "return self.microbatch_size",
        "each augmented row clipped on its own: one example moves the sum by K*C",
        (CLIP_UNITS,),
    ),
    Mutation(
        "augmentation-K-not-folded",
        "privfast/privacy_engine.py",
        "augmult = augmentation.augmult",
        "augmult = 1",
        "make_private(augmentation=...) leaves the engine at K = 1: rows clipped separately",
        (CLIP_UNITS,),
    ),
    Mutation(
        "clip-eps-dropped",
        "privfast/_torch_ops.py",
        "return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)",
        "return (max_grad_norm / norms).clamp(max=1.0)",
        "clip factor C/n instead of C/(n + 1e-6) (ghost clipping and the pure-torch fallback)",
        (CLIP_UNITS, "tests/test_ops.py::test_fallback_matches_reference"),
    ),
    Mutation(
        "lira-variance-as-std",
        "privfast/attacks/lira.py",
        "return mu, var.sqrt().clamp_min(_MIN_STD)",
        "return mu, var.clamp_min(_MIN_STD)",
        "LiRA uses the fitted variance as the standard deviation",
        (LIRA_FORMULAS,),
    ),
    Mutation(
        "lira-offline-over-variance",
        "privfast/attacks/lira.py",
        "torch.special.log_ndtr((target - mu_out) / sigma_out)",
        "torch.special.log_ndtr((target - mu_out) / sigma_out**2)",
        "offline LiRA standardizes by sigma^2 instead of sigma",
        (LIRA_FORMULAS,),
    ),
    Mutation(
        "lira-fix-variance-ignored",
        "privfast/attacks/lira.py",
        "if fix_variance:",
        "if False:",
        "fix_variance=True still fits per-example variances",
        (LIRA_FORMULAS,),
    ),
    Mutation(
        "lira-density-without-log-sigma",
        "privfast/attacks/lira.py",
        "return -0.5 * ((value - mu) / sigma) ** 2 - sigma.log()",
        "return -0.5 * ((value - mu) / sigma) ** 2",
        "online LiRA drops the -log(sigma) normalization of the Gaussian densities",
        (LIRA_FORMULAS,),
    ),
    Mutation(
        "lira-offline-sign",
        "privfast/attacks/lira.py",
        "torch.special.log_ndtr((target - mu_out) / sigma_out)",
        "torch.special.log_ndtr((mu_out - target) / sigma_out)",
        "offline LiRA scores the upper tail: members rank last",
        (LIRA_FORMULAS, LIRA_DIRECTION),
    ),
    Mutation(
        "cpu-noise-key-constant",
        "privfast/ops.py",
        "words = torch.randint(0, 2**32, (2,), generator=generator, dtype=torch.int64).tolist()",
        "words = [12345, 0]",
        "a CPU generator hands out the same noise key every step: noise repeated across steps",
        (NOISE_STEPS,),
    ),
    Mutation(
        "cuda-noise-offset-not-advanced",
        "privfast/ops.py",
        "generator.set_offset(offset + 4 * math.ceil(counters / 4))",
        "pass",
        "a CUDA generator's offset never moves: noise repeated across steps (the default for a model on CUDA)",
        (NOISE_STEPS, "tests/test_ops.py::test_cuda_generator_keys_the_noise_and_moves_on"),
        needs_cuda=True,
    ),
)


def find_problems(root: Path = ROOT) -> list[str]:
    """Mutations whose old text does not occur exactly once in ``root``, or that change nothing."""
    problems = []
    names = [m.name for m in MUTATIONS]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f"{name}: the name is used twice")
    for m in MUTATIONS:
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        count = path.read_text().count(m.old)
        if count != 1:
            problems.append(
                f"{m.name}: the old text occurs {count} times in {m.file} (must be exactly once): {m.old!r}"
            )
        if m.old == m.new:
            problems.append(f"{m.name}: new text equals old text")
    return problems


def _copy_tree(root: Path, destination: Path) -> Path:
    """The working tree without git metadata, caches or build outputs (but with the compiled ``_C``)."""
    copy = destination / "repo"
    shutil.copytree(
        root,
        copy,
        ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "*.pyc", ".pytest_cache", "build", "dist", "*.egg-info", ".benchmarks"
        ),
    )
    built = sorted(p.name for p in (root / "privfast").glob("_C*.so"))
    missing = [name for name in built if not (copy / "privfast" / name).is_file()]
    if missing:
        raise RuntimeError(f"the compiled extension was not copied: {missing}")
    return copy


def _environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    # Mutated and restored files can share a size and an mtime second; a cached .pyc would then
    # hide the restore (or the mutation), so nothing is cached.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _check_imports_from_copy(copy: Path, env: dict[str, str]) -> None:
    """Refuse to run if ``import privfast`` in the copy would load the source tree's package (an
    editable install found first would make every mutation 'survive')."""
    out = subprocess.run(
        [sys.executable, "-c", "import privfast; print(privfast.__file__)"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(out).resolve().is_relative_to(copy.resolve()):
        raise RuntimeError(f"privfast imports from {out}, not from the copy {copy}")


def _pytest(copy: Path, env: dict[str, str], tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    start = time.perf_counter()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        code, output = run.returncode, run.stdout + run.stderr
    except subprocess.TimeoutExpired as expired:
        code, output = -1, f"timed out after {timeout:.0f} s\n{expired.stdout or ''}"
    return code, time.perf_counter() - start, output


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _last_lines(text: str, count: int = 15) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-count:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the test subsets")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default 600)")
    parser.add_argument("--verbose", action="store_true", help="show pytest's output tail for every run")
    args = parser.parse_args(argv)

    if args.list:
        for m in MUTATIONS:
            cuda = " [CUDA]" if m.needs_cuda else ""
            print(f"{m.name}{cuda}\n    {m.file}: {m.description}\n    tests: {' '.join(m.tests)}")
        return 0

    selected = list(MUTATIONS)
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        if unknown:
            parser.error(f"unknown mutation(s) {unknown}; see --list")
        selected = [m for m in MUTATIONS if m.name in args.only]

    problems = find_problems()
    if problems:
        print("mutations that no longer apply (update tools/mutation_check.py):", *problems, sep="\n  ")
        return 2

    cuda = _cuda_available()
    with tempfile.TemporaryDirectory(prefix="privfast-mutants-") as tmp:
        copy = _copy_tree(ROOT, Path(tmp))
        env = _environment(copy)
        _check_imports_from_copy(copy, env)
        runnable = [m for m in selected if cuda or not m.needs_cuda]

        if not args.no_baseline and runnable:
            subsets = tuple(dict.fromkeys(t for m in runnable for t in m.tests))
            code, seconds, output = _pytest(copy, env, subsets, args.timeout)
            print(f"baseline (unmutated): {'passes' if code == 0 else 'FAILS'} in {seconds:.0f} s")
            if code != 0:
                print(_last_lines(output, 30))
                return 1

        rows = []
        for m in selected:
            if m not in runnable:
                rows.append((m, "skipped (needs CUDA)", 0.0))
                continue
            path = copy / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new, 1))
            try:
                code, seconds, output = _pytest(copy, env, m.tests, args.timeout)
            finally:
                path.write_text(original)
            status = {0: "SURVIVED", 1: "killed"}.get(code, f"ERROR (pytest exit {code})")
            rows.append((m, status, seconds))
            print(f"{m.name}: {status} ({seconds:.0f} s)", flush=True)
            if args.verbose or code not in (1,):
                print(_last_lines(output))

    width = max(len(m.name) for m, _, _ in rows)
    print(f"\n{'mutation':<{width}}  {'result':<22} {'time':>6}  bug")
    for m, status, seconds in rows:
        print(f"{m.name:<{width}}  {status:<22} {seconds:>5.0f}s  {m.description}")
    bad = [m.name for m, status, _ in rows if status != "killed" and not status.startswith("skipped")]
    print(
        f"\n{sum(s == 'killed' for _, s, _ in rows)} killed, {len(bad)} not killed"
        + (f": {', '.join(bad)}" if bad else "")
        + (f", {sum(s.startswith('skipped') for _, s, _ in rows)} skipped without CUDA" if not cuda else "")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
