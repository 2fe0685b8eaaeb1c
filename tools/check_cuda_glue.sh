#!/usr/bin/env bash
# Compiles (without linking) privfast's CUDA glue, csrc/cuda/*.cu, against the installed torch's
# headers, so that glue errors show up on machines whose torch has no CUDA. tools/cuda_glue_stub
# supplies the one generated header a CPU torch lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NVCC=${NVCC:-nvcc}
includes=$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
python_include=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
out=$(mktemp -d)
for source in csrc/cuda/*.cu; do
  "$NVCC" -std=c++17 -O0 -arch=sm_90 --expt-relaxed-constexpr -w -Itools/cuda_glue_stub $includes -I"$python_include" \
    -c "$source" -o "$out/$(basename "$source").o"
done
rm -rf "$out"
echo "CUDA glue compiles against torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
