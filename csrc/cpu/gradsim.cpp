#include <torch/library.h>

#include "../gradsim_args.h"
#include "../tensor_list.h"
#include "reductions.h"

namespace privfast {
namespace {

at::Tensor gradsim_cpu(at::TensorList grads_in, at::TensorList refs_in, const at::Tensor& index_in, bool per_layer) {
  const GradsimCall call = prepare_gradsim(grads_in, refs_in, index_in);
  const auto& grads = call.grads;
  const auto& refs = call.refs;
  const at::Tensor& index = call.index;
  const int64_t num_refs = refs[0].size(0);
  const int64_t* ref_of = index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    TORCH_CHECK_VALUE(ref_of[i] >= 0 && ref_of[i] < num_refs, "index[", i, "] = ", ref_of[i], " is outside [0, ",
                      num_refs, ")");
  }
  const auto n = row_numels(grads);
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "gradsim", [&] {
    std::vector<const scalar_t*> a_data, r_data;
    for (size_t t = 0; t < grads.size(); ++t) {
      a_data.push_back(grads[t].const_data_ptr<scalar_t>());
      r_data.push_back(refs[t].const_data_ptr<scalar_t>());
    }
    sums = cpu::reduce_rows<3>(n, grads[0].size(0), [&](const Segment& s) {
      const scalar_t* a = a_data[s.tensor] + s.row * n[s.tensor] + s.begin;
      const scalar_t* r = r_data[s.tensor] + ref_of[s.row] * n[s.tensor] + s.begin;
      return cpu::cosine_sums(a, r, s.end - s.begin);
    });
  });
  return cosines_from_sums(sums, per_layer, grads[0].scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(privfast, CPU, m) { m.impl("gradsim", &gradsim_cpu); }

}  // namespace privfast
