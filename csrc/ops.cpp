// Operator schemas of the `mtlue` library. Kernels are registered per dispatch key in
// cpu/*.cpp (CPU) and cuda/bindings.cpp (CUDA); autograd and fake (meta) kernels are registered
// from Python in mtlue_fast/ops/_registrations.py. No math here.
#include <torch/library.h>

TORCH_LIBRARY(mtlue, m) {
  // x [B,C,H,W] uint8|float, raw [B,C,H,W] float -> [B,C,out_h,out_w] in raw's dtype.
  // mode 0 = clamp, 1 = tanh; crop int64 [B,2] (top, left) or None (the centred window);
  // flip bool [B] or None.
  m.def("perturb_apply(Tensor x, Tensor raw, float eps, int mode, Tensor? crop, Tensor? flip, "
        "int out_h, int out_w) -> Tensor");
  // Gradient of perturb_apply with respect to raw: [B,C,H,W] in raw's dtype.
  m.def("perturb_apply_backward(Tensor grad_out, Tensor x, Tensor raw, float eps, int mode, "
        "Tensor? crop, Tensor? flip) -> Tensor");
  // table [R,D] float, task_offsets int64 [K+1] -> intra, inter (0-dim, table's dtype) and the
  // saved cos [R,R] and unclamped row norms [R] (float32, float64 for float64 tables).
  m.def("embedding_reg(Tensor table, Tensor task_offsets) "
        "-> (Tensor intra, Tensor inter, Tensor cos, Tensor norms)");
  // Gradient of grad_intra * intra + grad_inter * inter with respect to table: [R,D].
  m.def("embedding_reg_backward(Tensor grad_intra, Tensor grad_inter, Tensor table, "
        "Tensor task_offsets, Tensor cos, Tensor norms) -> Tensor");
  // x uint8 [N,C,H,W], delta float [N,C,H,W] -> protected uint8, delta_q int8.
  m.def("quantize_export(Tensor x, Tensor delta) -> (Tensor protected_img, Tensor delta_q)");
  // The value errors the kernels recorded on like's device since the last call (CPU int64
  // [kSlots], common/error_slots.h), clearing them; all zero on the CPU, whose kernels raise at once.
  m.def("take_pending_errors(Tensor like) -> Tensor");
}
