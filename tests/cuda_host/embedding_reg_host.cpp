// embedding_reg's CUDA pair kernels (csrc/cuda/embedding_reg.cu) built for the host with the
// emulated runtime, behind the device-independent driver the CUDA registration uses
// (csrc/common/embedding_reg_driver.h: the Gram matrix and M @ table products).
#define MTLUE_CUDA_HOST_EMULATION
#include "host_ops.h"

#include "common/embedding_reg_driver.h"
#include "cuda/embedding_reg.cu"

namespace mtlue_host {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> embedding_forward(const at::Tensor& table,
                                                                                         const at::Tensor& offsets) {
  at::Tensor errors = new_errors();
  auto pairs = [&](const at::Tensor& gram, const at::Tensor& task_offsets, at::Tensor& cos, at::Tensor& norms,
                   at::Tensor& intra, at::Tensor& inter) {
    cos.fill_(NAN);
    norms.fill_(NAN);
    mtlue::cuda::embedding_reg_forward_pairs(gram, task_offsets, cos, norms, intra, inter, errors);
  };
  auto [intra, inter, cos, norms] = mtlue::embedding_reg_forward(table, offsets, pairs);
  return {intra, inter, cos, norms, errors};
}

at::Tensor embedding_backward(const at::Tensor& grad_intra, const at::Tensor& grad_inter, const at::Tensor& table,
                              const at::Tensor& offsets, const at::Tensor& cos, const at::Tensor& norms) {
  auto weights = [](const at::Tensor& gi, const at::Tensor& ge, const at::Tensor& c, const at::Tensor& n,
                    const at::Tensor& o, at::Tensor& m) {
    m.fill_(NAN);
    mtlue::cuda::embedding_reg_backward_weights(gi, ge, c, n, o, m);
  };
  return mtlue::embedding_reg_backward(grad_intra, grad_inter, table, offsets, cos, norms, weights);
}

}  // namespace mtlue_host
