// Stand-in for the header a CUDA build of torch generates and a CPU build does not ship, so that
// `make cuda-glue-check` can compile privfast's CUDA glue against a CPU torch's headers.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
