// Group fully-connected projection (docs/design.md step 7): shared declarations of the CPU (.cpp) and
// CUDA (.cu) kernels.
//
//   logits[b, k*G + g] = sum_d h[b, k, d] * weight[k, d, g] + bias[k*G + g],  k*G + g < C
//
// h [B, K, D] (any strides), weight [K, D, G], bias [C] -> logits [B, C], C = num_classes.
// ZSL form: weight [D, 1] and bias [1] shared by all K queries -> logits [B, K].
//
// Groups are laid out in class order, so group k owns the columns [k*G, k*G + G) of the
// logits. With C <= K*G the groups split into `full_groups` whole ones, at most one partial
// group of `tail` columns, and unused groups past the last class (possible when
// G = ceil(C / K) leaves whole groups of padding, e.g. C = 10, K = 6, G = 2).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

namespace mldecoder_fast {

struct GroupFcShape {
  int64_t batch = 0;        // B
  int64_t groups = 0;       // K
  int64_t dim = 0;          // D
  int64_t group_size = 0;   // G (1 in the ZSL form)
  int64_t num_classes = 0;  // C (K in the ZSL form)
  bool zsl = false;
  int64_t full_groups() const { return num_classes / group_size; }
  int64_t tail() const { return num_classes - full_groups() * group_size; }
  int64_t used_groups() const { return full_groups() + (tail() > 0 ? 1 : 0); }
};

// Checks the forward arguments (clear errors for wrong ranks, shapes, dtypes, devices) and
// returns the sizes. h and weight must share a floating dtype; bias may be any floating dtype.
GroupFcShape check_forward_args(const at::Tensor& h, const at::Tensor& weight,
                                const at::Tensor& bias, int64_t num_classes);
// The same for the backward ops: grad [B, C] (ZSL: [B, K]) in the logits' dtype, cast to the
// product's dtype (weight's) first, as autograd does for the product in group_fc_torch;
// grad_h and grad_weight come out in weight's dtype. h [B, K, D] when given.
GroupFcShape check_grad_args(const at::Tensor& grad, const at::Tensor& weight,
                             int64_t num_classes, const at::Tensor* h, const char* op);

// The logits' dtype: that of (product in h's dtype) + bias, i.e. promote(h, bias). Under
// autocast a bf16/fp16 product with an fp32 bias gives fp32 logits, as in group_fc_torch.
at::ScalarType forward_output_type(const at::Tensor& h, const at::Tensor& bias);

// at::empty for kernel outputs. With MLDECODER_FAST_POISON_OUTPUTS=1 in the environment the
// memory is filled with NaN first, so a kernel that forgets an element fails the tests.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Operands as column-major BLAS matrices (cuBLAS, MKL): unit stride on the last dimension and
// a leading dimension that BLAS accepts (>= the row length); anything else, and size-1
// dimensions (whose strides are arbitrary), is normalised, by a contiguous copy if need be.
struct HLayout {   // h [B, K, D]: K column-major D x B matrices
  at::Tensor t;
  int64_t ld = 0;            // between rows b
  int64_t group_stride = 0;  // between groups k
};

inline HLayout h_layout(const at::Tensor& h) {
  const int64_t B = h.size(0), K = h.size(1), D = h.size(2);
  auto ok = [&](const at::Tensor& t) {
    return (D <= 1 || t.stride(2) == 1) && (B <= 1 || t.stride(0) >= std::max<int64_t>(D, 1));
  };
  HLayout l;
  l.t = ok(h) ? h : h.contiguous();
  l.ld = B <= 1 ? std::max<int64_t>(D, 1) : l.t.stride(0);
  l.group_stride = K <= 1 ? 0 : l.t.stride(1);
  return l;
}

struct GradLayout {  // grad [B, C]: a column-major C x B matrix (an expanded grad is copied)
  at::Tensor t;
  int64_t ld = 0;
};

inline GradLayout grad_layout(const at::Tensor& grad) {
  const int64_t B = grad.size(0), C = grad.size(1);
  auto ok = [&](const at::Tensor& t) {
    return (C <= 1 || t.stride(1) == 1) && (B <= 1 || t.stride(0) >= std::max<int64_t>(C, 1));
  };
  GradLayout l;
  l.t = ok(grad) ? grad : grad.contiguous();
  l.ld = B <= 1 ? std::max<int64_t>(C, 1) : l.t.stride(0);
  return l;
}

// grad_h: laid out like h when h is dense (a transposed h gets a transposed gradient, so
// AccumulateGrad and the ops upstream need no copy), contiguous otherwise; in weight's dtype.
at::Tensor empty_grad_h(const at::Tensor& h, const at::Tensor& weight);

// Where the GEMMs write grad_h: grad_h itself when its D dimension has unit stride, else a
// contiguous buffer (copied into grad_h by finish_grad_h). ld: between rows b; group_stride:
// between groups k.
struct GradHTarget {
  at::Tensor t;
  int64_t ld = 0;
  int64_t group_stride = 0;
};
GradHTarget grad_h_target(const at::Tensor& grad_h);
void finish_grad_h(const GradHTarget& target, at::Tensor& grad_h, int64_t used_groups);

// The ZSL form is a matrix-vector product; these run on any device through ATen.
at::Tensor zsl_forward(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias);
at::Tensor zsl_grad_h(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& weight);
at::Tensor zsl_grad_weight(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& weight);

// Checks grad_bias's arguments; true when bias has one element (the ZSL form: a sum of all
// of grad), false for a column sum of grad [B, C] into bias [C].
bool check_grad_bias_args(const at::Tensor& grad, const at::Tensor& bias);

// grad_bias for the ZSL form (bias [1]): the sum of every logit's gradient, in bias.dtype.
at::Tensor sum_all_grad_bias(const at::Tensor& grad, const at::Tensor& bias);

}  // namespace mldecoder_fast
