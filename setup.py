"""Builds privfast._C: the CPU kernels always; the CUDA kernels when torch has CUDA and nvcc is found.

Overrides: PRIVFAST_CPU_ONLY=1 skips CUDA; PRIVFAST_FORCE_CUDA=1 builds it even where no GPU is
visible (torch must still be a CUDA build). TORCH_CUDA_ARCH_LIST picks the archs (default 8.0;9.0).
Install with `pip install --no-build-isolation .`: an isolated build would download a second torch.
The C++ standard is the torch's own, and the CUDA toolkit is $CUDA_HOME / $CUDA_PATH or the one
behind `nvcc` on PATH (see tools/torch_build.py); the summary line printed here names both.
"""

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "tools"))
import torch_build  # noqa: E402  (tools/torch_build.py: the C++ standard and the CUDA toolkit, shared with the checks)

try:
    import torch
except ImportError as error:  # the isolated-build trap: say how to avoid it
    raise SystemExit(
        "privfast builds against the torch already installed. Install torch first, then run "
        "`pip install --no-build-isolation .` so pip does not build in an environment without it."
    ) from error


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


# The toolkit is found before torch.utils.cpp_extension is imported, which fixes its CUDA_HOME then:
# torch's own guess (the folder above nvcc's) is /usr/local where nvcc is a wrapper script there,
# and -lcudart would not be found.
CUDA_TOOLKIT, CUDA_TOOLKIT_FOUND = None, ""
if torch.version.cuda is not None and not _flag("PRIVFAST_CPU_ONLY"):
    CUDA_TOOLKIT, CUDA_TOOLKIT_FOUND = torch_build.find_cuda_toolkit()
    if CUDA_TOOLKIT is not None:
        os.environ["CUDA_HOME"] = CUDA_TOOLKIT

from torch.utils import cpp_extension  # noqa: E402

if CUDA_TOOLKIT is not None:
    cpp_extension.CUDA_HOME = CUDA_TOOLKIT  # in case something imported it before us

DEFAULT_ARCHS = "8.0;9.0"


def _resolve_cuda() -> tuple[bool, str]:
    if _flag("PRIVFAST_CPU_ONLY"):
        return False, "PRIVFAST_CPU_ONLY=1"
    if torch.version.cuda is None:
        if _flag("PRIVFAST_FORCE_CUDA"):
            raise SystemExit("PRIVFAST_FORCE_CUDA=1 but this torch has no CUDA support (torch.version.cuda is None)")
        return False, f"torch {torch.__version__} has no CUDA"
    if CUDA_TOOLKIT is None:
        if _flag("PRIVFAST_FORCE_CUDA"):
            raise SystemExit(
                f"PRIVFAST_FORCE_CUDA=1 but no CUDA toolkit was found ({CUDA_TOOLKIT_FOUND}; set CUDA_HOME)"
            )
        return False, f"no CUDA toolkit: {CUDA_TOOLKIT_FOUND} (set CUDA_HOME)"
    if _flag("PRIVFAST_FORCE_CUDA"):
        return True, "PRIVFAST_FORCE_CUDA=1"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}"


def _extension():
    with_cuda, reason = _resolve_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: the noise must round exactly as the reference does (csrc/common/philox.h);
    # -fno-math-errno lets sqrt vectorize (nothing reads errno). -fopenmp: at::parallel_for's OpenMP
    # backend is inlined from ATen's headers, so without it every kernel silently runs on one thread
    # (the runtime it binds to is the libgomp.so.1 torch has already loaded).
    # No -std= flag: torch's build adds its own to both compilers' arguments when none is given, the
    # standard its headers are written for (C++20 in torch 2.13 and 2.14, whose headers refuse C++17).
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
    link = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    std, std_how, must_pass = torch_build.cxx_standard(cpp_extension)
    nvcc = ["-O3", "--expt-relaxed-constexpr"]
    if must_pass:  # torch's default could not be read, or its headers need a newer one
        cxx.append(f"-std={std}")
        nvcc.append(f"-std={std}")
    if not with_cuda:
        print(f"privfast build: CPU only ({reason}); {std.upper()} ({std_how})")
        return cpp_extension.CppExtension("privfast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    release = torch_build.nvcc_release(CUDA_TOOLKIT)
    print(
        f"privfast build: CPU + CUDA for archs {archs} ({reason}); {std.upper()} ({std_how}); "
        f"CUDA toolkit {CUDA_TOOLKIT} (nvcc {release}, found by {CUDA_TOOLKIT_FOUND}) for torch's CUDA "
        f"{torch.version.cuda}"
    )
    return cpp_extension.CUDAExtension(
        "privfast._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
