"""The ``privfast`` sub-commands: each parses its flags, calls one library function, and prints.

:mod:`privfast.cli` is the entry point; it loads this module (and with it torch and the library) only
once a command is named, so that ``privfast --help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import shlex
import sys
import typing
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import torch

from privfast.attacks.reconstruction import PRESETS
from privfast.audit import ATTACKS, DEFAULT_ATTACKS, audit_model
from privfast.auditing import EPSILON_BOUNDS, LM_SCORES, SCORES, audit_checkpoint, rmia_audit
from privfast.canaries import load_canaries
from privfast.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    RunLock,
    check_overwrite,
    load_trained,
    read_checkpoint,
)
from privfast.cli import COMMANDS, top_level_parser
from privfast.config import METHODS, TrainConfig, check_resume, flag
from privfast.data import DATASET_AUGMENTATION, DATASETS, Split, data_shape, load_data, load_dataset
from privfast.demo import DEMO_RUNS as DEMO_RUNS_BY_DATASET
from privfast.demo import DEMO_TRAIN_EXAMPLES as DEMO_TRAIN_EXAMPLES_BY_DATASET
from privfast.demo import run_demo
from privfast.federated import INVERSION_NOTE, invert_gradients
from privfast.grad_sample.engine import MODES
from privfast.models import MODELS, LeNet, build_model
from privfast.reports import (
    ADVANTAGE_NOTE,
    format_audit,
    format_table,
    load_audits,
    plot_reconstructions,
    summarize,
    write_audit,
    write_report,
)
from privfast.search import ats_search
from privfast.throughput import (
    FAMILIES,
    VARIANTS,
    compare_family,
    format_markdown,
    format_op_categories,
    format_op_times,
    format_phases,
    format_rows,
    op_times,
    phase_times,
    run_benchmark,
)
from privfast.trainer import Trainer, TrainingInterrupted

__all__ = ["DEMO_RUNS", "DEMO_TRAIN_EXAMPLES", "build_parser", "main"]

# The demo lives in privfast.demo (runs per data set); the digits runs stay importable from here.
DEMO_RUNS = DEMO_RUNS_BY_DATASET["digits"]
DEMO_TRAIN_EXAMPLES = DEMO_TRAIN_EXAMPLES_BY_DATASET["digits"]
_CHOICES = {
    "dataset": DATASETS,
    "model": MODELS,
    "method": METHODS,
    "grad_sample_mode": MODES,
    "attacks": tuple(ATTACKS),
}


def _field_help(cls: type) -> dict[str, str]:
    """Each attribute's entry in the dataclass's docstring, so that flags and fields never disagree."""
    # Continuation lines included; Sphinx markup reads badly in a terminal: ``x`` -> x, :class:`~a.b.C` -> C.
    entries = re.findall(r"\n {8}(\w+): (.*(?:\n {12}.*)*)", cls.__doc__ or "")
    return {
        k: re.sub(r"\s+", " ", re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"\1", v.replace("``", ""))) for k, v in entries
    }


def _add_dataclass_flags(group, cls: type, *, choices: Optional[dict] = None, defaults: Optional[dict] = None) -> None:
    """One ``--flag`` per field of the dataclass ``cls``; flags not given keep the field's default (with
    ``--resume``: the run's value). An optional field takes ``none`` to unset it.

    Args:
        group: the parser or argument group the flags go in.
        cls: :class:`TrainConfig` or :class:`~privfast.secret_sharer.SecretSharerConfig`.
        choices: allowed values per field name.
        defaults: the help's default text per field name, where the field's own default does not say it.
    """
    choices, defaults = choices or {}, defaults or {}
    helps = _field_help(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        optional = type(None) in typing.get_args(hint)
        hint = next((t for t in typing.get_args(hint) if t is not type(None)), hint) if optional else hint
        default = defaults.get(field.name, field.default)
        default = " ".join(map(str, default)) if isinstance(default, tuple) else default
        kwargs = dict(
            dest=field.name,
            default=argparse.SUPPRESS,
            help=f"{helps.get(field.name, '')} (default: {'none' if default is None else default})",
        )
        if hint is bool:
            group.add_argument(flag(field.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(hint) is tuple:
            kwargs.update(nargs="+")
            hint = typing.get_args(hint)[0]
        group.add_argument(
            flag(field.name), type=_or_none(hint) if optional else hint, choices=choices.get(field.name), **kwargs
        )


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`TrainConfig` field (see :func:`_add_dataclass_flags`)."""
    per_data_set = {
        name: "per data set: " + ", ".join(f"{data} {values[name]}" for data, values in DATASET_AUGMENTATION.items())
        for name in ("crop_padding", "flip")
    }
    group = parser.add_argument_group("training configuration (privfast.config.TrainConfig)")
    _add_dataclass_flags(group, TrainConfig, choices=_CHOICES, defaults=per_data_set)


def _or_none(kind: type):
    """``kind`` for argparse, or None for ``none`` (an optional field unset, e.g. ``--target-epsilon none``)."""

    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names it in "invalid float value"
    return parse


def _given(args: argparse.Namespace) -> dict:
    """The configuration fields given as flags (the others were left out of ``args``)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def _renamed(new: str) -> type[argparse.Action]:
    """The action of a flag renamed ``new``: say so, instead of argparse's "unrecognized arguments"."""

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{option_string} is now {new}")

    return Renamed


def build_parser() -> argparse.ArgumentParser:
    """The ``privfast`` argument parser (one sub-command per task)."""
    parser, commands = top_level_parser(with_commands=False)

    demo = commands.add_parser("demo", help=COMMANDS["demo"])
    demo.add_argument(
        "--dataset",
        choices=sorted(DEMO_RUNS_BY_DATASET),
        default="digits",
        help="digits (bundled, ~20 s) or cifar10 (needs --data-root; a few minutes on 2 cores)",
    )
    demo.add_argument("--data-root", default=None, help="directory holding cifar-10-batches-py (--dataset cifar10)")
    demo.add_argument("--out", type=Path, default=Path("privfast-demo"), help="report directory")
    demo.add_argument(
        "--epochs-scale",
        type=float,
        default=1.0,
        help="multiply every run's epochs by this (e.g. 0.2 for a smoke test)",
    )
    demo.add_argument(
        "--train-examples",
        type=int,
        default=None,
        help="training images (default: "
        + ", ".join(f"{k} {v}" for k, v in DEMO_TRAIN_EXAMPLES_BY_DATASET.items())
        + "; few enough for the "
        "non-private model to overfit and leak)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seeds the models, the data order, the noise and the audit")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo)

    train = commands.add_parser("train", help=COMMANDS["train"])
    train.add_argument(
        "--out",
        type=Path,
        required=True,
        help="run directory: checkpoint.pt and the report (refused if it holds a run, unless --resume or --overwrite)",
    )
    runs = train.add_mutually_exclusive_group()
    runs.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT (if any) with its saved configuration; flags given are changes "
        "(--epochs, --data-root; the noise may not change)",
    )
    runs.add_argument("--overwrite", action="store_true", help="replace the run in OUT by a new one")
    train.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes of a distributed private run on this machine (gloo, CPU; default: 1, or the "
        "run's with --resume); or use torchrun",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument(
        "--augmult", action=_renamed("--k-base (K_base; K = k_base + k_self + k_diff)"), help=argparse.SUPPRESS
    )
    _add_config_flags(train)
    train.set_defaults(handler=_train)

    audit = commands.add_parser("audit", help=COMMANDS["audit"])
    audit.add_argument(
        "checkpoint",
        type=Path,
        nargs="?",
        default=None,
        help="a run directory of `privfast train` or its checkpoint.pt (optional with --attack rmia), or with "
        "--epsilon-bound one-run the directory of a `privfast secret-sharer` run",
    )
    audit.add_argument(
        "--epsilon-bound",
        choices=EPSILON_BOUNDS,
        default=None,
        help="retrain the checkpoint's recipe once with canaries and print the accountant's epsilon "
        "beside an empirical lower bound: one-run (black box, mislabelled images) or white-box "
        "(gradient canaries in the private optimizer)",
    )
    audit.add_argument(
        "--attack",
        choices=("rmia",),
        default=None,
        help="rmia: RMIA and LiRA, online and offline, on the same --shadows shadow models (without a "
        "checkpoint: a ConvNet trained on half of a pool of digits)",
    )
    audit.add_argument(
        "--canaries",
        type=int,
        default=None,
        help="one-run: canary images (default 256); white-box: canary directions per step (default 16)",
    )
    audit.add_argument("--confidence", type=float, default=0.95, help="confidence of the epsilon lower bound")
    audit.add_argument(
        "--score",
        choices=SCORES + LM_SCORES,
        default=None,
        help="the one-run audit's canary score (default: loss for images, calibrated for a Secret "
        "Sharer run's token secrets)",
    )
    audit.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help="--epsilon-bound one-run of a Secret Sharer run directory: the budget to audit (default: its smallest)",
    )
    audit.add_argument(
        "--attacks",
        nargs="+",
        choices=tuple(ATTACKS),
        default=list(DEFAULT_ATTACKS),
        help="threshold attacks (yeom, calibrated and calibrated_per_class share the -loss score)",
    )
    audit.add_argument("--examples", type=int, default=1000, help="members and non-members attacked, each")
    audit.add_argument("--known", type=int, default=100, help="members and non-members the attacker knows, each")
    audit.add_argument("--seed", type=int, default=0, help="seeds the attacked subsets and the attacker's knowledge")
    audit.add_argument(
        "--shadows", type=int, default=16, help="LiRA shadow models, even (0: no LiRA); trained together, vectorized"
    )
    audit.add_argument("--shadow-epochs", type=int, default=20, help="training epochs of each shadow model")
    audit.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes the shadow models are sharded across (on this machine; or use torchrun)",
    )
    audit.add_argument("--no-progress", action="store_true", help="no progress bars")
    audit.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write audit.json, audit.md and roc.png there (default: beside the checkpoint, where "
        "`privfast report` finds them; --attack rmia: its rmia/ folder there)",
    )
    audit.set_defaults(handler=_audit)

    report = commands.add_parser("report", help=COMMANDS["report"])
    report.add_argument(
        "checkpoints",
        type=Path,
        nargs="+",
        help="run directories of `privfast train` or their checkpoint.pt files (the audits `privfast audit` "
        "wrote there since the checkpoint are included)",
    )
    report.add_argument("--out", type=Path, required=True, help="report directory")
    report.add_argument(
        "--attack", default=None, help="the audited attack of the table (default: one that every run audited)"
    )
    report.add_argument("--names", nargs="+", default=None, help="run names (default: the run directories' names)")
    report.set_defaults(handler=_report)

    search = commands.add_parser("search", help=COMMANDS["search"])
    _add_data_flags(search)
    search.add_argument("--model", choices=MODELS, default="convnet")
    search.add_argument("--width", type=int, default=16, help="ConvNet channels / MLP hidden units")
    search.add_argument("--candidates", type=int, default=60, help="random policies scored (ATS: 1,500)")
    search.add_argument("--images", type=int, default=10, help="images S_pri is averaged over (ATS: 100)")
    search.add_argument("--top", type=int, default=2, help="policies kept for the hybrid")
    search.add_argument(
        "--acc-threshold", type=float, default=None, help="S_acc filter (default: the S_acc of the untransformed data)"
    )
    search.add_argument("--semi-fraction", type=float, default=0.1, help="training data of the semi-trained model")
    search.add_argument("--semi-epochs", type=int, default=20, help="epochs of the semi-trained model (ATS: 50)")
    search.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes the candidate policies are sharded across (on this machine; or use torchrun)",
    )
    search.set_defaults(handler=_search)

    invert = commands.add_parser("invert", help=COMMANDS["invert"])
    _add_data_flags(invert)
    invert.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="attack this `privfast train` model on its own data set (default: a fresh LeNet on "
        "--dataset, DLG's setting)",
    )
    invert.add_argument("--images", type=int, default=4, help="test images whose gradients are inverted")
    # DLG (L-BFGS on the L2 gradient distance) recovers 8x8 digits from a LeNet's gradient within
    # 100 steps (about 44 dB); the 4,800 signed-Adam steps of inverting gradients are for larger images.
    invert.add_argument("--preset", default="dlg", choices=sorted(PRESETS), help="attack configuration")
    invert.add_argument("--iterations", type=int, default=100, help="optimizer steps of the attack")
    invert.add_argument(
        "--tv", type=float, default=None, help="weight of the total-variation prior (default: the preset's)"
    )
    invert.add_argument("--policy", default=None, help="ATS defense applied before the gradient, e.g. 3-1-7+43-18-18")
    invert.set_defaults(handler=_invert)

    bench = commands.add_parser("bench", help=COMMANDS["bench"])
    bench.add_argument(
        "--family",
        choices=sorted(FAMILIES),
        default=None,
        help="a benchmark model family (cnn, wrn16-4, lstm-lm, transformer): every variant, the "
        "same-update check, time and peak memory (make bench runs them all)",
    )
    bench.add_argument("--model", choices=MODELS, default="convnet")
    bench.add_argument("--width", type=int, default=32, help="ConvNet channels / MLP hidden units")
    bench.add_argument("--channels", type=int, default=3)
    bench.add_argument("--image-size", type=int, default=32)
    bench.add_argument("--classes", type=int, default=10)
    bench.add_argument("--batch", type=int, default=16, help="examples per step (B)")
    bench.add_argument(
        "--k", type=int, nargs="+", default=None, help="augmentations per example (K; default 1 4, a family's own)"
    )
    bench.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    bench.add_argument("--rounds", type=int, default=5, help="timed steps per measurement")
    bench.add_argument("--out", type=Path, default=None, help="write bench.json there")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.add_argument(
        "--phases",
        choices=MODES,
        default=None,
        metavar="MODE",
        help="with --family: where the private step's time goes in this mode (forward, backward, clip, noise, "
        "update) beside the non-private step's, at each --k",
    )
    bench.add_argument(
        "--ops",
        choices=MODES,
        default=None,
        metavar="MODE",
        help="with --family: the private step's time in this mode operator by operator (torch.profiler), "
        "ranked by its extra over the non-private step's, at each --k",
    )
    bench.set_defaults(handler=_bench)
    _add_secret_sharer(commands)
    return parser


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--data-root", default=None, help="directory of a file-based data set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results there")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _write_json(out: Path, name: str, value) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(value, indent=1, default=str))
    return out / name


def _print_table(rows: dict, elapsed: Optional[float] = None) -> None:
    print(format_table(rows))
    print(ADVANTAGE_NOTE)
    if elapsed is not None:
        print(f"wall time: {elapsed:.1f} s")


# -- commands ---------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    result = run_demo(
        dataset=args.dataset,
        data_root=args.data_root,
        out=args.out,
        epochs_scale=args.epochs_scale,
        train_examples=args.train_examples,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print("\n" + result.header)
    _print_table(result.rows, result.elapsed)
    for note in result.notes:
        print(note)
    print(f"report: {result.report}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from privfast import launch

    checkpoint, given = args.out / CHECKPOINT_NAME, _given(args)
    # From reading the run to its last checkpoint, no other writer (under torchrun rank 0 speaks for all).
    with RunLock(checkpoint) if launch.is_rank_zero() else contextlib.nullcontext():
        stored = read_checkpoint(checkpoint) if args.resume and checkpoint.exists() else None
        if stored is None:
            check_overwrite(checkpoint, resume=args.resume, overwrite=args.overwrite)
            config = TrainConfig(**given)
        else:
            previous = TrainConfig.from_dict(stored["config"])
            config = TrainConfig.from_dict({**previous.to_dict(), **given})
            check_resume(previous, config)
        nproc = args.nproc or (stored["world_size"] if stored and not launch.under_torchrun() else 1)
        try:
            if launch.is_distributed(nproc):  # --nproc N, or started by torchrun
                history = launch.launch_training(
                    config,
                    nproc=nproc,
                    checkpoint=checkpoint,
                    resume=args.resume,
                    overwrite=args.overwrite,
                    progress=not args.no_progress,
                )
            else:
                trainer = Trainer(config, checkpoint=checkpoint, progress=not args.no_progress)
                history = trainer.fit(resume=args.resume, overwrite=args.overwrite)
        except KeyboardInterrupt as stop:
            return _train_stopped(args, stop, checkpoint, given, nproc)
    attack = config.attacks[-1] if config.attacks else None
    if attack is None:
        print(f"test accuracy {history[-1]['test_accuracy']:.3f} (no attack audited)")
        return 0
    _print_table({config.method: summarize(history, attack=attack)})
    write_report(
        args.out,
        {config.method: {"config": config.to_dict(), "history": history}},
        attack=attack,
        title=f"privfast train: {config.method}",
    )
    print(f"checkpoint: {args.out / 'checkpoint.pt'}\nreport: {args.out / 'report.md'}")
    return 0


def _train_stopped(args: argparse.Namespace, stop: KeyboardInterrupt, checkpoint: Path, given: dict, nproc: int) -> int:
    """Ctrl-C: what was saved, and the one command line that goes on (exit status 130, as a shell's)."""
    if isinstance(stop, TrainingInterrupted):
        print(f"\n{stop}")
    else:  # across processes, stopped at once: the last completed epoch is what is saved
        print(f"\ntraining stopped; {'its last completed epoch is' if checkpoint.exists() else 'nothing is'} saved")
    from privfast.launch import under_torchrun

    words = ["train", "--out", str(args.out), "--resume"]
    if not checkpoint.exists():  # no saved configuration to read: repeat it
        words[-1:] = [*_as_flags(given), "--resume"]
        words += ["--nproc", str(nproc)] if nproc > 1 else []
    start = "torchrun [this run's options] -m privfast.cli" if under_torchrun() else "privfast"
    print(f"continue with: {start} {shlex.join(words)}")
    return 130


def _as_flags(config: dict) -> list[str]:
    """``privfast train`` flags giving the configuration fields ``config``."""
    words = []
    for name, value in config.items():
        if isinstance(value, bool):
            words.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            values = value if isinstance(value, (tuple, list)) else [value]
            words += [flag(name), *("none" if v is None else str(v) for v in values)]
    return words


def _run_dir(path: Path) -> Path:
    """The run directory of a checkpoint path (or the directory itself)."""
    return path if path.is_dir() else path.parent


def _audit(args: argparse.Namespace) -> int:
    if args.epsilon_bound is not None and args.attack is not None:
        raise ValueError("give --epsilon-bound or --attack, not both")
    if args.checkpoint is None and args.attack is None:
        what = (
            "--epsilon-bound audits the recipe of a CHECKPOINT: give one"
            if args.epsilon_bound
            else "a CHECKPOINT is needed (only --attack rmia runs without one)"
        )
        raise ValueError(what)
    out = args.out if args.out is not None or args.checkpoint is None else _run_dir(args.checkpoint)
    progress = not args.no_progress
    if args.attack is None and args.epsilon_bound is None:
        model, config, history = load_trained(args.checkpoint)
        audit = audit_model(
            model,
            config,
            history,
            canaries=load_canaries(args.checkpoint),
            attacks=args.attacks,
            examples=args.examples,
            known=args.known,
            shadows=args.shadows,
            shadow_epochs=args.shadow_epochs,
            seed=args.seed,
            nproc=args.nproc,
            progress=progress,
        )
        print(f"{args.checkpoint}: {format_audit(audit)}")
        print("written: " + ", ".join(map(str, write_audit(audit, out, source=str(args.checkpoint)))))
        return 0
    if args.attack == "rmia":
        result = rmia_audit(
            args.checkpoint,
            shadows=args.shadows,
            shadow_epochs=args.shadow_epochs,
            examples=args.examples,
            seed=args.seed,
            progress=progress,
        )
        print(
            f"{result.details['target']}: {result.details['members']} members, {result.details['nonmembers']} "
            f"non-members, {args.shadows} shadow models (offline a = {result.details['offline_a']})"
        )
    else:
        result = audit_checkpoint(
            args.checkpoint,
            bound=args.epsilon_bound,
            canaries=args.canaries,
            confidence=args.confidence,
            score=args.score,
            seed=args.seed,
            epsilon=args.epsilon,
            progress=progress,
        )
        print(f"{args.checkpoint}: {result.details['method']} retrained once with canaries; delta {result.delta:g}")
    print(result.table())
    print(f"wall time: {result.seconds:.1f} s")
    if out is not None:
        # RMIA's own roc.png goes in a folder of its own unless told where, beside the membership audit's.
        out = out / "rmia" if args.attack == "rmia" and args.out is None else out
        print("written: " + ", ".join(map(str, result.write(out))))
    return 0


def _report(args: argparse.Namespace) -> int:
    names = args.names or [_run_dir(path).name for path in args.checkpoints]
    if len(names) != len(args.checkpoints) or len(set(names)) != len(names):
        raise ValueError(
            f"need one distinct name per checkpoint, got names {names} for {len(args.checkpoints)} "
            "checkpoints (pass --names)"
        )
    runs, models, audits, data = {}, {}, {}, None
    for name, path in zip(names, args.checkpoints):
        model, config, history = load_trained(path)
        runs[name] = {"config": config.to_dict(), "history": history}
        models[name] = model
        audits[name] = load_audits(_run_dir(path))
        data = data or load_data(config)
    common = [a for a in ATTACKS if all(a in run["history"][-1] for run in runs.values())]
    if args.attack is None and not common:
        raise ValueError("the runs have no audited attack in common; pass --attack")
    attack = args.attack or common[-1]
    _print_table({name: summarize(run["history"], attack=attack) for name, run in runs.items()})
    path = write_report(
        args.out, runs, attack=attack, models=models, members=data[0], nonmembers=data[1], audits=audits
    )
    for name, found in audits.items():
        if found:
            print(f"{name}: audits included ({', '.join(found)})")
    print(f"report: {path}")
    return 0


def _search(args: argparse.Namespace) -> int:
    config = TrainConfig(
        dataset=args.dataset, data_root=args.data_root, model=args.model, width=args.width, seed=args.seed
    )
    train, _ = load_data(config)
    result = ats_search(
        partial(build_model, config, **data_shape(train)),
        train,
        candidates=args.candidates,
        images=args.images,
        acc_threshold=args.acc_threshold,
        top_n=args.top,
        semi_fraction=args.semi_fraction,
        semi_epochs=args.semi_epochs,
        seed=args.seed,
        nproc=args.nproc,
        progress=not args.no_progress,
    )
    print(
        f"S_acc threshold {result.threshold:.3f}; lower S_pri is more private; a policy lists indices of the ATS "
        "library, its transforms named beside it"
    )
    print(result.format_table(limit=10))
    if args.out is not None:
        print("written: " + ", ".join(map(str, result.write(args.out))))
    return 0


def _invert(args: argparse.Namespace) -> int:
    if args.checkpoint is not None:
        model, config, _ = load_trained(args.checkpoint)
        _, test = load_data(config)
    else:
        _, test = load_dataset(args.dataset, root=args.data_root)
        torch.manual_seed(args.seed)
        model = LeNet(**data_shape(test)).eval()
    overrides = {"tv": args.tv} if args.tv is not None else {}
    result = invert_gradients(
        model,
        Split(test.x[: args.images], test.y[: args.images]),
        policy=args.policy,
        preset=args.preset,
        iterations=args.iterations,
        seed=args.seed,
        progress=not args.no_progress,
        **overrides,
    )
    print(
        f"{args.preset}, {args.iterations} iterations; labels recovered {result.labels_recovered}/{len(result.shared)}"
    )
    print(result.format_table())
    print(INVERSION_NOTE)
    if args.out is not None:
        rows, titles = result.grid()
        path = plot_reconstructions(rows, args.out / "reconstructions.png", titles=titles)
        print(f"written: {path}, {_write_json(args.out, 'invert.json', result.to_dict())}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    for option, mode in (("--phases", args.phases), ("--ops", args.ops)):
        if mode is None:
            continue
        if args.family is None:
            raise SystemExit(f"privfast bench: {option} needs --family")
        print(f"{args.family}: {FAMILIES[args.family].description}; {torch.get_num_threads()} thread(s)")
        for k in args.k or FAMILIES[args.family].augmults:
            print(f"K = {k}:")
            if option == "--phases":
                print(format_phases(phase_times(args.family, augmult=k, mode=mode, rounds=args.rounds)))
            else:
                times = op_times(args.family, augmult=k, mode=mode, rounds=args.rounds)
                print(format_op_times(times))
                print(format_op_categories(times))
        return 0
    if args.family is not None:
        rows = compare_family(
            args.family, augmults=args.k, variants=args.variants, rounds=args.rounds, progress=not args.no_progress
        )
        print(f"{args.family}: {FAMILIES[args.family].description}; {torch.get_num_threads()} thread(s)")
        print(format_markdown(rows))
        if args.out is not None:
            print(f"written: {_write_json(args.out, 'bench.json', rows)}")
        return 0
    config = TrainConfig(model=args.model, width=args.width)
    shape = {"in_channels": args.channels, "image_size": args.image_size, "num_classes": args.classes}
    rows = run_benchmark(
        lambda: build_model(config, **shape),
        (args.channels, args.image_size, args.image_size),
        num_classes=args.classes,
        batch_size=args.batch,
        augmults=args.k or [1, 4],
        variants=args.variants,
        rounds=args.rounds,
        progress=not args.no_progress,
    )
    print(
        f"{args.model}, B={args.batch}, input {args.channels}x{args.image_size}x{args.image_size}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(format_rows(rows))
    if args.out is not None:
        print(f"written: {_write_json(args.out, 'bench.json', rows)}")
    return 0


def _add_secret_sharer(commands) -> None:
    """``privfast secret-sharer``: one flag per :class:`~privfast.secret_sharer.SecretSharerConfig` field."""
    from privfast.secret_sharer import SecretSharerConfig

    parser = commands.add_parser("secret-sharer", help=COMMANDS["secret-sharer"])
    parser.add_argument("--out", type=Path, required=True, help="run directory: exposure.json, report.md, plots, runs/")
    parser.add_argument("--resume", action="store_true", help="go on with the run in OUT (new epsilons are added)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_dataclass_flags(parser, SecretSharerConfig)
    parser.set_defaults(handler=_secret_sharer)


def _secret_sharer(args: argparse.Namespace) -> int:
    from privfast.secret_sharer import SecretSharerConfig, run_secret_sharer

    fields = {f.name for f in dataclasses.fields(SecretSharerConfig)}
    config = SecretSharerConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = run_secret_sharer(config=config, out=args.out, resume=args.resume, progress=not args.no_progress)
    print(result.table)
    print("exposure in bits: exact (skew-normal extrapolation); about 1.4 = not memorized")
    print("written: " + ", ".join(str(p) for p in result.paths.values()))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``privfast`` command with ``argv`` (default: the process's arguments); returns the exit status."""
    args = build_parser().parse_args(argv)
    from privfast.launch import quiet_other_ranks

    quiet_other_ranks()  # under torchrun rank 0 alone prints
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return args.handler(args)
    except KeyboardInterrupt:  # what a command saved it has said (train prints how to go on)
        print(f"\nprivfast {args.command}: interrupted", file=sys.stderr)
        return 130
    # Bad input, an unreadable or busy checkpoint: say which and why, without a traceback.
    except (CheckpointError, ValueError, FileNotFoundError) as error:
        print(f"privfast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
