// Op schemas of the mldecoder_fast namespace and the CPU kernels of the group FC.
//
// Every product reads and writes the final tensors in place: the forward writes the
// class-sliced logits directly (no padded [B, K*G] buffer, no zero fill, no copy into class
// order), and the backward reads the unpadded gradient. The layout is that of the CUDA
// kernels (see group_fc_cuda.cu): group k is a column-major G x B block of the logits at
// column offset k*G, so all full groups form one strided batch and the partial last group a
// second, smaller one.
//
// fp32/fp64 run as one call of MKL's batched GEMM (the one torch.bmm uses) when torch's MKL
// exports it; otherwise, and for half types, one BLAS product per group on strided views,
// groups spread over threads with at::parallel_for. Either way each output element is
// computed by one product in a fixed order: results repeat bit for bit.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/CPUFunctions.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "group_fc.h"

// `import mldecoder_fast._C` loads this library, whose static initialisers register the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

// torch's MKL is told not to adapt its thread count inside parallel regions
// (mkl_set_dynamic(false)), so a BLAS call inside at::parallel_for would start threads of its
// own on top of ours. MKL's thread-local setting prevents that; the symbol is weak so builds
// of torch without MKL (it is then null) load the extension all the same.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

// MKL's batched GEMM, ILP64 Fortran interface (column-major, every argument by pointer, 64-bit
// integers), exported by torch's x86 builds; weak like the above.
extern "C" void sgemm_batch_64(const char*, const char*, const int64_t*, const int64_t*,
                               const int64_t*, const float*, const float**, const int64_t*,
                               const float**, const int64_t*, const float*, float**,
                               const int64_t*, const int64_t*, const int64_t*)
    __attribute__((weak));
extern "C" void dgemm_batch_64(const char*, const char*, const int64_t*, const int64_t*,
                               const int64_t*, const double*, const double**, const int64_t*,
                               const double**, const int64_t*, const double*, double**,
                               const int64_t*, const int64_t*, const int64_t*)
    __attribute__((weak));

namespace mldecoder_fast {

namespace {

struct SingleThreadedBlas {
  int previous = 0;
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;
};

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), op, ": ", name,
              " must be float64, float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                       const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " is on ", a.device(), " but ",
              name_b, " is on ", b.device());
}

// Validates weight and num_classes; fills K, D, G, C (K of the ZSL form comes from h/grad).
void check_weight(GroupFcShape& s, const at::Tensor& weight, int64_t num_classes, const char* op) {
  TORCH_CHECK(weight.dim() == 3 || weight.dim() == 2, op,
              ": weight must be [K, D, G] (or [D, 1] for the ZSL form), got shape ",
              weight.sizes());
  check_dtype(weight, op, "weight");
  if (weight.dim() == 2) {
    TORCH_CHECK(weight.size(1) == 1, op, ": a 2-d (ZSL) weight must be [D, 1], got shape ",
                weight.sizes());
    s.zsl = true;
    s.dim = weight.size(0);
    s.group_size = 1;
    return;
  }
  s.groups = weight.size(0);
  s.dim = weight.size(1);
  s.group_size = weight.size(2);
  TORCH_CHECK(s.group_size >= 1, op, ": weight [K, D, G] needs G >= 1, got shape ",
              weight.sizes());
  TORCH_CHECK(num_classes >= 1 && num_classes <= s.groups * s.group_size, op,
              ": num_classes must be in [1, K*G] = [1, ", s.groups * s.group_size,
              "] for weight of shape ", weight.sizes(), ", got ", num_classes);
  s.num_classes = num_classes;
}

void check_h(GroupFcShape& s, const at::Tensor& h, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(h.dim() == 3, op, ": h must be [B, K, D], got shape ", h.sizes());
  check_same_device(h, weight, op, "h", "weight");
  TORCH_CHECK(h.scalar_type() == weight.scalar_type(), op,
              ": h and weight must have the same dtype (cast weight to h.dtype first), got ",
              h.scalar_type(), " and ", weight.scalar_type());
  if (s.zsl) {
    s.groups = h.size(1);
    s.num_classes = s.groups;
  }
  TORCH_CHECK(h.size(1) == s.groups && h.size(2) == s.dim, op, ": h of shape ", h.sizes(),
              " does not match weight of shape ", weight.sizes(), " (expected [B, ", s.groups,
              ", ", s.dim, "])");
  s.batch = h.size(0);
}

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "1") == 0;
}

bool poison_outputs() { return env_flag("MLDECODER_FAST_POISON_OUTPUTS"); }

template <typename F>
void for_each_group(int64_t n, const F& f) {
  // One group per task when there are enough groups to keep every thread busy; otherwise
  // loop over the groups and let each product use the threads itself.
  if (n >= at::get_num_threads() && !at::in_parallel_region()) {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      const SingleThreadedBlas single_threaded;
      for (int64_t k = begin; k < end; ++k) f(k);
    });
  } else {
    for (int64_t k = 0; k < n; ++k) f(k);
  }
}

// ---- the batched (MKL) path ----------------------------------------------------------------

// MLDECODER_FAST_PER_GROUP_BLAS=1 forces the per-group path (what builds of torch without MKL
// run), so the tests cover it here too.
bool has_batched_gemm(at::ScalarType t) {
  if (env_flag("MLDECODER_FAST_PER_GROUP_BLAS")) return false;
  if (t == at::kFloat) return sgemm_batch_64 != nullptr;
  if (t == at::kDouble) return dgemm_batch_64 != nullptr;
  return false;
}

void call_batched_gemm(const char* ta, const char* tb, const int64_t* m, const int64_t* n,
                       const int64_t* k, const float* alpha, const float** a, const int64_t* lda,
                       const float** b, const int64_t* ldb, const float* beta, float** c,
                       const int64_t* ldc, const int64_t* groups, const int64_t* sizes) {
  sgemm_batch_64(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, groups, sizes);
}

void call_batched_gemm(const char* ta, const char* tb, const int64_t* m, const int64_t* n,
                       const int64_t* k, const double* alpha, const double** a,
                       const int64_t* lda, const double** b, const int64_t* ldb,
                       const double* beta, double** c, const int64_t* ldc, const int64_t* groups,
                       const int64_t* sizes) {
  dgemm_batch_64(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, groups, sizes);
}

// C_i = op(A_i) * op(B_i) (+ C_i with accumulate), column-major, for the full groups
// (m x n x k) and the partial last group (tail_m x n x k, or tail_k for grad_h's reduction).
// A_i, B_i, C_i start at a + i*stride_a etc. (element offsets), for i < full (+1 with a tail).
template <typename T>
void batched_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, int64_t full,
                  int64_t tail_m, int64_t tail_k, const T* a, int64_t lda, int64_t stride_a,
                  const T* b, int64_t ldb, int64_t stride_b, bool accumulate, T* c, int64_t ldc,
                  int64_t stride_c) {
  std::vector<const T*> pa, pb;
  std::vector<T*> pc;
  std::vector<std::array<int64_t, 4>> shapes;  // m, n, k, count
  const bool has_tail = tail_m > 0 && tail_k > 0;
  const int64_t count = full + (has_tail ? 1 : 0);
  for (int64_t i = 0; i < count; ++i) {
    pa.push_back(a + i * stride_a);
    pb.push_back(b + i * stride_b);
    pc.push_back(c + i * stride_c);
  }
  if (full > 0) shapes.push_back({m, n, k, full});
  if (has_tail) shapes.push_back({tail_m, n, tail_k, 1});
  const int64_t ng = static_cast<int64_t>(shapes.size());
  if (ng == 0 || n == 0) return;
  std::vector<char> vta(ng, ta), vtb(ng, tb);
  std::vector<int64_t> vm(ng), vn(ng), vk(ng), size(ng), vlda(ng, lda), vldb(ng, ldb),
      vldc(ng, ldc);
  std::vector<T> alpha(ng, T(1)), beta(ng, accumulate ? T(1) : T(0));
  for (int64_t g = 0; g < ng; ++g) {
    vm[g] = shapes[g][0];
    vn[g] = shapes[g][1];
    vk[g] = shapes[g][2];
    size[g] = shapes[g][3];
  }
  call_batched_gemm(vta.data(), vtb.data(), vm.data(), vn.data(), vk.data(), alpha.data(),
                    pa.data(), vlda.data(), pb.data(), vldb.data(), beta.data(), pc.data(),
                    vldc.data(), &ng, size.data());
}

// out (prefilled with the bias) += the group products; the same GEMMs as the CUDA forward.
template <typename T>
void forward_batched(const GroupFcShape& s, const at::Tensor& h, const at::Tensor& weight,
                     at::Tensor& out) {
  const HLayout hl = h_layout(h);
  const at::Tensor w = weight.contiguous();
  const int64_t G = s.group_size, D = s.dim;
  batched_gemm<T>('N', 'N', G, s.batch, D, s.full_groups(), s.tail(), D, w.const_data_ptr<T>(),
                  G, D * G, hl.t.const_data_ptr<T>(), hl.ld, hl.group_stride, true,
                  out.data_ptr<T>(), s.num_classes, G);
}

template <typename T>
void grad_h_batched(const GroupFcShape& s, const at::Tensor& grad, const at::Tensor& weight,
                    const GradHTarget& target) {
  const GradLayout gl = grad_layout(grad);
  const at::Tensor w = weight.contiguous();
  const int64_t G = s.group_size, D = s.dim;
  batched_gemm<T>('T', 'N', D, s.batch, G, s.full_groups(), D, s.tail(), w.const_data_ptr<T>(),
                  G, D * G, gl.t.const_data_ptr<T>(), gl.ld, G, false, target.t.data_ptr<T>(),
                  target.ld, target.group_stride);
}

template <typename T>
void grad_weight_batched(const GroupFcShape& s, const at::Tensor& grad, const at::Tensor& h,
                         at::Tensor& grad_w) {
  const GradLayout gl = grad_layout(grad);
  const HLayout hl = h_layout(h);
  const int64_t G = s.group_size, D = s.dim;
  batched_gemm<T>('N', 'T', G, D, s.batch, s.full_groups(), s.tail(), s.batch,
                  gl.t.const_data_ptr<T>(), gl.ld, G, hl.t.const_data_ptr<T>(), hl.ld,
                  hl.group_stride, false, grad_w.data_ptr<T>(), G, D * G);
}

// ---- the per-group path -------------------------------------------------------------------

// h/grad with unit stride on the last dimension, or a contiguous copy (BLAS needs one unit
// stride; strided rows would be copied by every per-group product otherwise).
at::Tensor unit_inner_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

at::Tensor group_fc_cpu(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                        int64_t num_classes) {
  const GroupFcShape s = check_forward_args(h, weight, bias, num_classes);
  if (s.zsl) return zsl_forward(h, weight, bias);
  const at::ScalarType out_type = forward_output_type(h, bias);
  at::Tensor out = empty_output({s.batch, s.num_classes}, h.options().dtype(out_type));
  if (s.batch == 0) return out;
  if (out_type == h.scalar_type() && has_batched_gemm(out_type) && s.dim > 0) {
    out.copy_(bias.to(out_type).unsqueeze(0).expand_as(out));
    AT_DISPATCH_FLOATING_TYPES(out_type, "group_fc", [&] {
      forward_batched<scalar_t>(s, h, weight, out);
    });
    return out;
  }
  // A wider output (a half-precision product plus an fp32 bias, as under autocast) is computed
  // from upcast inputs: exact products, accumulated and rounded once in the output type.
  const at::Tensor hu = unit_inner_stride(h).to(out_type);
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.to(out_type);
  for_each_group(s.used_groups(), [&](int64_t k) {
    const int64_t c0 = k * s.group_size;
    const int64_t width = std::min(s.group_size, s.num_classes - c0);
    at::Tensor out_k = out.narrow(1, c0, width);  // [B, width], row stride C
    at::cpu::addmm_out(out_k, b.narrow(0, c0, width), hu.select(1, k),
                       w.select(0, k).narrow(1, 0, width).to(out_type));
  });
  return out;
}

at::Tensor group_fc_grad_h_cpu(const at::Tensor& grad, const at::Tensor& h,
                               const at::Tensor& weight, int64_t num_classes) {
  const GroupFcShape s = check_grad_args(grad, weight, num_classes, &h, "group_fc_grad_h");
  if (s.zsl) return zsl_grad_h(grad, h, weight);
  at::Tensor grad_h = empty_grad_h(h, weight);
  if (grad_h.numel() == 0) return grad_h;
  const GradHTarget target = grad_h_target(grad_h);
  const int64_t used = s.used_groups();
  if (has_batched_gemm(weight.scalar_type())) {
    AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "group_fc_grad_h", [&] {
      grad_h_batched<scalar_t>(s, grad.to(weight.scalar_type()), weight, target);
    });
  } else {
    const at::Tensor g = unit_inner_stride(grad.to(weight.scalar_type()));
    const at::Tensor w = weight.contiguous();
    for_each_group(used, [&](int64_t k) {
      at::Tensor grad_h_k = target.t.select(1, k);  // [B, D]
      const int64_t c0 = k * s.group_size;
      const int64_t width = std::min(s.group_size, s.num_classes - c0);
      at::cpu::mm_out(grad_h_k, g.narrow(1, c0, width), w.select(0, k).narrow(1, 0, width).t());
    });
  }
  finish_grad_h(target, grad_h, used);
  return grad_h;
}

at::Tensor group_fc_grad_weight_cpu(const at::Tensor& grad, const at::Tensor& h,
                                    const at::Tensor& weight, int64_t num_classes) {
  const GroupFcShape s = check_grad_args(grad, weight, num_classes, &h, "group_fc_grad_weight");
  if (s.zsl) return zsl_grad_weight(grad, h, weight);
  at::Tensor grad_w = empty_output({s.groups, s.dim, s.group_size}, h.options());
  if (grad_w.numel() == 0) return grad_w;
  if (s.batch == 0) return grad_w.zero_();
  const int64_t used = s.used_groups();
  if (has_batched_gemm(weight.scalar_type())) {
    AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "group_fc_grad_weight", [&] {
      grad_weight_batched<scalar_t>(s, grad.to(weight.scalar_type()), h, grad_w);
    });
    const int64_t tail = s.tail();
    if (tail > 0) {  // padded columns of the partial group get no gradient
      grad_w.select(0, s.full_groups()).narrow(1, tail, s.group_size - tail).zero_();
    }
    if (used < s.groups) grad_w.narrow(0, used, s.groups - used).zero_();
    return grad_w;
  }
  const at::Tensor g = unit_inner_stride(grad.to(weight.scalar_type()));
  const at::Tensor hu = unit_inner_stride(h);
  for_each_group(s.groups, [&](int64_t k) {
    at::Tensor grad_w_k = grad_w.select(0, k);  // [D, G]
    const int64_t c0 = k * s.group_size;
    const int64_t width = k < used ? std::min(s.group_size, s.num_classes - c0) : 0;
    if (width > 0) {
      at::Tensor dst = grad_w_k.narrow(1, 0, width);  // [D, width], row stride G
      at::cpu::mm_out(dst, hu.select(1, k).t(), g.narrow(1, c0, width));
    }
    if (width < s.group_size) grad_w_k.narrow(1, width, s.group_size - width).zero_();  // padding
  });
  return grad_w;
}

at::Tensor group_fc_grad_bias_cpu(const at::Tensor& grad, const at::Tensor& bias) {
  if (check_grad_bias_args(grad, bias)) return sum_all_grad_bias(grad, bias);
  // A column sum with a fixed order of operations; fp32 accumulation for half types.
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::sum(grad, {0}, false, acc).to(bias.scalar_type());
}

}  // namespace

GroupFcShape check_forward_args(const at::Tensor& h, const at::Tensor& weight,
                                const at::Tensor& bias, int64_t num_classes) {
  const char* op = "group_fc";
  GroupFcShape s;
  check_weight(s, weight, num_classes, op);
  check_h(s, h, weight, op);
  check_dtype(h, op, "h");
  check_dtype(bias, op, "bias");
  check_same_device(h, bias, op, "h", "bias");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == (s.zsl ? 1 : s.num_classes), op,
              ": bias must be [", (s.zsl ? 1 : s.num_classes), "], got shape ", bias.sizes());
  return s;
}

GroupFcShape check_grad_args(const at::Tensor& grad, const at::Tensor& weight,
                             int64_t num_classes, const at::Tensor* h, const char* op) {
  GroupFcShape s;
  check_weight(s, weight, num_classes, op);
  TORCH_CHECK(grad.dim() == 2, op, ": grad must be [B, num_classes], got shape ", grad.sizes());
  check_same_device(grad, weight, op, "grad", "weight");
  check_dtype(grad, op, "grad");
  if (s.zsl) {
    s.groups = grad.size(1);
    s.num_classes = s.groups;
  }
  TORCH_CHECK(grad.size(1) == s.num_classes, op, ": grad of shape ", grad.sizes(),
              " does not match num_classes = ", s.num_classes);
  s.batch = grad.size(0);
  if (h != nullptr) {
    check_h(s, *h, weight, op);
    TORCH_CHECK(h->size(0) == s.batch, op, ": h of shape ", h->sizes(), " and grad of shape ",
                grad.sizes(), " disagree on the batch size");
  }
  return s;
}

bool check_grad_bias_args(const at::Tensor& grad, const at::Tensor& bias) {
  const char* op = "group_fc_grad_bias";
  TORCH_CHECK(grad.dim() == 2, op, ": grad must be [B, C], got shape ", grad.sizes());
  TORCH_CHECK(bias.dim() == 1, op, ": bias must be 1-d, got shape ", bias.sizes());
  check_dtype(grad, op, "grad");
  check_dtype(bias, op, "bias");
  check_same_device(grad, bias, op, "grad", "bias");
  if (bias.size(0) == 1) return true;
  TORCH_CHECK(grad.size(1) == bias.size(0), op, ": grad of shape ", grad.sizes(),
              " does not match bias of shape ", bias.sizes());
  return false;
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (poison_outputs()) t.fill_(NAN);
  return t;
}

at::ScalarType forward_output_type(const at::Tensor& h, const at::Tensor& bias) {
  return at::promote_types(h.scalar_type(), bias.scalar_type());
}

at::Tensor zsl_forward(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias) {
  // [B, K, D] @ [D, 1] (fp32 accumulation in the BLAS for half types) + bias, promoted as in
  // group_fc_torch.
  at::Tensor out = at::matmul(h, weight).squeeze(-1);
  return at::add(out, bias).to(forward_output_type(h, bias));
}

at::Tensor empty_grad_h(const at::Tensor& h, const at::Tensor& weight) {
  // The same rule as torch.empty_like(h, dtype=weight.dtype), which the fake kernel uses.
  at::Tensor t = at::empty_like(h, weight.options().memory_format(at::MemoryFormat::Preserve));
  if (poison_outputs()) t.fill_(NAN);
  return t;
}

GradHTarget grad_h_target(const at::Tensor& grad_h) {
  const int64_t B = grad_h.size(0), K = grad_h.size(1), D = grad_h.size(2);
  GradHTarget target;
  target.t = (D <= 1 || grad_h.stride(2) == 1) ? grad_h : at::empty({B, K, D}, grad_h.options());
  target.ld = B <= 1 ? std::max<int64_t>(D, 1) : target.t.stride(0);
  target.group_stride = K <= 1 ? 0 : target.t.stride(1);
  return target;
}

void finish_grad_h(const GradHTarget& target, at::Tensor& grad_h, int64_t used_groups) {
  const int64_t K = grad_h.size(1);
  if (used_groups < K) target.t.narrow(1, used_groups, K - used_groups).zero_();  // all padding
  if (!target.t.is_same(grad_h)) grad_h.copy_(target.t);
}

at::Tensor zsl_grad_h(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& weight) {
  at::Tensor grad_h = empty_grad_h(h, weight);
  at::mul_out(grad_h, grad.to(weight.scalar_type()).unsqueeze(-1),
              weight.reshape({1, 1, weight.size(0)}));
  return grad_h;
}

at::Tensor zsl_grad_weight(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& weight) {
  const int64_t rows = h.size(0) * h.size(1);
  const int64_t dim = h.size(2);
  at::Tensor grad_w = empty_output(weight.sizes(), h.options());
  if (rows == 0) return grad_w.zero_();
  at::mm_out(grad_w, h.reshape({rows, dim}).t(), grad.to(h.scalar_type()).reshape({rows, 1}));
  return grad_w;
}

at::Tensor sum_all_grad_bias(const at::Tensor& grad, const at::Tensor& bias) {
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::sum(grad, acc).reshape({1}).to(bias.scalar_type());
}

}  // namespace mldecoder_fast

TORCH_LIBRARY(mldecoder_fast, m) {
  // logits[B, C] = group FC of h[B, K, D] by weight[K, D, G] plus bias[C], C = num_classes;
  // ZSL form: weight [D, 1], bias [1] -> [B, K] (num_classes is then ignored). h and weight
  // share the product's dtype; the logits have dtype promote(h, bias); fp32 accumulation.
  m.def("group_fc(Tensor h, Tensor weight, Tensor bias, int num_classes) -> Tensor");
  // Backward pieces, each run only when its gradient is needed: grad_h (laid out like h) and
  // grad_weight in weight's dtype, grad_bias in bias's dtype. grad_h reads h's layout only.
  m.def("group_fc_grad_h(Tensor grad, Tensor h, Tensor weight, int num_classes) -> Tensor");
  m.def("group_fc_grad_weight(Tensor grad, Tensor h, Tensor weight, int num_classes) -> Tensor");
  m.def("group_fc_grad_bias(Tensor grad, Tensor bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(mldecoder_fast, CPU, m) {
  m.impl("group_fc", &mldecoder_fast::group_fc_cpu);
  m.impl("group_fc_grad_h", &mldecoder_fast::group_fc_grad_h_cpu);
  m.impl("group_fc_grad_weight", &mldecoder_fast::group_fc_grad_weight_cpu);
  m.impl("group_fc_grad_bias", &mldecoder_fast::group_fc_grad_bias_cpu);
}
