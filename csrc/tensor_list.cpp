#include "tensor_list.h"

#include <cmath>
#include <sstream>

namespace privfast {

std::vector<at::Tensor> checked_rows(at::TensorList tensors, const char* name) {
  TORCH_CHECK_VALUE(!tensors.empty(), name, " is empty: expected a list of tensors [B, *shape_i]");
  const at::Tensor& first = tensors[0];
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.dim() >= 1, name, "[", i, "] is a scalar; expected a leading batch dimension [B, *shape_i]");
    TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), name, "[", i, "] has dtype ", t.scalar_type(),
                      "; expected float16, bfloat16, float32 or float64");
    TORCH_CHECK_VALUE(t.scalar_type() == first.scalar_type(), name, "[", i, "] has dtype ", t.scalar_type(), " but ",
                      name, "[0] has ", first.scalar_type(), "; use one dtype");
    TORCH_CHECK_VALUE(t.device() == first.device(), name, "[", i, "] is on ", t.device(), " but ", name, "[0] is on ",
                      first.device(), "; use one device");
    TORCH_CHECK_VALUE(t.size(0) == first.size(0), name, "[", i, "] has batch size ", t.size(0), " but ", name,
                      "[0] has ", first.size(0), "; every tensor must hold the same examples along dimension 0");
    out.push_back(t.contiguous());
  }
  return out;
}

std::vector<int64_t> row_numels(const std::vector<at::Tensor>& tensors) {
  std::vector<int64_t> n;
  n.reserve(tensors.size());
  for (const auto& t : tensors) {
    int64_t numel = 1;
    for (int64_t d = 1; d < t.dim(); ++d) numel *= t.size(d);
    n.push_back(numel);
  }
  return n;
}

std::vector<Segment> row_segments(const std::vector<int64_t>& row_numel, int64_t rows) {
  std::vector<Segment> segments;
  for (int64_t t = 0; t < static_cast<int64_t>(row_numel.size()); ++t) {
    for (int64_t row = 0; row < rows; ++row) {
      for (int64_t begin = 0; begin < row_numel[t]; begin += kSegmentElements) {
        segments.push_back({t, row, begin, std::min(begin + kSegmentElements, row_numel[t])});
      }
    }
  }
  return segments;
}

void check_finite_norms(const double* squares, const double* norms, int64_t num_tensors, int64_t rows,
                        const char* name) {
  std::vector<int64_t> bad;
  for (int64_t b = 0; b < rows; ++b) {
    if (!std::isfinite(norms[b])) bad.push_back(b);
  }
  if (bad.empty()) return;
  int64_t first_tensor = 0;
  while (first_tensor + 1 < num_tensors && std::isfinite(squares[first_tensor * rows + bad[0]])) ++first_tensor;
  std::ostringstream shown;
  for (size_t i = 0; i < bad.size() && i < 10; ++i) shown << (i ? ", " : "") << bad[i];
  if (bad.size() > 10) shown << " and " << bad.size() - 10 << " more";
  TORCH_CHECK_VALUE(false, name, " has non-finite values (NaN or inf) for examples [", shown.str(), "], first in ",
                    name, "[", first_tensor, "]; clipping them would give a wrong update. Check the loss and "
                    "learning rate.");
}

}  // namespace privfast
