"""tools/gpu_check.py, the one command for a lent GPU machine, run here on CPU at tiny sizes.

GPU minutes are too few to debug a script in, so every stage's logic (apart from the install and
compute-sanitizer stages, which need the machine) runs here through the same code paths, each in
its own subprocess as on the GPU, and the outputs a GPU run is read by are checked.
"""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    return proc, out


def test_quick_cpu_run_passes_every_stage_and_prints_the_summary_last(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    stages = results["stages"]
    assert list(stages) == ["install", "tests", "noise", "bandwidth", "training", "attacks", "sanitizer"]
    assert stages["install"]["status"] == stages["sanitizer"]["status"] == "skipped"
    for name in ("tests", "noise", "bandwidth", "training", "attacks"):
        assert stages[name]["status"] == "ok", (name, stages[name])
        assert (out / f"{name}.log").stat().st_size > 0
    # At most eight files come back from the GPU machine: the stage logs and results.json.
    assert len(list(out.iterdir())) <= 8
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1].startswith("| sanitizer | skipped |"), lines[-12:]
    assert "| stage | status | seconds | limit_s | summary |" in proc.stdout
    assert results["meta"]["torch"] and results["ok"] is True


def test_quick_run_measures_what_the_gpu_run_reports(quick_run):
    _, out = quick_run
    stages = json.loads((out / "results.json").read_text())["stages"]
    # tests: the junit xml is read; the CUDA-only test is counted as a CUDA skip (a failure on a GPU).
    assert stages["tests"]["info"]["passed"] == 1 and stages["tests"]["info"]["cuda_skipped"] == 1
    noise = stages["noise"]["tables"]["noise"]
    assert all(r["ok"] for r in noise) and any(r["check"] == "noise bits" for r in noise)
    ops = {r["op"] for r in stages["bandwidth"]["tables"]["bandwidth"]}
    assert {"d2d copy", "clip_accumulate_noise", "per_sample_norms"} <= ops
    training = stages["training"]["tables"]["training"]
    measured = {r["variant"] for r in training if r.get("median_ms")}
    assert {
        "non-private",
        "privfast-auto",
        "privfast-materialize",
        "privfast-bk",
        "privfast-ghost",
        "opacus",
    } <= measured
    assert {r["variant"] for r in training} == set(stages["training"]["info"]["variants"])
    assert {r["K"] for r in training} == {2}
    tasks = [r["task"] for r in stages["attacks"]["tables"]["attacks"]]
    assert [t.split()[0] for t in tasks] == ["S_pri", "LiRA", "reconstruction"]


def test_a_stage_past_its_limit_is_stopped_and_reported_with_what_it_saved(tmp_path, monkeypatch):
    gpu_check = _module()
    args = argparse.Namespace(device="cpu", wheels=str(tmp_path), arch="9.0", quick=True)
    monkeypatch.setattr(
        gpu_check,
        "_child_command",
        lambda *a: [
            sys.executable,
            "-c",
            "import json, sys, time; json.dump({'status': 'ok', 'summary': 'half done', 'info': {}, 'tables': "
            f"{{'t': [{{'a': 1}}]}}}}, open({str(tmp_path / 'slow.json')!r}, 'w')); "
            "print('started', flush=True); time.sleep(60)",
        ],
    )
    data = gpu_check._run_stage(args, "slow", 3, None, str(tmp_path), str(tmp_path / "slow.log"))
    assert data["status"] == "timeout" and data["seconds"] < 30
    assert data["tables"] == {"t": [{"a": 1}]} and "half done" in data["summary"]
    assert "started" in (tmp_path / "slow.log").read_text()


def test_junit_cases_reads_outcomes_and_skip_reasons(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase classname="tests.test_ops" name="test_a[cuda]">'
        '<skipped message="needs a CUDA device"/></testcase><testcase classname="t" name="test_b">'
        '<failure message="boom"/></testcase><testcase classname="t" name="test_c"/></testsuite></testsuites>'
    )
    cases = _module()._junit_cases(str(junit))
    assert [c["outcome"] for c in cases] == ["skipped", "failure", "passed"]
    assert cases[0]["message"] == "needs a CUDA device" and cases[0]["name"] == "tests.test_ops::test_a[cuda]"
