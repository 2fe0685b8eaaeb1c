"""The one command to run on a lent GPU machine: build, test, sanitize and measure privfast there.

    make wheels                                # where pip works: opacus's wheel into .whl/ (git-ignored)
    python tools/gpu_check.py --out DIR        # on the GPU machine, in a copy of the repository that
                                               # includes .whl/ (or: make gpu-check OUT=DIR)
    python tools/gpu_check.py --device cpu --quick --out DIR   # the same logic on CPU at tiny sizes

Stages, in this order, each in its own subprocess with its own time limit (a hang in one cannot
eat the others' time), all inside one budget (``--budget``, default 470 s, for an 8-minute slot):

    install    the carried wheels (pip --no-deps --no-index), then privfast with CUDA for sm_90 on
               every core (PRIVFAST_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=ncpu,
               pip install --no-build-isolation -e .)
    tests      the whole suite (pytest tests -q -m "", junit xml; 8 xdist workers where installed);
               fails if any CUDA test skipped
    noise      CPU vs CUDA through ops.clip_accumulate_noise: the same noise bits for the same
               key, clipped sums equal to float tolerance
    bandwidth  the fused ops' GB/s against a device-to-device copy timed in the same run
    training   one DP-Mix step of WRN-16-4 (32x32, GroupNorm, B = 64) at K = 1, 4, 16: every variant
               of privfast.throughput (non-private, privfast in each grad_sample mode, Opacus on the
               batch expanded K-fold, ...): CUDA-event median time, torch.cuda.max_memory_allocated
    attacks    S_pri batched vs one at a time (ResNet20, 100 images x 21 points); LiRA's 16 shadows
               trained together vs one model; reconstruction of 32 images at once vs one at a time
    sanitizer  compute-sanitizer memcheck and racecheck over tests/test_ops.py's CUDA cases (last:
               it gets what the budget has left, up to 120 s)

Under ``--out`` (default ``$OUT``, else build/gpu-check) it leaves at most eight files, whatever
happens: one log per stage run (``<stage>.log``) and ``results.json``; the Markdown tables are printed last (the
summary table the very last). A stage's numbers are saved as they are measured, so one stopped at
its limit still reports what it had. ``--device cpu --quick`` skips install and sanitizer and runs
everything else at tiny sizes (tests/test_gpu_check.py runs it, so the logic cannot rot unseen).
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
# The sanitizer runs last: its speed is the least predictable (every kernel is instrumented), so it
# takes what the budget has left (up to its cap) instead of squeezing the measurements.
STAGES = ("install", "tests", "noise", "bandwidth", "training", "attacks", "sanitizer")
# (cap, floor) seconds: a stage never gets more than its cap, and the stages after it keep their floors.
LIMITS = {
    "install": (240, 120),
    "tests": (150, 60),
    "noise": (45, 15),
    "bandwidth": (45, 15),
    "training": (120, 45),
    "attacks": (120, 45),
    "sanitizer": (120, 30),
}
DEVICE_ONLY = ("install", "sanitizer")  # skipped by --quick and on --device cpu
ARCH = "9.0"


# ----------------------------------------------------------------------------------------
# Helpers shared by the stages
# ----------------------------------------------------------------------------------------


class Recorder:
    """A stage's result, written to its JSON file after every change so a killed stage leaves what it had."""

    def __init__(self, path: str):
        self.path = path
        self.data = {"status": "ok", "summary": "", "info": {}, "tables": {}}
        self.save()

    def info(self, **values) -> None:
        self.data["info"].update(values)
        print(f"info: {json.dumps(values, default=str)}", flush=True)
        self.save()

    def row(self, table: str, **values) -> None:
        self.data["tables"].setdefault(table, []).append(values)
        print(f"{table}: {json.dumps(values, default=str)}", flush=True)
        self.save()

    def fail(self, why: str) -> None:
        self.data["status"] = "fail"
        self.data.setdefault("failures", []).append(why)
        print(f"FAIL: {why}", flush=True)
        self.save()

    def summary(self, text: str) -> None:
        self.data["summary"] = text
        print(f"summary: {text}", flush=True)
        self.save()

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], device: str, *, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones: CUDA events on a GPU, else perf_counter."""
    import torch

    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return times


def wall(fn: Callable[[], object], device: str) -> tuple[float, object]:
    """(seconds, result) of one call, the device drained before and after."""
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _import_bench(name: str):
    """A module of benchmarks/ (their helpers: make_grads, the reference-code S_pri loop)."""
    path = str(REPO / "benchmarks")
    if path not in sys.path:
        sys.path.insert(0, path)
    return __import__(name)


def _cuda_kernel(op: str) -> bool:
    import torch

    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"privfast::{op}", "CUDA"))


def _md(rows: list[dict]) -> str:
    if not rows:
        return ""
    headers = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(r.get(h)) for h in headers) + " |" for r in rows]
    return "\n".join(lines)


def _run(cmd: list[str], *, timeout: float, env: Optional[dict] = None, cwd: Path = REPO) -> tuple[int, str]:
    """Run ``cmd`` in its own process group, echoing its output; (exit code, output). 124 on timeout."""
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        errors="replace",
    )
    chunks: list[str] = []
    import threading

    def pump():
        for line in proc.stdout:
            chunks.append(line)
            sys.stdout.write(line)
        sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        code = 124
        chunks.append(f"\n[gpu_check: stopped after {timeout:.0f} s]\n")
    reader.join(timeout=10)
    return code, "".join(chunks)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


# ----------------------------------------------------------------------------------------
# Stages (each runs in a child process: python tools/gpu_check.py --stage NAME ...)
# ----------------------------------------------------------------------------------------


def stage_meta(args, rec: Recorder) -> None:
    """Versions, the GPU, the toolkit; privfast itself is not imported here (each stage records its state)."""
    from importlib import metadata

    import torch

    sys.path.insert(0, str(REPO / "tools"))
    import torch_build

    info = dict(
        python=sys.version.split()[0],
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        cpus=os.cpu_count(),
    )
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sms=props.multi_processor_count,
        )
    home, how = torch_build.find_cuda_toolkit()
    info.update(
        cuda_toolkit=home,
        cuda_toolkit_found=how,
        nvcc=torch_build.nvcc_release(home) if home else None,
        compute_sanitizer=_find_sanitizer(),
    )
    for package in ("opacus", "pytest-xdist", "pytest-timeout"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    rec.info(**info)


def stage_install(args, rec: Recorder) -> None:
    deadline = time.monotonic() + args.limit - 5
    python = sys.executable
    wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl")))
    rec.info(wheels=[os.path.basename(w) for w in wheels])
    env = dict(os.environ)
    if wheels:
        cmd = [python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir", "--no-compile", *wheels]
        code, _ = _run(cmd, timeout=min(120, deadline - time.monotonic()))
        if code:  # a read-only environment: install beside it and hand the folder to the later stages
            site = os.path.join(tempfile.gettempdir(), "privfast-gpu-check-site")
            code, _ = _run(
                cmd[:4] + ["--target", site, "--upgrade"] + cmd[4:], timeout=min(120, deadline - time.monotonic())
            )
            if code == 0:
                rec.info(pythonpath=site)
                env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
        if code:
            rec.fail(f"pip could not install the carried wheels (exit {code})")
    probe = "import opacus; print(opacus.__version__)"
    result = subprocess.run([python, "-c", probe], env=env, capture_output=True, text=True)
    rec.info(opacus=result.stdout.strip() or None)
    if result.returncode:
        rec.fail(f"opacus does not import (carry its wheel: `make wheels` where pip works, into {args.wheels}/)")

    build_env = dict(env, MAX_JOBS=str(os.cpu_count() or 1), PRIVFAST_FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=args.arch)
    build_env.pop("PRIVFAST_CPU_ONLY", None)
    start = time.monotonic()
    code, output = _run(
        [python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."],
        timeout=deadline - time.monotonic() - 15,
        env=build_env,
    )
    summary = next((line.strip() for line in output.splitlines() if "privfast build:" in line), "no summary line")
    rec.info(build_seconds=round(time.monotonic() - start, 1), build_exit=code, build_summary=summary)
    if code:
        rec.fail(f"pip install -e . failed (exit {code}); see install.log")
    check = (
        "import privfast, torch; print(privfast.has_extension(), "
        "bool(torch._C._dispatch_has_kernel_for_dispatch_key('privfast::clip_accumulate_noise', 'CUDA')))"
    )
    result = subprocess.run([python, "-c", check], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    print(result.stdout + result.stderr)
    loaded = result.stdout.split()[-2:] == ["True", "True"]
    rec.info(extension_with_cuda_kernels=loaded)
    if not loaded:
        rec.fail("privfast._C does not load with CUDA kernels after the build")
    rec.summary(
        f"build {rec.data['info']['build_seconds']} s; opacus {rec.data['info']['opacus']}; "
        f"CUDA kernels {'loaded' if loaded else 'MISSING'}"
    )


def _junit_cases(path: str) -> list[dict]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = child.tag, child.get("message", "") or (child.text or "")
                break
        cases.append(dict(name=f"{case.get('classname')}::{case.get('name')}", outcome=outcome, message=message))
    return cases


def stage_tests(args, rec: Recorder) -> None:
    junit = os.path.join(args.work, "junit.xml")
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-m", "", f"--junitxml={junit}", "-p", "no:cacheprovider"]
    env = dict(os.environ)
    if args.quick:  # the junit parsing and the CUDA-skip rule, on a stand-in suite that needs no torch
        stand_in = os.path.join(args.work, "test_stand_in.py")
        with open(stand_in, "w") as f:
            f.write(
                "import pytest\n\ndef test_passes():\n    pass\n\n"
                "@pytest.mark.skip(reason='needs a CUDA device')\ndef test_kernel_on_cuda():\n    pass\n"
            )
        cmd[3:4] = [stand_in, "--rootdir", args.work]
    elif importlib.util.find_spec("xdist") is not None and (os.cpu_count() or 1) >= 8:
        workers = min(8, (os.cpu_count() or 8) // 2)
        cmd += ["-n", str(workers)]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // workers))
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "60"]  # one hung test fails alone instead of stopping the stage
    rec.info(command=" ".join(cmd))
    code, output = _run(cmd, timeout=args.limit - 10, env=env)
    tail = [line for line in output.splitlines() if line.strip()][-1:] or [""]
    rec.info(pytest_exit=code, pytest_last_line=tail[0])
    if not os.path.exists(junit):
        rec.fail(f"pytest wrote no junit xml (exit {code})")
        return
    cases = _junit_cases(junit)
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failure", "error", "skipped")}
    cuda_skipped = [
        c
        for c in cases
        if c["outcome"] == "skipped" and ("cuda" in c["name"].lower() or "cuda" in c["message"].lower())
    ]
    rec.info(**counts, cuda_skipped=len(cuda_skipped))
    for c in [c for c in cases if c["outcome"] in ("failure", "error")][:20]:
        rec.row("tests_failed", test=c["name"], outcome=c["outcome"], message=c["message"][:200])
    for c in cuda_skipped[:20]:
        rec.row("tests_cuda_skipped", test=c["name"], reason=c["message"][:200])
    if code == 124:
        rec.fail("pytest did not finish in its time")
    if counts["failure"] or counts["error"]:
        rec.fail(f"{counts['failure']} failed, {counts['error']} errors")
    elif code not in (0, 124):
        rec.fail(f"pytest exited {code}")
    if cuda_skipped and args.device == "cuda":
        rec.fail(f"{len(cuda_skipped)} CUDA tests skipped with a GPU present")
    unbuilt = [c for c in cases if c["outcome"] == "skipped" and "not built" in c["message"]]
    if unbuilt and args.device == "cuda":
        rec.fail(f"{len(unbuilt)} tests skipped because privfast._C is not built")
    rec.summary(
        f"{counts['passed']} passed, {counts['failure']} failed, {counts['error']} errors, "
        f"{counts['skipped']} skipped ({len(cuda_skipped)} CUDA)"
    )


def _find_sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*")), "/opt/nvidia"]
    for home in filter(None, homes):
        for pattern in (
            "bin/compute-sanitizer",
            "compute-sanitizer/compute-sanitizer",
            "*/compute-sanitizer",
            "*/*/compute-sanitizer",
        ):
            hits = sorted(glob.glob(os.path.join(home, pattern)))
            if hits:
                return hits[0]
    return None


# memcheck: every CUDA case of the op tests but the two slow ones (opcheck's many calls, a million
# draws' statistics); racecheck (shared-memory hazards, slower): one case per kernel and dtype.
SANITIZED = {
    "memcheck": "cuda and not opcheck and not statistics",
    "racecheck": "cuda and ((matches_reference and 7-contiguous) or (augment_batch_matches_reference and 2-7))",
}


def stage_sanitizer(args, rec: Recorder) -> None:
    tool_path = _find_sanitizer()
    rec.info(compute_sanitizer=tool_path)
    if tool_path is None:
        rec.fail("compute-sanitizer not found (PATH, $CUDA_HOME, /usr/local/cuda*)")
        return
    start = time.monotonic()
    for i, (tool, select) in enumerate(SANITIZED.items()):
        left = args.limit - 5 - (time.monotonic() - start)
        budget = left * 0.6 if i == 0 else left
        env = dict(os.environ, CUDA_MODULE_LOADING="LAZY")
        if tool == "memcheck":
            env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # so an overrun of a tensor is not inside a cached block
        cmd = [tool_path, "--tool", tool, "--error-exitcode", "97", "--print-limit", "20"]
        cmd += ["--leak-check", "no"] if tool == "memcheck" else []
        cmd += [sys.executable, "-m", "pytest", "tests/test_ops.py", "-q", "-p", "no:cacheprovider", "-k", select]
        t0 = time.monotonic()
        code, output = _run(cmd, timeout=budget, env=env)
        errors = next(
            (line.split("ERROR SUMMARY:")[1].strip() for line in output.splitlines() if "ERROR SUMMARY:" in line), None
        )
        pytest_line = next(
            (
                line.strip()
                for line in reversed(output.splitlines())
                if " passed" in line or " failed" in line or " error" in line
            ),
            "",
        )
        unsupported = "Device not supported" in output or "Unable to find injection library" in output
        rec.row(
            "sanitizer",
            tool=tool,
            tests=select,
            exit=code,
            errors=errors,
            pytest=pytest_line,
            seconds=round(time.monotonic() - t0, 1),
        )
        if unsupported:
            rec.fail(f"{tool}: compute-sanitizer cannot run on this machine (see sanitizer.log)")
        elif code == 124:
            rec.fail(f"{tool} did not finish in {budget:.0f} s")
        elif code or errors is None or not errors.startswith("0 error"):
            rec.fail(f"{tool}: exit {code}, {errors}")
    rows = rec.data["tables"].get("sanitizer", [])
    rec.summary("; ".join(f"{r['tool']}: {r['errors']} ({r['pytest']})" for r in rows))


def stage_noise(args, rec: Recorder) -> None:
    """CPU vs ``--device`` through ops.clip_accumulate_noise, keyed by equal CPU generators.

    On ``--device cpu`` the other side is the pure-torch reference with the same key.
    """
    import torch

    from privfast import _reference, _torch_ops, ops

    device = args.device
    rec.info(privfast_extension=ops.has_extension(), cuda_kernels=_cuda_kernel("clip_accumulate_noise"))
    if device == "cuda" and not _cuda_kernel("clip_accumulate_noise"):
        rec.fail(
            "privfast has no CUDA kernel for clip_accumulate_noise: the comparison would be the reference with itself"
        )

    def other(grads, max_grad_norm, noise_std, scale, seed):
        if device != "cpu":
            return [
                o.cpu()
                for o in ops.clip_accumulate_noise(
                    [g.to(device) for g in grads], max_grad_norm, noise_std, scale, torch.Generator().manual_seed(seed)
                )
            ]
        numel = sum(g.shape[1:].numel() for g in grads)
        key = ops._noise_key(torch.Generator().manual_seed(seed), _torch_ops.philox_counters(numel), False)
        return _reference.clip_accumulate_noise(grads, max_grad_norm, noise_std, scale, *key)

    sizes = [7, 1000, 2001] if args.quick else [7, 1000, 2001, 1_000_003]
    shapes = [(3, 5), (7,), (2, 3, 4), (40000,)] if args.quick else [(3, 5), (7,), (2, 3, 4), (40000,), (256, 1024)]
    batch = 9 if args.quick else 64
    for dtype, tol in ((torch.float64, (1e-10, 1e-12)), (torch.float32, (1e-5, 1e-6))):
        for seed in (0, 1, 2**40 + 3):
            zeros = [torch.zeros(0, n, dtype=dtype) for n in sizes]
            cpu = ops.clip_accumulate_noise(zeros, 1.0, 1.0, 1.0, torch.Generator().manual_seed(seed))
            dev = other(zeros, 1.0, 1.0, 1.0, seed)
            bits = sum(int((a != b).sum()) for a, b in zip(cpu, dev))
            rec.row(
                "noise",
                check="noise bits",
                dtype=str(dtype).split(".")[1],
                seed=seed,
                elements=sum(sizes),
                mismatches=bits,
                ok=bits == 0,
            )
            if bits:
                rec.fail(f"{bits} noise values differ between cpu and {device} ({dtype}, seed {seed})")
        gen = torch.Generator().manual_seed(1)
        grads = [torch.randn(batch, *s, generator=gen, dtype=dtype) for s in shapes]
        for noise_std in (0.0, 1.0):
            cpu = ops.clip_accumulate_noise(grads, 1.0, noise_std, 0.5, torch.Generator().manual_seed(5))
            dev = other(grads, 1.0, noise_std, 0.5, 5)
            diff = max(float((a - b).abs().max()) for a, b in zip(cpu, dev))
            ok = all(torch.allclose(a, b, rtol=tol[0], atol=tol[1]) for a, b in zip(cpu, dev))
            rec.row(
                "noise",
                check=f"clipped sums, noise_std={noise_std}",
                dtype=str(dtype).split(".")[1],
                seed=5,
                elements=sum(g.numel() for g in grads),
                max_abs_diff=diff,
                ok=ok,
            )
            if not ok:
                rec.fail(
                    f"clipped sums differ beyond rtol={tol[0]}, atol={tol[1]} ({dtype}, noise_std={noise_std}): {diff}"
                )
    rows = rec.data["tables"]["noise"]
    rec.summary(
        f"{sum(r['ok'] for r in rows)}/{len(rows)} checks equal (cpu vs {device if device != 'cpu' else 'reference'})"
    )


def stage_bandwidth(args, rec: Recorder) -> None:
    import torch

    from privfast import ops

    bench_ops = _import_bench("bench_ops")
    device, quick = args.device, args.quick
    rec.info(privfast_extension=ops.has_extension(), cuda_kernels=_cuda_kernel("clip_accumulate_noise"))
    if device == "cuda" and not _cuda_kernel("clip_accumulate_noise"):
        rec.fail("privfast has no CUDA kernels: these would be the pure-torch reference's numbers")
    warmup, repeats = (1, 3) if quick else (3, 20)
    # (label, B, total float32 elements): the B=256 x 1M per example (1 GiB, far past the L2),
    # and bench_ops's largest case (8M in all) for comparison with benchmarks/RESULTS.md.
    cases = (
        [("B=8 x 4K", 8, 8 << 12)]
        if quick
        else [("B=256 x 1M (1 GiB)", 256, 256 << 20), ("B=256, 8M total", 256, 8 << 20)]
    )
    for label, batch, total in cases:
        grads = bench_ops.make_grads(batch, total, device)
        numel = sum(g.numel() for g in grads)
        nbytes = 4 * numel
        gen = torch.Generator(device=device).manual_seed(0)
        src = torch.empty(numel, device=device)
        dst = torch.empty_like(src)
        runs = {  # name -> (call, bytes it must move)
            "d2d copy": (lambda: dst.copy_(src), 2 * nbytes),
            "clip_accumulate_noise": (
                lambda: ops.clip_accumulate_noise(grads, 1.0, 1.0, 1 / batch, gen, check_finite=False),
                2 * nbytes,
            ),
            "clip_accumulate_noise (check_finite)": (
                lambda: ops.clip_accumulate_noise(grads, 1.0, 1.0, 1 / batch, gen),
                2 * nbytes,
            ),
            "per_sample_norms": (lambda: ops.per_sample_norms(grads), nbytes),
            "eager (Opacus-style) clip+noise": (
                lambda: bench_ops.eager_clip_accumulate_noise(grads, 1.0, 1.0, 1 / batch, gen),
                2 * nbytes,
            ),
        }
        copy_gbps = None
        for name, (call, moved) in runs.items():
            t = statistics.median(time_calls(call, device, warmup=warmup, repeats=repeats))
            gbps = moved / t / 1e9
            copy_gbps = gbps if name == "d2d copy" else copy_gbps
            rec.row(
                "bandwidth",
                case=label,
                op=name,
                median_ms=1e3 * t,
                bytes_counted_MB=moved / 1e6,
                GBps=gbps,
                of_copy=gbps / copy_gbps,
            )
        grads = src = dst = runs = None  # frees them (the closures in runs hold them too)
        _free(device)
    first = [r for r in rec.data["tables"]["bandwidth"] if r["op"] == "clip_accumulate_noise"][0]
    rec.summary(f"clip_accumulate_noise {first['GBps']:.0f} GB/s = {first['of_copy']:.2f} of a copy ({first['case']})")


CORE_VARIANTS = ("non-private", "opacus")  # with privfast-*: a failure fails the stage (others are noted)


def _dpmix(k: int):
    from privfast.augment import DPMix

    k_base = max(1, k // 2)  # K = 1: one crop; else half crops, half mixups of them
    return DPMix(k_base, k - k_base, num_classes=10)


def stage_training(args, rec: Recorder) -> None:
    import torch

    from privfast.models import WideResNet
    from privfast.throughput import VARIANTS, training_step

    device, quick = args.device, args.quick
    depth, widen, side, batch = (10, 1, 8, 2) if quick else (16, 4, 32, 64)
    ks = (2,) if quick else (1, 4, 16)
    repeats = 2 if quick else 7
    rec.info(
        model=f"WRN-{depth}-{widen} GroupNorm",
        image=f"3x{side}x{side}",
        batch=batch,
        ks=ks,
        variants=VARIANTS,
        timing=f"CUDA events: median of up to {repeats} steps (about 3 s) after 2-3 untimed ones; peak memory of "
        "the second step",
        privfast_extension=__import__("privfast").has_extension(),
    )

    def make_model():
        torch.manual_seed(0)
        return WideResNet(depth=depth, widen=widen, num_classes=10, groups=16).to(device)

    for k in ks:
        gen = torch.Generator().manual_seed(k)
        x = torch.rand(batch, 3, side, side, generator=gen).to(device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        xk, _ = _dpmix(k)(x, y, generator=gen)  # [B*K] rows: the DP-Mix batch (crops, then mixups of them)
        yk = y.repeat_interleave(k)  # class labels (the soft mixup labels cost the same; the step takes classes)
        times = {}
        for variant in VARIANTS:
            try:
                step = training_step(variant, make_model(), xk, yk, augmult=k)
                step()  # lazy initialization, the allocator, first kernel calls
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                seconds, _ = wall(step, device)
                peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
                # At most about 3 s of timed steps per variant (Opacus at K = 16 takes seconds a step).
                t = time_calls(
                    step,
                    device,
                    warmup=1 if seconds < 0.5 else 0,
                    repeats=max(2, min(repeats, int(3.0 / max(seconds, 1e-6)))),
                )
                times[variant] = statistics.median(t)
                rec.row(
                    "training",
                    K=k,
                    variant=variant,
                    median_ms=1e3 * times[variant],
                    min_ms=1e3 * min(t),
                    peak_MB=peak,
                    x_nonprivate=times[variant] / times["non-private"] if "non-private" in times else None,
                )
            except Exception as error:  # an OOM or a failure in one variant must not hide the others
                rec.row(
                    "training",
                    K=k,
                    variant=variant,
                    median_ms=None,
                    peak_MB=None,
                    note=f"{type(error).__name__}: {error}"[:200],
                )
                if variant in CORE_VARIANTS or variant.startswith("privfast"):
                    rec.fail(f"K={k} {variant}: {type(error).__name__}: {str(error)[:200]}")
            finally:
                step = None
                _free(device)
        for row in rec.data["tables"]["training"]:
            if row["K"] == k and row.get("median_ms") and "opacus" in times:
                row["opacus_over_this"] = times["opacus"] / (row["median_ms"] / 1e3)
        rec.save()
    best = {r["K"]: r for r in rec.data["tables"]["training"] if r["variant"] == "privfast-auto" and r.get("median_ms")}
    rec.summary(
        "; ".join(
            f"K={k}: auto {r['median_ms']:.1f} ms, {r.get('x_nonprivate') or 0:.2f}x non-private, "
            f"Opacus/auto {r.get('opacus_over_this') or 0:.2f}"
            for k, r in best.items()
        )
    )


def stage_attacks(args, rec: Recorder) -> None:
    import torch

    from privfast.attacks import per_example_gradients, reconstruct, train_classifier, train_shadow_models
    from privfast.data import load_digits, synthetic_cifar
    from privfast.models import ConvNet, LeNet, ResNet20
    from privfast.search import privacy_score

    bench_ats = _import_bench("bench_ats")
    device, quick = args.device, args.quick
    # Full float32 convolutions, so that batched and one-at-a-time results agree to rounding (cuDNN's
    # default TF32 would make them differ by ~1e-3); these small models are launch-bound either way.
    torch.backends.cudnn.allow_tf32 = False

    # S_pri: ResNet20 on CIFAR-shaped images, N images x (bins + 1) points, batched vs the reference loop.
    images, bins, side, width = (2, 1, 8, 4) if quick else (100, 20, 32, 16)
    train, _ = synthetic_cifar(n_train=images, n_test=1, size=side)
    x, y = train.x.to(device), train.y.to(device)
    torch.manual_seed(0)
    model = ResNet20(width=width, groups=min(8, width)).to(device).eval()
    start = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)).to(device)
    privacy_score(model, x[:2], y[:2], start=start[:2], bins=bins)  # warm-up: CUDA, cuDNN, vmap
    t_batched, batched = wall(lambda: privacy_score(model, x, y, start=start, bins=bins), device)
    t_loop, looped = wall(lambda: bench_ats.loop_privacy_score(model, x, y, start, bins=bins), device)
    diff = float((batched - looped).abs().max())
    rec.row(
        "attacks",
        task=f"S_pri ResNet20, {images} images x {bins + 1} points",
        batched_s=t_batched,
        one_at_a_time_s=t_loop,
        speedup=t_loop / t_batched,
        max_abs_diff=diff,
    )
    if diff > 1e-2:
        rec.fail(f"S_pri batched and one at a time differ by {diff}")
    model = None
    _free(device)

    # LiRA: 16 shadows (half the digits each) trained together vs one model, the same recipe.
    digits, _ = load_digits()
    pool_x, pool_y = digits.x.to(device), digits.y.to(device)
    shadows, recipe = (
        (2, dict(epochs=1, lr=1e-3, batch_size=32)) if quick else (16, dict(epochs=10, lr=1e-3, batch_size=64))
    )
    if quick:
        pool_x, pool_y = pool_x[:64], pool_y[:64]
    make = lambda: ConvNet(in_channels=1, num_classes=10, width=16, image_size=8).to(device)  # noqa: E731
    half = torch.randperm(len(pool_y), generator=torch.Generator().manual_seed(0))[: len(pool_y) // 2].to(device)
    one = lambda: train_classifier(
        make(), pool_x[half], pool_y[half], generator=torch.Generator().manual_seed(1), **recipe
    )  # noqa: E731
    together = lambda: train_shadow_models(
        make,
        pool_x,
        pool_y,
        n_shadows=shadows,  # noqa: E731
        generator=torch.Generator().manual_seed(2),
        progress=False,
        **recipe,
    )
    one()  # warm-up
    t_one, _ = wall(one, device)
    t_together, _ = wall(together, device)
    rec.row(
        "attacks",
        task=f"LiRA {shadows} ConvNet shadows together vs 1 model ({recipe['epochs']} epochs)",
        batched_s=t_together,
        one_at_a_time_s=t_one,
        speedup=None,
        together_over_one=t_together / t_one,
    )
    _free(device)

    # Reconstruction: inverting-gradients (Adam + cosine) of T digits on LeNet, all at once vs one by one.
    targets, iterations = (2, 3) if quick else (32, 50)
    torch.manual_seed(0)
    lenet = LeNet().to(device).eval()
    tx, ty = pool_x[:targets], pool_y[:targets]
    grads = per_example_gradients(lenet, tx, ty)
    start = torch.randn(tx.shape, generator=torch.Generator().manual_seed(0)).to(device)
    attack = lambda g, labels, s: reconstruct(
        lenet,
        g,
        labels,
        shape=(1, 8, 8),
        config="adam_cosine",  # noqa: E731
        iterations=iterations,
        start=s,
        progress=False,
    )
    attack([g[:1] for g in grads], ty[:1], start[:1])  # warm-up
    t_all, together_result = wall(lambda: attack(grads, ty, start), device)
    t_each, each_images = wall(
        lambda: torch.cat(
            [attack([g[i : i + 1] for g in grads], ty[i : i + 1], start[i : i + 1]).images for i in range(targets)]
        ),
        device,
    )
    diff = float((together_result.images - each_images).abs().max())
    rec.row(
        "attacks",
        task=f"reconstruction LeNet, {targets} images x {iterations} iterations",
        batched_s=t_all,
        one_at_a_time_s=t_each,
        speedup=t_each / t_all,
        max_abs_diff=diff,
    )
    rows = rec.data["tables"]["attacks"]
    rec.summary(
        f"S_pri {rows[0]['speedup']:.1f}x; LiRA {shadows} together = {rows[1]['together_over_one']:.2f}x one; "
        f"reconstruction {rows[2]['speedup']:.1f}x"
    )


STAGE_FUNCTIONS = {
    "meta": stage_meta,
    "install": stage_install,
    "tests": stage_tests,
    "sanitizer": stage_sanitizer,
    "noise": stage_noise,
    "bandwidth": stage_bandwidth,
    "training": stage_training,
    "attacks": stage_attacks,
}


def run_child(args) -> int:
    """One stage, in this process; its result goes to ``args.result``."""
    sys.path.insert(0, str(REPO))  # this checkout's privfast (what the editable install points at)
    rec = Recorder(args.result)
    if args.device == "cpu" and args.stage != "tests":
        import torch

        # One thread: on a few shared cores, OpenMP threads spin-waiting for a descheduled peer make
        # tiny steps take a hundred times longer (the benchmarks do the same).
        torch.set_num_threads(1)
    try:
        STAGE_FUNCTIONS[args.stage](args, rec)
    except Exception as error:
        traceback.print_exc()
        rec.data["status"] = "error"
        rec.data.setdefault("failures", []).append(f"{type(error).__name__}: {error}"[:500])
        rec.save()
        return 1
    return 0 if rec.data["status"] == "ok" else 1


# ----------------------------------------------------------------------------------------
# The parent: runs the stages one after another, each in a child with its own limit
# ----------------------------------------------------------------------------------------


def _child_command(args, stage: str, result: str, limit: float, work: str) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--stage",
        stage,
        "--result",
        result,
        "--device",
        args.device,
        "--wheels",
        args.wheels,
        "--arch",
        args.arch,
        "--limit",
        f"{limit:.0f}",
        "--work",
        work,
    ]
    return cmd + (["--quick"] if args.quick else [])


def _start_stage(args, stage: str, limit: float, env: Optional[dict], work: str, log: Optional[str]) -> dict:
    result = os.path.join(work, f"{stage}.json")
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        _child_command(args, stage, result, limit, work),
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return dict(proc=proc, out=out, result=result, log=log, limit=limit, started=time.monotonic())


def _finish_stage(run: dict) -> dict:
    """Wait for a stage until its limit (killing its whole process group past it); its result."""
    proc, log, limit = run["proc"], run["log"], run["limit"]
    try:
        code = proc.wait(timeout=max(1.0, limit - (time.monotonic() - run["started"])))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        code = None
    finally:
        if log:
            run["out"].close()
    data = {"status": "error", "summary": "", "info": {}, "tables": {}}
    if os.path.exists(run["result"]):
        with open(run["result"]) as f:
            data.update(json.load(f))
    if code is None:
        data["status"] = "timeout"
        data["summary"] = f"stopped at its {limit:.0f} s limit; " + data.get("summary", "")
    elif code and data["status"] == "ok":
        data["status"] = "error"
    if data["status"] == "error" and not data.get("failures") and log:
        with open(log, errors="replace") as f:
            data["failures"] = [f.read()[-600:]]
    data.update(
        seconds=round(time.monotonic() - run["started"], 1), limit_s=round(limit), log=os.path.basename(log or "")
    )
    return data


def _run_stage(args, stage: str, limit: float, env: Optional[dict], work: str, log: Optional[str]) -> dict:
    return _finish_stage(_start_stage(args, stage, limit, env, work, log))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(REPO / "build" / "gpu-check"),
        help="folder for the logs and results.json (default $OUT, else build/gpu-check)",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes; skips install and sanitizer")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--budget", type=float, default=470, help="seconds for all stages together (default 470)")
    parser.add_argument("--wheels", default=str(REPO / ".whl"), help="folder of carried wheels (default .whl)")
    parser.add_argument("--arch", default=ARCH, help=f"TORCH_CUDA_ARCH_LIST of the build (default {ARCH})")
    parser.add_argument(
        "--cap",
        action="append",
        default=[],
        metavar="STAGE=SECONDS",
        help="change a stage's time cap, e.g. --cap install=900 on a slow machine (repeatable)",
    )
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, default=60, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=tempfile.gettempdir(), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.wheels = os.path.abspath(args.wheels)
    if args.stage:
        return run_child(args)

    deadline = time.monotonic() + args.budget
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="privfast-gpu-check-")
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(wanted) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    limits = dict(LIMITS)
    for item in args.cap:
        name, _, seconds = item.partition("=")
        if name not in limits or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--cap takes STAGE=SECONDS with a stage of {STAGES}, got {item!r}")
        limits[name] = (float(seconds), min(limits[name][1], float(seconds)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    results = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "device": args.device,
        "quick": args.quick,
        "budget_s": args.budget,
        "stages": {},
    }
    meta = None  # versions, GPU, toolkit: read beside the first stage after the install, in its own process

    def save():
        with open(out / "results.json", "w") as f:
            json.dump(results, f, indent=1, default=str)

    for i, stage in enumerate(STAGES):
        if stage not in wanted:
            continue
        if stage in DEVICE_ONLY and (args.quick or args.device == "cpu"):
            results["stages"][stage] = {"status": "skipped", "summary": "--quick / --device cpu", "seconds": 0}
            continue
        later = sum(
            limits[s][1]
            for s in STAGES[i + 1 :]
            if s in wanted and not (s in DEVICE_ONLY and (args.quick or args.device == "cpu"))
        )
        cap, floor = limits[stage]
        if args.quick and not any(item.startswith(stage + "=") for item in args.cap):
            cap = 120
        limit = min(cap, deadline - time.monotonic() - later)
        if limit < min(floor, 10):
            results["stages"][stage] = {
                "status": "skipped",
                "summary": f"no time left in the {args.budget:.0f} s budget",
                "seconds": 0,
            }
            save()
            continue
        print(f"== {stage} (limit {limit:.0f} s)", flush=True)
        if meta is None and stage != "install":
            meta = _start_stage(args, "meta", 90, env, work, None)
        data = _run_stage(args, stage, limit, env, work, str(out / f"{stage}.log"))
        results["stages"][stage] = data
        if data.get("info", {}).get("pythonpath"):  # wheels installed beside a read-only environment
            env["PYTHONPATH"] = data["info"]["pythonpath"] + os.pathsep + env.get("PYTHONPATH", "")
        print(f"   {data['status']} in {data['seconds']} s: {data.get('summary', '')}", flush=True)
        for why in data.get("failures", [])[:5]:
            print(f"   - {why.strip()[-300:]}", flush=True)
        save()

    results["meta"] = _finish_stage(meta or _start_stage(args, "meta", 90, env, work, None))["info"]
    print("meta: " + json.dumps(results["meta"]), flush=True)
    if args.device == "cuda" and not results["meta"].get("cuda_available"):
        print("WARNING: --device cuda but torch sees no CUDA device", flush=True)
    detail = []
    for stage, data in results["stages"].items():
        for name, rows in data.get("tables", {}).items():
            detail.append(f"### {name}\n\n{_md(rows)}\n")
    summary = _md(
        [
            {
                "stage": s,
                "status": d["status"],
                "seconds": d.get("seconds"),
                "limit_s": d.get("limit_s"),
                "summary": d.get("summary", ""),
            }
            for s, d in results["stages"].items()
        ]
    )
    results["markdown"] = "\n".join(detail) + "\n### summary\n\n" + summary + "\n"
    results["ok"] = all(d["status"] in ("ok", "skipped") for d in results["stages"].values())
    save()
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{'ALL OK' if results['ok'] else 'SOME STAGES FAILED'}; results: {out / 'results.json'}; logs: "
        f"{out}/<stage>.log\n"
    )
    print(results["markdown"], flush=True)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
