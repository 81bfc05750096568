// CUDA kernels of the group FC: cuBLAS strided-batched GEMMs that read and write the final,
// unpadded tensors in place, plus two small kernels of our own (bias broadcast, column sum).
//
// Row-major tensors are handed to cuBLAS (column-major) as their transposes:
//   logits [B, C] row-major == a column-major C x B matrix with ld = C; group k's G x B
//   block starts at column offset k*G, so the batch stride between groups is G and the
//   products land in class order with no padded buffer and no copy.
//   weight [K, D, G] row-major == K column-major G x D matrices (ld G, batch stride D*G).
//   h [B, K, D] with unit inner stride == K column-major D x B matrices (ld = h.stride(0),
//   batch stride h.stride(1)), so transposed or sliced activations are read where they lie.
// The partial last group (C not a multiple of G) is one more GEMM with fewer rows, so no
// product ever touches a padded column: padded weight columns get exact zero gradients.
//
// fp32 accumulation for half types (CUBLAS_COMPUTE_32F), fp64 for double; fp32 inputs use
// TF32 only if torch.backends.cuda.matmul allows it, like torch.matmul. A half-precision
// product with an fp32 bias (autocast) writes fp32 logits straight from the GEMM. No atomics: every
// output element is written by one thread/GEMM tile in a fixed order, so runs repeat bit
// for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "group_fc.h"

namespace mldecoder_fast {
namespace {

cudaDataType_t cuda_data_type(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return CUDA_R_64F;
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "group_fc (CUDA): unsupported dtype ", t);
  }
}

int to_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "group_fc (CUDA): ", what, " = ", v,
              " does not fit cuBLAS's 32-bit sizes");
  return static_cast<int>(v);
}

// C[i] = op(A[i]) * op(B[i]) + (accumulate ? C[i] : 0) for i < batch, column-major; A and B in
// ab_type, C in c_type (the same, or fp32 for half-precision A and B).
void strided_gemm(at::ScalarType ab_type, at::ScalarType c_type, bool trans_a, bool trans_b,
                  int64_t m, int64_t n,
                  int64_t k, const void* a, int64_t lda, int64_t stride_a, const void* b,
                  int64_t ldb, int64_t stride_b, bool accumulate, void* c, int64_t ldc,
                  int64_t stride_c, int64_t batch) {
  if (batch == 0 || m == 0 || n == 0) return;
  TORCH_INTERNAL_ASSERT(k > 0, "group_fc (CUDA): empty reduction must be handled by the caller");
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  const cudaDataType_t type = cuda_data_type(ab_type);
  const cudaDataType_t ctype = cuda_data_type(c_type);
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int im = to_int(m, "m"), in = to_int(n, "n"), ik = to_int(k, "k");
  const int ilda = to_int(lda, "lda"), ildb = to_int(ldb, "ldb"), ildc = to_int(ldc, "ldc");
  const int ibatch = to_int(batch, "batch");
  if (ab_type == at::kDouble) {
    const double alpha = 1.0, beta = accumulate ? 1.0 : 0.0;
    TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(
        handle, op_a, op_b, im, in, ik, &alpha, a, type, ilda, stride_a, b, type, ildb, stride_b,
        &beta, c, ctype, ildc, stride_c, ibatch, CUBLAS_COMPUTE_64F, CUBLAS_GEMM_DEFAULT));
    return;
  }
  const cublasComputeType_t compute =
      (ab_type == at::kFloat && at::globalContext().allowTF32CuBLAS()) ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                                     : CUBLAS_COMPUTE_32F;
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, op_a, op_b, im, in, ik, &alpha, a, type, ilda, stride_a, b, type, ildb, stride_b,
      &beta, c, ctype, ildc, stride_c, ibatch, compute, CUBLAS_GEMM_DEFAULT));
}

// out[r, c] = bias[c] for r < rows: the GEMMs then accumulate onto it (beta = 1), so the bias
// is added in the GEMM's own fp32 epilogue with a single rounding to the output dtype.
template <typename out_t, typename bias_t>
__global__ void broadcast_bias_kernel(out_t* __restrict__ out, const bias_t* __restrict__ bias,
                                      int64_t rows, int64_t cols) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  using acc_t = at::opmath_type<out_t>;
  const out_t v = static_cast<out_t>(static_cast<acc_t>(bias[c]));
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) out[r * cols + c] = v;
}

void broadcast_bias(at::Tensor& out, const at::Tensor& bias) {
  const int64_t rows = out.size(0), cols = out.size(1);
  if (rows == 0 || cols == 0) return;
  const at::Tensor b = bias.contiguous();
  constexpr int threads = 256;
  const dim3 grid(static_cast<unsigned>((cols + threads - 1) / threads),
                  static_cast<unsigned>(std::min<int64_t>(rows, 1024)));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "group_fc_bias", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "group_fc_bias", [&] {
      broadcast_bias_kernel<out_t, scalar_t><<<grid, threads, 0, stream>>>(
          out.data_ptr<out_t>(), b.const_data_ptr<scalar_t>(), rows, cols);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// out[c] = sum_r grad[r, c] in the accumulation type: a block owns kCols columns and
// kRows threads per column stride over the rows; the partial sums are then added in a fixed
// order in shared memory (deterministic, no atomics).
constexpr int kCols = 32;
constexpr int kRows = 16;

template <typename grad_t, typename out_t>
__global__ void column_sum_kernel(const grad_t* __restrict__ grad, int64_t rows, int64_t cols,
                                  int64_t ld, out_t* __restrict__ out) {
  using acc_t = at::opmath_type<grad_t>;
  __shared__ acc_t partial[kRows][kCols];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  acc_t acc = 0;
  if (c < cols) {
    for (int64_t r = threadIdx.y; r < rows; r += kRows) acc += static_cast<acc_t>(grad[r * ld + c]);
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    acc_t sum = 0;
    for (int i = 0; i < kRows; ++i) sum += partial[i][threadIdx.x];
    out[c] = static_cast<out_t>(sum);
  }
}

at::Tensor group_fc_cuda(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                         int64_t num_classes) {
  const GroupFcShape s = check_forward_args(h, weight, bias, num_classes);
  const c10::cuda::CUDAGuard guard(h.device());
  if (s.zsl) return zsl_forward(h, weight, bias);
  const at::ScalarType out_type = forward_output_type(h, bias);
  at::Tensor out = empty_output({s.batch, s.num_classes}, h.options().dtype(out_type));
  if (s.batch == 0) return out;
  broadcast_bias(out, bias);
  if (s.dim == 0) return out;
  // cuBLAS takes half-precision products into fp32 logits (the autocast case) directly; any
  // other widening (e.g. an fp64 bias) computes in the output type.
  const bool half_to_float = out_type == at::kFloat &&
                             (h.scalar_type() == at::kHalf || h.scalar_type() == at::kBFloat16);
  const bool upcast = out_type != h.scalar_type() && !half_to_float;
  const HLayout hl = h_layout(upcast ? h.to(out_type) : h);
  const at::Tensor w = upcast ? weight.to(out_type).contiguous() : weight.contiguous();
  const at::ScalarType ab_type = w.scalar_type();
  const int64_t G = s.group_size, D = s.dim, C = s.num_classes;
  const int64_t full = s.full_groups(), tail = s.tail();
  const auto* w_ptr = static_cast<const char*>(w.const_data_ptr());
  const auto* h_ptr = static_cast<const char*>(hl.t.const_data_ptr());
  auto* out_ptr = static_cast<char*>(out.data_ptr());
  const int64_t es = w.element_size(), out_es = out.element_size();
  // out_k (G x B, ld C) = W_k (G x D, ld G) * h_k (D x B, ld h.stride(0)) + bias
  strided_gemm(ab_type, out_type, false, false, G, s.batch, D, w_ptr, G, D * G, h_ptr, hl.ld,
               hl.group_stride, true, out_ptr, C, G, full);
  if (tail > 0) {
    strided_gemm(ab_type, out_type, false, false, tail, s.batch, D, w_ptr + full * D * G * es, G,
                 0, h_ptr + full * hl.group_stride * es, hl.ld, 0, true,
                 out_ptr + full * G * out_es, C, 0, 1);
  }
  return out;
}

at::Tensor group_fc_grad_h_cuda(const at::Tensor& grad, const at::Tensor& h,
                                const at::Tensor& weight, int64_t num_classes) {
  const GroupFcShape s = check_grad_args(grad, weight, num_classes, &h, "group_fc_grad_h");
  const c10::cuda::CUDAGuard guard(grad.device());
  if (s.zsl) return zsl_grad_h(grad, h, weight);
  at::Tensor grad_h = empty_grad_h(h, weight);
  if (grad_h.numel() == 0) return grad_h;
  const GradHTarget target = grad_h_target(grad_h);
  const GradLayout gl = grad_layout(grad.to(weight.scalar_type()));
  const at::Tensor w = weight.contiguous();
  const int64_t G = s.group_size, D = s.dim;
  const int64_t full = s.full_groups(), tail = s.tail();
  const auto* w_ptr = static_cast<const char*>(w.const_data_ptr());
  const auto* g_ptr = static_cast<const char*>(gl.t.const_data_ptr());
  auto* gh_ptr = static_cast<char*>(target.t.data_ptr());
  const int64_t es = weight.element_size();
  const at::ScalarType type = weight.scalar_type();
  // grad_h_k (D x B, ld = row stride of grad_h) = W_k^T (D x G) * grad_k (G x B, ld C)
  strided_gemm(type, type, true, false, D, s.batch, G, w_ptr, G, D * G, g_ptr, gl.ld, G, false,
               gh_ptr, target.ld, target.group_stride, full);
  if (tail > 0) {
    strided_gemm(type, type, true, false, D, s.batch, tail, w_ptr + full * D * G * es, G, 0,
                 g_ptr + full * G * es, gl.ld, 0, false,
                 gh_ptr + full * target.group_stride * es, target.ld, 0, 1);
  }
  finish_grad_h(target, grad_h, s.used_groups());
  return grad_h;
}

at::Tensor group_fc_grad_weight_cuda(const at::Tensor& grad, const at::Tensor& h,
                                     const at::Tensor& weight, int64_t num_classes) {
  const GroupFcShape s = check_grad_args(grad, weight, num_classes, &h, "group_fc_grad_weight");
  const c10::cuda::CUDAGuard guard(grad.device());
  if (s.zsl) return zsl_grad_weight(grad, h, weight);
  at::Tensor grad_w = empty_output({s.groups, s.dim, s.group_size}, h.options());
  if (grad_w.numel() == 0) return grad_w;
  if (s.batch == 0) return grad_w.zero_();
  const GradLayout gl = grad_layout(grad.to(weight.scalar_type()));
  const HLayout hl = h_layout(h);
  const int64_t G = s.group_size, D = s.dim, K = s.groups;
  const int64_t full = s.full_groups(), tail = s.tail(), used = s.used_groups();
  const auto* g_ptr = static_cast<const char*>(gl.t.const_data_ptr());
  const auto* h_ptr = static_cast<const char*>(hl.t.const_data_ptr());
  auto* gw_ptr = static_cast<char*>(grad_w.data_ptr());
  const int64_t es = h.element_size();
  const at::ScalarType type = h.scalar_type();
  // grad_W_k (G x D, ld G) = grad_k (G x B, ld C) * h_k^T (B x D)
  strided_gemm(type, type, false, true, G, D, s.batch, g_ptr, gl.ld, G, h_ptr, hl.ld,
               hl.group_stride, false, gw_ptr, G, D * G, full);
  if (tail > 0) {
    strided_gemm(type, type, false, true, tail, D, s.batch, g_ptr + full * G * es, gl.ld, 0,
                 h_ptr + full * hl.group_stride * es, hl.ld, 0, false, gw_ptr + full * D * G * es,
                 G, 0, 1);
    grad_w.select(0, full).narrow(1, tail, G - tail).zero_();  // padded columns: no gradient
  }
  if (used < K) grad_w.narrow(0, used, K - used).zero_();
  return grad_w;
}

at::Tensor group_fc_grad_bias_cuda(const at::Tensor& grad, const at::Tensor& bias) {
  const bool sum_all = check_grad_bias_args(grad, bias);
  const c10::cuda::CUDAGuard guard(grad.device());
  if (sum_all) return sum_all_grad_bias(grad, bias);
  const GradLayout gl = grad_layout(grad);
  const int64_t rows = grad.size(0), cols = grad.size(1);
  at::Tensor out = empty_output({cols}, bias.options());
  if (cols == 0) return out;
  const dim3 block(kCols, kRows);
  const dim3 grid(static_cast<unsigned>((cols + kCols - 1) / kCols));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "group_fc_grad_bias", [&] {
    using grad_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "group_fc_grad_bias", [&] {
      column_sum_kernel<grad_t, scalar_t><<<grid, block, 0, stream>>>(
          gl.t.const_data_ptr<grad_t>(), rows, cols, gl.ld, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace
}  // namespace mldecoder_fast

TORCH_LIBRARY_IMPL(mldecoder_fast, CUDA, m) {
  m.impl("group_fc", &mldecoder_fast::group_fc_cuda);
  m.impl("group_fc_grad_h", &mldecoder_fast::group_fc_grad_h_cuda);
  m.impl("group_fc_grad_weight", &mldecoder_fast::group_fc_grad_weight_cuda);
  m.impl("group_fc_grad_bias", &mldecoder_fast::group_fc_grad_bias_cuda);
}
