"""What privfast's build takes from its surroundings: the C++ standard and the CUDA toolkit.

Shared by setup.py (which imports it) and tools/check_cuda_glue.sh (which runs it), so that the
glue check compiles the way the real build does.

- The C++ standard is the torch's own: torch.utils.cpp_extension adds a ``-std=`` flag to both
  the host compiler's and nvcc's arguments when the extension passes none (C++20 in torch 2.13
  and 2.14, C++17 in older ones; torch 2.14's headers refuse anything older than C++20).
  privfast passes none, and :func:`cxx_standard` reads which one that will be, for the build's
  summary line and for the glue check.
- The CUDA toolkit: torch's guess is ``$CUDA_HOME``/``$CUDA_PATH``, else the folder above the
  folder of the first ``nvcc`` on PATH. That guess is wrong where ``nvcc`` is a link or a wrapper
  script outside the toolkit (e.g. ``/usr/local/bin/nvcc`` calling ``/usr/local/cuda-13.0/bin/nvcc``):
  it yields ``/usr/local``, where linking finds no ``libcudart``. :func:`find_cuda_toolkit` follows
  links, and asks a wrapper's ``nvcc`` where its toolkit is.

    python tools/torch_build.py std          # e.g. c++20 (of the torch that python imports)
    python tools/torch_build.py cuda-home    # e.g. /usr/local/cuda-13.0, or nothing
"""

from __future__ import annotations

import glob
import inspect
import os
import re
import shutil
import subprocess
import sys
from typing import Optional

# torch's own words for the flag it appends when none is given, e.g.
#     cpp_flag = cpp_flag_prefix + 'c++20'   (inside BuildExtension's append_std17_if_no_std_present)
_DEFAULT_STD = re.compile(r"cpp_flag_prefix\s*\+\s*['\"](c\+\+\d\d)['\"]")
# ATen.h: "#error C++20 or later compatible compiler is required to use ATen."
_REQUIRED_STD = re.compile(r"C\+\+(\d\d) or later compatible compiler is required")


def _std_number(std: str) -> int:
    return int(std.rsplit("+", 1)[1])


def header_standard(include_dirs) -> Optional[str]:
    """The oldest C++ standard the torch headers accept (``c++17``, ``c++20``), or None if unstated."""
    for folder in include_dirs:
        path = os.path.join(folder, "ATen", "ATen.h")
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                match = _REQUIRED_STD.search(f.read())
            if match:
                return f"c++{match.group(1)}"
    return None


def cxx_standard(cpp_extension=None) -> tuple[str, str, bool]:
    """``(standard, how it was found, must_pass)`` for the torch being built against.

    The standard is the ``-std=`` value torch's build adds when none is given, read from
    torch.utils.cpp_extension's source. ``must_pass`` is False then: the build passes no flag and
    torch adds it. Where torch's default cannot be read (a torch that words it otherwise) or is
    older than what its headers accept, the headers' standard (else c++17) is returned with
    ``must_pass`` True: the build passes it to both compilers itself.
    """
    if cpp_extension is None:
        from torch.utils import cpp_extension
    import torch

    required = header_standard(cpp_extension.include_paths())
    try:
        found = sorted(set(_DEFAULT_STD.findall(inspect.getsource(cpp_extension))))
    except (OSError, TypeError):
        found = []
    if len(found) == 1 and not (required and _std_number(required) > _std_number(found[0])):
        return found[0], f"torch {torch.__version__}'s default", False
    if required:
        return required, f"the oldest torch {torch.__version__}'s headers accept", True
    return "c++17", f"assumed: torch {torch.__version__} states no standard", True


def _has_cudart(home: str) -> bool:
    return any(
        glob.glob(os.path.join(home, sub, "libcudart.so*"))
        for sub in ("lib64", "lib", os.path.join("targets", "*", "lib"))
    )


def _nvcc_top(nvcc: str) -> Optional[str]:
    """The toolkit folder an ``nvcc`` (a wrapper script too) says it runs from: its ``TOP`` in a dry run."""
    try:
        result = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (result.stdout + result.stderr).splitlines():
        match = re.match(r"#\$ TOP=(.+)$", line.strip())
        if match:
            return os.path.realpath(match.group(1).strip())
    return None


def nvcc_release(home: str) -> Optional[str]:
    """``"13.0"`` from ``home/bin/nvcc --version``, or None."""
    try:
        result = subprocess.run(
            [os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", result.stdout)
    return match.group(1) if match else None


def find_cuda_toolkit() -> tuple[Optional[str], str]:
    """``(toolkit folder or None, how it was found)``.

    Order: ``$CUDA_HOME``, ``$CUDA_PATH`` (taken as given); the real path of ``nvcc`` on PATH,
    links followed; the folder that ``nvcc`` reports when it is a wrapper script; ``/usr/local/cuda``.
    A folder found on PATH counts only if it has ``bin/nvcc`` and a ``libcudart`` to link.
    """
    for name in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(name)
        if home:
            note = "" if _has_cudart(home) else " (no libcudart.so under it: linking will fail)"
            return home, f"${name}{note}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        link = f" -> {real}" if real != os.path.abspath(nvcc) else ""
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and _has_cudart(home):
            return home, f"nvcc on PATH ({nvcc}{link})"
        top = _nvcc_top(nvcc)
        if top and _has_cudart(top):
            return top, f"nvcc on PATH ({nvcc}, a wrapper of {os.path.join(top, 'bin', 'nvcc')})"
    if _has_cudart("/usr/local/cuda"):
        return os.path.realpath("/usr/local/cuda"), "/usr/local/cuda"
    return None, "no nvcc on PATH and no CUDA_HOME"


def main(argv: list[str]) -> int:
    if argv not in (["std"], ["cuda-home"], ["describe"]):
        print("usage: python tools/torch_build.py std | cuda-home | describe", file=sys.stderr)
        return 2
    home, found = find_cuda_toolkit()
    if home and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        os.environ["CUDA_HOME"] = home  # what setup.py does; spares a CUDA torch's warning about its own guess
    if argv == ["cuda-home"]:
        print(home or "")
        return 0
    std, how, _ = cxx_standard()
    if argv == ["std"]:
        print(std)
    else:
        print(
            f"C++ standard: {std} ({how})\nCUDA toolkit: {home} ({found}), nvcc {nvcc_release(home) if home else None}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
