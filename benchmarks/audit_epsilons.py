"""Empirical privacy audits of DP-SGD and DP-Mix on digits, and RMIA against LiRA on the same shadow models.

Part 1: for each method and target epsilon, the recipe (ConvNet, all 1,257 training digits, 15 epochs,
batch 128, C = 1) is trained twice: once with white-box gradient canaries in the private optimizer
(16 per release) and once with 256 mislabelled canary images for the black-box one-run bound. One
row per run: the accountant's epsilon, the white-box per-release and whole-run estimates, the one-run
lower bound, and wall times. A non-private row gives the one-run bound of a model without noise.

Part 2: RMIA and LiRA (online and offline) against a ConvNet trained on half of a pool of 1,000
digits, with 2, 4, 8 and 16 shadow models (the same shadows for both attacks).

    OMP_NUM_THREADS=1 python benchmarks/audit_epsilons.py --epsilons 1 4 8 --shadows 2 4 8 16
"""

import argparse
import math
import time

import torch

from privfast.auditing import audit_one_run, audit_white_box, rmia_audit
from privfast.config import TrainConfig

RECIPES = {
    "dp-sgd": dict(method="dp-sgd"),
    # DP-Mix as in `privfast demo`: K_base = 4 crops without flips, K_self = 2 mixups.
    "dp-mix": dict(method="dp-mix", k_base=4, k_self=2, flip=False),
}


def _cell(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def audit_rows(epsilons, methods, *, epochs: int, seed: int) -> list[str]:
    lines = [
        "| method | target eps | accountant eps | white-box, one release: accountant / measured [95% CI] "
        "| same, batch's projection kept | white-box, whole run: measured [95% CI] | one-run lower bound (95%) "
        "| test acc. | time white-box / one-run (s) |",
        "|" + " --- |" * 9,
    ]
    runs = [(m, e) for m in methods for e in epsilons] + [("nonprivate", None)]
    for method, epsilon in runs:
        if method == "nonprivate":
            config = TrainConfig(method="nonprivate", epochs=epochs, batch_size=32, lr=0.05, seed=seed)
        else:
            config = TrainConfig(
                epochs=epochs, batch_size=128, lr=1.0, target_epsilon=epsilon, seed=seed, **RECIPES[method]
            )
        one_run = audit_one_run(config, canaries=256, seed=seed)
        if config.private:
            white = audit_white_box(config, canaries=16, seed=seed)
            step = white.details["per_release"]
            step_cell = (
                f"{white.details['per_release_accountant_epsilon']:.2f} / {step['epsilon']:.2f} "
                f"[{step['epsilon_low']:.2f}, {step['epsilon_high']:.2f}]"
            )
            kept = white.details["per_release_batch_kept"]
            kept_cell = f"{kept['epsilon']:.2f} [{kept['epsilon_low']:.2f}, {kept['epsilon_high']:.2f}]"
            run_cell = f"{white.epsilon:.2f} [{white.epsilon_low:.2f}, {white.epsilon_high:.2f}]"
            accountant, times = white.accountant_epsilon, f"{white.seconds:.0f} / {one_run.seconds:.0f}"
        else:
            step_cell = kept_cell = run_cell = "n/a (no noise)"
            accountant, times = math.inf, f"- / {one_run.seconds:.0f}"
        d = one_run.details
        line = (
            f"| {method} | {epsilon if epsilon is not None else '-'} | {_cell(accountant)} | {step_cell} | "
            f"{kept_cell} | {run_cell} | {one_run.epsilon:.2f} ({d['correct']}/{d['guesses']} right) | "
            f"{d['test_accuracy']:.3f} | {times} |"
        )
        print(line, flush=True)
        lines.append(line)
    return lines


def rmia_rows(shadow_counts, *, epochs: int, examples: int, seed: int) -> list[str]:
    lines = ["| shadows | attack | AUC | TPR@0.1%FPR | TPR@1%FPR | offline a | time (s) |", "|" + " --- |" * 7]
    for shadows in shadow_counts:
        result = rmia_audit(shadows=shadows, shadow_epochs=epochs, examples=examples, seed=seed)
        for name, r in result.results.items():
            a = result.details["offline_a"] if name == "rmia_offline" else ""
            line = (
                f"| {shadows} | {name} | {r.summary['auc']:.3f} | {r.summary['tpr_at_fpr'][0.001]:.3f} | "
                f"{r.summary['tpr_at_fpr'][0.01]:.3f} | {a} | {result.seconds:.0f} |"
            )
            print(line, flush=True)
            lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 4.0, 8.0])
    parser.add_argument("--methods", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--shadows", type=int, nargs="*", default=[2, 4, 8, 16])
    parser.add_argument("--shadow-epochs", type=int, default=20)
    parser.add_argument("--examples", type=int, default=500, help="RMIA/LiRA members (and non-members)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"{torch.get_num_threads()} thread(s)")
    if args.epsilons and args.methods:
        audit_rows(args.epsilons, args.methods, epochs=args.epochs, seed=args.seed)
    if args.shadows:
        rmia_rows(args.shadows, epochs=args.shadow_epochs, examples=args.examples, seed=args.seed)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
