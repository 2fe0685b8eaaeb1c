#!/usr/bin/env bash
# Compiles (without linking) privfast's CUDA glue, csrc/cuda/*.cu, against the installed torch's
# headers, so that glue errors show up on machines whose torch has no CUDA. tools/cuda_glue_stub
# supplies the one generated header a CPU torch lacks. The C++ standard is the one the real build
# uses (tools/torch_build.py: torch's own default, C++20 for torch 2.13 and 2.14); CXX_STD=c++17
# forces another, e.g. to see torch 2.14's headers refuse C++17.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NVCC=${NVCC:-nvcc}
std=${CXX_STD:-$("$PYTHON" tools/torch_build.py std)}
includes=$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))" 2>/dev/null)
python_include=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for source in csrc/cuda/*.cu; do
  "$NVCC" -std="$std" -O0 -arch=sm_90 --expt-relaxed-constexpr -w -Itools/cuda_glue_stub $includes -I"$python_include" \
    -c "$source" -o "$out/$(basename "$source").o"
done
echo "CUDA glue compiles against torch $("$PYTHON" -c 'import torch; print(torch.__version__)') with -std=$std"
