"""The privfast command: demo, train (with resume), audit and report, and its error messages."""

import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from privfast.cli import main
from privfast.commands import DEMO_RUNS
from privfast.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--train-examples",
    "96",
    "--width",
    "4",
    "--batch-size",
    "24",
    "--audit-examples",
    "48",
    "--audit-known",
    "16",
    "--attacks",
    "yeom",
    "calibrated",
]


def test_demo_prints_the_three_runs_side_by_side_and_writes_its_report(tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                "--epochs-scale",
                "0.07",
                "--train-examples",
                "300",
                "--out",
                str(tmp_path / "demo"),
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("run "))
    for column in ("test acc", "epsilon", "AUC", "advantage", "TPR@1%FPR", "DP bound P_err"):
        assert column in header
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.split()[:1] in (["non-private"], ["DP-SGD"], ["DP-Mix"])
    }
    assert sorted(rows) == sorted(DEMO_RUNS)
    assert rows["non-private"][2] == "inf" and float(rows["DP-SGD"][2]) > 0 and float(rows["DP-Mix"][2]) > 0
    # 300 members and 500 of the 539 test digits attacked (audit_examples), 100 of each known.
    assert "wall time" in out and "200 members and 400 non-members" in out
    for name in ("report.md", "results.json", "curves.png", "losses.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["DP-Mix"]["config"]["k_self"] == DEMO_RUNS["DP-Mix"]["k_self"]
    assert math.isfinite(results["DP-SGD"]["js_distance"]) and results["DP-SGD"]["js_distance"] > 0


def test_train_resume_audit_and_report(tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["train", "--out", str(run), "--method", "dp-sgd", "--noise-multiplier", "1.5", "--no-progress", *TINY]
    assert main([*flags, "--epochs", "1"]) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=False)["history"][-1]["epoch"] == 1
    # --resume reads the saved configuration: the flags given are the changes (here, more epochs).
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    assert [r["epoch"] for r in checkpoint["history"]] == [1, 2]
    assert checkpoint["config"]["noise_multiplier"] == 1.5 and (run / "report.md").exists()
    capsys.readouterr()

    # audit, report and invert take the run directory for its checkpoint.
    assert (
        main(
            [
                "audit",
                str(run),
                "--attacks",
                "yeom",
                "calibrated_per_class",
                "--examples",
                "60",
                "--known",
                "20",
                "--shadows",
                "0",
                "--out",
                str(tmp_path / "audit"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "yeom" in out and "calibrated_per_class" in out and "dp-sgd" in out and "canary" not in out
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["record"]["epsilon"] == checkpoint["history"][-1]["epsilon"] and audit["canaries"] is None

    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| run |" in report and "| run " in report.split("| run |", 1)[1]  # named after its directory
    assert (tmp_path / "report" / "losses.png").exists()
    assert main(["invert", "--checkpoint", str(run), "--images", "1", "--iterations", "2", "--no-progress"]) == 0


def test_audit_runs_lira_and_measures_inserted_canaries(tmp_path, capsys):
    # A non-private run that sees each canary 8 times memorizes it: its loss drops below the
    # references' and its exposure rises well above the ~1 bit of a canary never seen.
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--out",
                str(run),
                "--method",
                "nonprivate",
                "--epochs",
                "6",
                "--canaries",
                "4",
                "--canary-repeats",
                "8",
                "--no-progress",
                *TINY,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "audit",
                str(run / "checkpoint.pt"),
                "--attacks",
                "yeom",
                "calibrated",
                "--examples",
                "48",
                "--known",
                "16",
                "--shadows",
                "4",
                "--shadow-epochs",
                "2",
                "--no-progress",
                "--out",
                str(tmp_path / "audit"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"yeom", "calibrated", "lira_online", "lira_offline"} <= rows and "canary exposure" in out
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["shadows"] == 4
    for name in ("lira_online", "lira_offline"):
        assert math.isfinite(audit["record"][name]["auc"])
    canaries = audit["canaries"]
    assert canaries["inserted"] == 4 and len(canaries["exposure"]) == 4
    assert all(0 <= e <= canaries["max_exposure"] for e in canaries["exposure"])
    assert sum(canaries["exposure"]) / 4 > 3  # memorized: far above a random candidate's ~1 bit
    assert "Canary exposure" in (tmp_path / "audit" / "audit.md").read_text()
    assert (tmp_path / "audit" / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["audit", str(run / "checkpoint.pt"), "--shadows", "3", "--examples", "48", "--known", "16"]) == 2
    assert "n_shadows must be even" in capsys.readouterr().err


def test_errors_say_what_was_wrong(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--method", "dp-mix", "--no-progress"]) == 2
    assert "--k-self >= 1" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path), "--dataset", "cifar10", "--data-root", str(tmp_path)]) == 2
    assert "data_batch_1" in capsys.readouterr().err
    assert main(["audit", str(tmp_path / "missing.pt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--method", "adam"])
    assert "invalid choice: 'adam'" in capsys.readouterr().err


def test_module_entry_point_lists_the_commands():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "privfast.cli", "--help"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )
    assert result.returncode == 0
    for command in ("demo", "train", "audit", "report"):
        assert command in result.stdout


def test_search_writes_ranked_policies_and_a_disjoint_hybrid(tmp_path, capsys):
    assert (
        main(
            [
                "search",
                "--candidates",
                "8",
                "--images",
                "2",
                "--semi-epochs",
                "1",
                "--width",
                "4",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    found = json.loads((tmp_path / "search.json").read_text())
    assert len(found["table"]) == 8 and 1 <= len(found["selected"]) <= 2
    kept = sorted(r["s_pri"] for r in found["table"] if r["s_pri"] is not None and r["s_pri"] == r["s_pri"])
    by_policy = {r["policy"]: r["s_pri"] for r in found["table"]}
    assert by_policy[found["selected"][0]] == kept[0]  # the best S_pri (lowest) is selected first
    assert found["hybrid"].split("+") == found["selected"]
    out = capsys.readouterr().out
    assert "hybrid:" in out
    # Each printed policy has its transforms' names beside its indices, and a Markdown table is written.
    best = found["selected"][0]
    assert any(line.split()[:1] == [best] and found["transforms"][best] in line for line in out.splitlines())
    assert f"| {best} | {found['transforms'][best]} |" in (tmp_path / "search.md").read_text()


def test_invert_reports_psnr_and_writes_the_grid(tmp_path, capsys):
    assert (
        main(["invert", "--images", "2", "--iterations", "5", "--policy", "3", "--out", str(tmp_path), "--no-progress"])
        == 0
    )
    out = capsys.readouterr().out
    assert "labels recovered" in out and "PSNR vs clean" in out
    assert "SSIM vs shared" in out and "SSIM vs clean" in out and "measures the defense" in out
    result = json.loads((tmp_path / "invert.json").read_text())
    for case in ("no defense", "policy 3"):  # ATS Fig. 4: the same images attacked without and with the defense
        assert len(result[case]["psnr_vs_clean"]) == 2 and all(v > 0 for v in result[case]["psnr_vs_shared"])
    # Without a defense the shared image is the clean one.
    assert result["no defense"]["psnr_vs_shared"] == result["no defense"]["psnr_vs_clean"]
    assert len(result["policy 3"]["ssim_vs_shared"]) == 2 and result["measures_the_defense"] == "vs_shared"
    assert (tmp_path / "reconstructions.png").stat().st_size > 0


def test_bench_times_each_variant_with_ratios(tmp_path, capsys):
    assert (
        main(
            [
                "bench",
                "--channels",
                "1",
                "--image-size",
                "8",
                "--width",
                "4",
                "--batch",
                "4",
                "--k",
                "1",
                "2",
                "--variants",
                "non-private",
                "privfast-auto",
                "opacus",
                "--rounds",
                "1",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["k"], r["variant"]) for r in rows] == [
        (k, v) for k in (1, 2) for v in ("non-private", "privfast-auto", "opacus")
    ]
    for row in rows:
        assert row["min_s"] > 0 and row["examples_per_s"] == pytest.approx(4 / row["min_s"])
        assert row["vs_nonprivate"] == pytest.approx(row["min_s"] / rows[3 * (row["k"] - 1)]["min_s"])
    assert "Opacus / this" in capsys.readouterr().out


@pytest.mark.parametrize(
    "option, header, row",
    [
        ("--phases", "| phase | non-private ms | privfast-ghost ms | extra ms |", "| noise |"),
        ("--ops", "| operator | non-private ms | privfast-ghost ms | extra ms |", "| (outside any op) |"),
    ],
)
def test_bench_phases_and_ops_print_a_breakdown_per_k(monkeypatch, capsys, option, header, row):
    from privfast import throughput
    from privfast.models import ConvNet

    def images(k, g):
        return torch.rand(2 * k, 1, 8, 8, generator=g), torch.randint(0, 3, (2 * k,), generator=g)

    tiny = throughput.Family(lambda: ConvNet(in_channels=1, num_classes=3, width=4, image_size=8), images, (1,), "t")
    monkeypatch.setitem(throughput.FAMILIES, "cnn", tiny)
    assert main(["bench", "--family", "cnn", option, "ghost", "--k", "1", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count(header) == 2
    assert "K = 1:" in out and "K = 2:" in out and out.count(row) == 2
    with pytest.raises(SystemExit, match=f"{option} needs --family"):
        main(["bench", option, "auto"])


def test_audit_writes_beside_the_checkpoint_and_report_includes_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--method", "nonprivate", "--epochs", "1", "--no-progress", *TINY]) == 0
    assert (
        main(
            [
                "audit",
                str(run / "checkpoint.pt"),
                "--attacks",
                "yeom",
                "calibrated",
                "calibrated_per_class",
                "--examples",
                "48",
                "--known",
                "16",
                "--shadows",
                "0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # Both advantages, named apart and explained; the threshold attacks' shared score is said.
    assert "decision advantage" in out and "best-threshold advantage" in out and "after seeing every score" in out
    assert "yeom, calibrated, calibrated_per_class score every example alike" in out
    assert (run / "audit.json").exists() and (run / "roc.png").exists()  # beside the checkpoint: no --out
    assert main(["report", str(run / "checkpoint.pt"), "--out", str(tmp_path / "report")]) == 0
    assert "run: audits included (membership)" in capsys.readouterr().out
    text = (tmp_path / "report" / "report.md").read_text()
    assert "### run: membership attacks" in text and "| calibrated_per_class |" in text


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_train_never_replaces_a_run_by_accident(tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["train", "--out", str(run), "--method", "nonprivate", "--epochs", "1", "--no-progress", *TINY]
    assert main(flags) == 0
    capsys.readouterr()
    assert main([*flags, "--lr", "0.2"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"privfast train: error: {run} already holds a run (nonprivate, 1 of 1 epochs): --resume continues "
        "it, --overwrite replaces it\n"
    )
    assert main([*flags, "--lr", "0.2", "--overwrite"]) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=False)["config"]["lr"] == 0.2
    with pytest.raises(SystemExit):
        main([*flags, "--resume", "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_second_writer_is_refused_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / "checkpoint.pt.lock"
    lock.write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live process holds the run
    assert main(["train", "--out", str(run), "--no-progress", *TINY]) == 2
    assert capsys.readouterr().err == (
        f"privfast train: error: {run} is in use: process {os.getppid()} is training "
        f"into it (lock file {lock}; delete it if that process is gone)\n"
    )
    assert not (run / "checkpoint.pt").exists()


def test_resume_takes_changes_and_names_the_flags_it_refuses(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert (
        main(
            [
                "train",
                "--out",
                run,
                "--method",
                "dp-sgd",
                "--target-epsilon",
                "4",
                "--epochs",
                "1",
                "--no-progress",
                *TINY,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["train", "--out", run, "--resume", "--lr", "0.01"]) == 2
    assert capsys.readouterr().err == (
        "privfast train: error: cannot change --lr 0.1 -> 0.01 on resume: only --epochs "
        "and --data-root may change. For a new run give another --out directory (or "
        "--overwrite this one)\n"
    )
    # More epochs at the same target need other noise: the message says what to do, and that works.
    assert main(["train", "--out", run, "--resume", "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--target-epsilon 4 chose for --epochs 1; --epochs 2 at --target-epsilon 4 needs" in err
    go_on = re.search(r"resume with (--target-epsilon none --noise-multiplier \S+)\n", err).group(1).split()
    assert main(["train", "--out", run, "--resume", "--epochs", "2", *go_on, "--no-progress"]) == 0
    checkpoint = torch.load(Path(run) / "checkpoint.pt", weights_only=False)
    assert [r["epoch"] for r in checkpoint["history"]] == [1, 2] and checkpoint["config"]["target_epsilon"] is None
    assert checkpoint["history"][1]["noise_multiplier"] == checkpoint["history"][0]["noise_multiplier"]


def test_ctrl_c_saves_and_prints_the_command_that_goes_on(tmp_path, capsys, monkeypatch):
    flags = ["--method", "dp-mix", "--k-base", "2", "--k-self", "1", "--epochs", "2", "--no-progress", *TINY]
    assert main(["train", "--out", str(tmp_path / "whole"), *flags]) == 0
    original, calls = Trainer._step, itertools.count(1)

    def step(self, x, y):  # Ctrl-C as the 6th step begins: step 2 of epoch 2 (4 steps an epoch)
        if next(calls) == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, x, y)

    monkeypatch.setattr(Trainer, "_step", step)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--out", str(run), *flags]) == 130
    out, err = capsys.readouterr()
    assert f"training stopped after step 2 of 4 of epoch 2; saved in {run / 'checkpoint.pt'}" in out
    assert out.splitlines()[-1] == f"continue with: privfast train --out {run} --resume"
    assert "Traceback" not in err and not (run / "checkpoint.pt.lock").exists()
    monkeypatch.setattr(Trainer, "_step", original)
    assert main(out.splitlines()[-1].split()[3:] + ["--no-progress"]) == 0  # after "continue with: privfast"
    whole, resumed = (torch.load(path / "checkpoint.pt", weights_only=False) for path in (tmp_path / "whole", run))
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    assert [r["epsilon"] for r in whole["history"]] == [r["epsilon"] for r in resumed["history"]]


def test_ctrl_c_in_a_real_run_and_a_second_writer_meanwhile(tmp_path, capsys):
    run = tmp_path / "run"
    # With progress bars and a target epsilon, into a pipe: the log a redirected run leaves.
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "privfast.cli",
            "train",
            "--out",
            str(run),
            "--method",
            "dp-sgd",
            "--target-epsilon",
            "8",
            "--epochs",
            "200",
            *TINY,
        ],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run / "checkpoint.pt").exists(), process.communicate(timeout=5)
        assert main(["train", "--out", str(run), "--no-progress", *TINY]) == 2
        assert f"{run} is in use: process {process.pid} is training into it" in capsys.readouterr().err
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "Optimal order" not in err and "\x1b[A" not in err
    assert re.search(r"\d+(\.\d+)?(epoch/s|s/epoch)", err)  # the bar over epochs says its unit
    assert out.splitlines()[-1] == f"continue with: privfast train --out {run} --resume"
    assert not (run / "checkpoint.pt.lock").exists()


def test_unreadable_checkpoints_are_one_line_errors(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"\x80\x02 not a checkpoint")
    for argv in (
        ["audit", str(run), "--shadows", "0"],
        ["audit", str(run / "checkpoint.pt"), "--shadows", "0"],
        ["report", str(run), "--out", str(tmp_path / "report")],
        ["invert", "--checkpoint", str(run), "--no-progress"],
        ["train", "--out", str(run), "--resume"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert (
            err.startswith(f"privfast {argv[0]}: error: {run / 'checkpoint.pt'} cannot be read: truncated or corrupted")
            and err.count("\n") == 1
        ), err
    assert main(["train", "--out", str(run)]) == 2
    assert (
        "already holds a run (an unreadable checkpoint.pt): --resume continues it, --overwrite replaces it"
        in capsys.readouterr().err
    )


def test_the_renamed_augmult_flag_says_its_new_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--method", "dp-mix", "--augmult", "8", "--k-self", "8"])
    assert "--augmult is now --k-base (K_base; K = k_base + k_self + k_diff)" in capsys.readouterr().err


def test_the_shadow_model_bar_says_its_unit(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--method", "nonprivate", "--epochs", "1", "--no-progress", *TINY]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "audit",
                str(run),
                "--attacks",
                "yeom",
                "--examples",
                "48",
                "--known",
                "16",
                "--shadows",
                "4",
                "--shadow-epochs",
                "2",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert re.search(r"4 shadow models.*(epoch/s|s/epoch)", err) and "\x1b[A" not in err


def test_train_under_torchrun_locks_once_and_resumes_with_its_saved_flags(tmp_path):
    # Two ranks on one machine: rank 0 holds the run's lock for both (the other rank must not be refused).
    run = tmp_path / "run"
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "privfast.cli",
        "train",
        "--out",
        str(run),
        "--no-progress",
    ]
    for flags in (["--method", "dp-sgd", "--epochs", "1", *TINY], ["--resume", "--epochs", "2"]):
        done = subprocess.run(
            [*torchrun, *flags],
            cwd=REPO,
            env={**env, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and [r["epoch"] for r in checkpoint["history"]] == [1, 2]
    assert not (run / "checkpoint.pt.lock").exists()


def test_help_without_a_command_loads_neither_torch_nor_the_library():
    # `privfast --help` answers from privfast.cli alone (the issue: 4 s to start before).
    import subprocess
    import sys

    code = (
        "import sys; from privfast.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "loaded = [m for m in ('torch', 'privfast.commands', 'scipy', 'opacus') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "secret-sharer" in done.stdout and "--threads" in done.stdout


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and "COMMAND" in capsys.readouterr().err
