"""The ``privfast`` command: train privately, attack, compare, report.

    privfast demo                                    # non-private vs DP-SGD vs DP-Mix on 300 digits, ~20 s
    privfast train --method dp-mix --k-base 2 --k-self 2 --target-epsilon 8 --out runs/dpmix
    privfast train --out runs/dpmix --resume         # go on with the run in runs/dpmix (its saved flags)
    privfast train ... --nproc 2                     # DP training across 2 processes
    privfast train ... --canaries 10 --canary-repeats 4   # insert canaries, for `audit` to measure exposure
    privfast audit runs/dpmix --shadows 16           # LiRA, calibrated threshold, Yeom, canary exposure
    privfast audit runs/dpmix --epsilon-bound white-box   # the accountant's epsilon vs an audit's
    privfast audit --attack rmia                     # RMIA beside LiRA on the same shadows (overfitted digits model)
    privfast report runs/* --out report/
    privfast search | invert | bench                 # ATS policy search, gradient inversion, step throughput
    privfast secret-sharer --epsilons inf 8 2 1 --repeats 1 4 16 64 --out runs/secret   # exposure against epsilon

Every command that trains or attacks writes its numbers as JSON and Markdown, and its plots as PNG.

This module is the entry point and imports neither torch nor the library: without a command (``privfast``,
``privfast --help``) it answers from here at once; a named command loads :mod:`privfast.commands`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["COMMANDS", "main", "top_level_parser"]

COMMANDS = {
    "demo": "non-private vs DP-SGD vs DP-Mix: accuracy, epsilon, membership attacks",
    "train": "train one model, auditing membership leakage after every epoch",
    "audit": "attack a trained model (membership inference: LiRA, calibrated threshold, Yeom; canary exposure; "
    "empirical epsilon bounds; RMIA) and print the metrics",
    "report": "one report comparing several trained runs",
    "search": "ATS search for transformation policies against gradient inversion",
    "invert": "reconstruct training images from their gradients (and measure PSNR and SSIM)",
    "bench": "training-step time: non-private vs privfast's modes vs Opacus",
    "secret-sharer": "the Secret Sharer: language models trained at several epsilon on text with inserted canaries; "
    "exposure (exact and extrapolated) and extraction",
}
"""Every sub-command and its one-line help (the sub-commands' flags are in :mod:`privfast.commands`)."""


def top_level_parser(*, with_commands: bool = True) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The parser's top level: the global flags, and (``with_commands``) one empty sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="privfast", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items() if with_commands else ():
        commands.add_parser(name, help=text)
    return parser, commands


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``privfast`` command with ``argv`` (default: the process's arguments); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(arg in COMMANDS for arg in argv):
        # No command: the top-level help, or argparse's usage error (both exit), without importing torch.
        parser, _ = top_level_parser()
        parser.parse_args(argv)
        parser.error("a COMMAND is required")
    from privfast.commands import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
