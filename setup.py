"""Builds privfast._C: the CPU kernels always; the CUDA kernels when torch has CUDA and nvcc is found.

Overrides: PRIVFAST_CPU_ONLY=1 skips CUDA; PRIVFAST_FORCE_CUDA=1 builds it even where no GPU is
visible (torch must still be a CUDA build). TORCH_CUDA_ARCH_LIST picks the archs (default 8.0;9.0).
Install with `pip install --no-build-isolation .`: an isolated build would download a second torch.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as error:  # the isolated-build trap: say how to avoid it
    raise SystemExit(
        "privfast builds against the torch already installed. Install torch first, then run "
        "`pip install --no-build-isolation .` so pip does not build in an environment without it."
    ) from error

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _resolve_cuda() -> tuple[bool, str]:
    if _flag("PRIVFAST_CPU_ONLY"):
        return False, "PRIVFAST_CPU_ONLY=1"
    if torch.version.cuda is None:
        if _flag("PRIVFAST_FORCE_CUDA"):
            raise SystemExit("PRIVFAST_FORCE_CUDA=1 but this torch has no CUDA support (torch.version.cuda is None)")
        return False, f"torch {torch.__version__} has no CUDA"
    if cpp_extension.CUDA_HOME is None:
        if _flag("PRIVFAST_FORCE_CUDA"):
            raise SystemExit("PRIVFAST_FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return False, "nvcc not found (set CUDA_HOME)"
    if _flag("PRIVFAST_FORCE_CUDA"):
        return True, "PRIVFAST_FORCE_CUDA=1"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, nvcc at {cpp_extension.CUDA_HOME}"


def _extension():
    with_cuda, reason = _resolve_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: the noise must round exactly as the reference does (csrc/common/philox.h);
    # -fno-math-errno lets sqrt vectorize (nothing reads errno). -fopenmp: at::parallel_for's OpenMP
    # backend is inlined from ATen's headers, so without it every kernel silently runs on one thread
    # (the runtime it binds to is the libgomp.so.1 torch has already loaded).
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno"]
    link = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if not with_cuda:
        print(f"privfast build: CPU only ({reason})")
        return cpp_extension.CppExtension("privfast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    print(f"privfast build: CPU + CUDA for archs {archs} ({reason})")
    return cpp_extension.CUDAExtension(
        "privfast._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]},
        extra_link_args=link,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
