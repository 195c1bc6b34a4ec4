// CPU kernel of mtlue::take_pending_errors: the CPU kernels raise their value errors at once, so
// there is never anything pending.
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../common/error_slots.h"

namespace mtlue::cpu {
namespace {

at::Tensor take_pending_errors_cpu(const at::Tensor& /*like*/) {
  return at::zeros({error_slot::kSlots}, at::TensorOptions().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlue, CPU, m) { m.impl("take_pending_errors", &take_pending_errors_cpu); }

}  // namespace mtlue::cpu
