// fastmmt._C: multi-tensor mean-teacher update, teacher <- alpha*teacher + (1-alpha)*student,
// in place, for whole parameter lists in one call. Every input is validated before anything is
// written. CPU: one at::parallel_for over all elements of all tensors (flattened, chunked) with
// inner loops the compiler vectorises. CUDA (when built with FASTMMT_WITH_CUDA): a multi-tensor
// kernel, see ema_kernel.cu. The module also carries the memory banks' ordered update
// (memory.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ema.h"
#include "memory.h"

namespace fastmmt {
namespace {

constexpr int64_t kGrain = 1 << 16;  // elements; smaller work runs on the calling thread

bool cuda_built() {
#ifdef FASTMMT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The kernels walk numel() elements from data_ptr(): right for any dense, non-overlapping
// layout (contiguous, channels_last, permuted) as long as teacher and student share it.
bool same_dense_layout(const at::Tensor& t, const at::Tensor& s) {
  if (!t.is_non_overlapping_and_dense() || !s.is_non_overlapping_and_dense()) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) != s.stride(d)) return false;  // size-1 dims: any stride
  }
  return true;
}

void validate(const std::vector<at::Tensor>& teacher, const std::vector<at::Tensor>& student,
              double alpha) {
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha >= 0.0 && alpha <= 1.0,
                    "ema_update_: alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(teacher.size() == student.size(), "ema_update_: ", teacher.size(),
                    " teacher tensors but ", student.size(), " student tensors");
  if (teacher.empty()) return;
  const at::Device device = teacher.front().device();
  const at::ScalarType dtype = teacher.front().scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                    "ema_update_: tensor 0 has dtype ", dtype,
                    "; supported: float32, float16, bfloat16");
  TORCH_CHECK_VALUE(device.is_cpu() || (device.is_cuda() && cuda_built()),
                    "ema_update_: tensors on ", device,
                    " but fastmmt._C was built without CUDA support");
  for (size_t i = 0; i < teacher.size(); ++i) {
    const at::Tensor& t = teacher[i];
    const at::Tensor& s = student[i];
    TORCH_CHECK_VALUE(t.defined() && s.defined(), "ema_update_: tensor ", i, " is undefined");
    TORCH_CHECK_VALUE(t.sizes() == s.sizes(), "ema_update_: tensor ", i, ": teacher shape ",
                      t.sizes(), " != student shape ", s.sizes());
    TORCH_CHECK_VALUE(t.scalar_type() == dtype && s.scalar_type() == dtype, "ema_update_: tensor ",
                      i, ": teacher dtype ", t.scalar_type(), ", student dtype ", s.scalar_type(),
                      "; all tensors must be ", dtype);
    TORCH_CHECK_VALUE(t.device() == device && s.device() == device, "ema_update_: tensor ", i,
                      ": teacher on ", t.device(), ", student on ", s.device(),
                      "; all tensors must be on ", device);
    TORCH_CHECK_VALUE(same_dense_layout(t, s), "ema_update_: tensor ", i,
                      " must be dense (no gaps, no overlaps) with the same memory layout in teacher "
                      "and student (teacher strides ", t.strides(), ", student strides ", s.strides(),
                      ")");
  }
}

// The inner loop: fp32 arithmetic (two rounded products, a rounded sum: no FMA, as the "avx2"
// target does not enable it), one final rounding. Cloned for AVX2 and the baseline ISA, picked at
// load time: 256-bit vectors were ~25% faster than SSE2 on the benchmark CPU (bench/results/ema.md).
template <typename T>
inline void ema_loop(T* __restrict__ t, const T* __restrict__ s, int64_t n, float a, float b) {
  for (int64_t i = 0; i < n; ++i) {
    t[i] = static_cast<T>(a * static_cast<float>(t[i]) + b * static_cast<float>(s[i]));
  }
}

__attribute__((target_clones("avx2", "default")))
void ema_range(float* __restrict__ t, const float* __restrict__ s, int64_t n, float a, float b) {
  ema_loop(t, s, n, a, b);
}
__attribute__((target_clones("avx2", "default")))
void ema_range(c10::Half* __restrict__ t, const c10::Half* __restrict__ s, int64_t n, float a,
               float b) {
  ema_loop(t, s, n, a, b);
}
__attribute__((target_clones("avx2", "default")))
void ema_range(c10::BFloat16* __restrict__ t, const c10::BFloat16* __restrict__ s, int64_t n,
               float a, float b) {
  ema_loop(t, s, n, a, b);
}

template <typename T>
void ema_cpu(const std::vector<at::Tensor>& teacher, const std::vector<at::Tensor>& student,
             float a, float b) {
  const size_t n = teacher.size();
  std::vector<T*> t_ptr(n);
  std::vector<const T*> s_ptr(n);
  std::vector<int64_t> offset(n + 1, 0);  // prefix sums of numel: the flattened work
  for (size_t i = 0; i < n; ++i) {
    t_ptr[i] = teacher[i].data_ptr<T>();
    s_ptr[i] = student[i].data_ptr<T>();
    offset[i + 1] = offset[i] + teacher[i].numel();
  }
  at::parallel_for(0, offset[n], kGrain, [&](int64_t begin, int64_t end) {
    // Tensor holding element `begin`: last offset <= begin (empty tensors are skipped).
    size_t i = std::upper_bound(offset.begin(), offset.end(), begin) - offset.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offset[i + 1]);
      const int64_t local = begin - offset[i];
      ema_range(t_ptr[i] + local, s_ptr[i] + local, stop - begin, a, b);
      begin = stop;
      ++i;
    }
  });
}

void ema_update_(const std::vector<at::Tensor>& teacher, const std::vector<at::Tensor>& student,
                 double alpha) {
  validate(teacher, student, alpha);
  if (teacher.empty()) return;
#ifdef FASTMMT_WITH_CUDA
  // An error left by earlier CUDA work would otherwise surface after the launch as the EMA's.
  if (teacher.front().is_cuda()) ema_cuda_check_pending();
#endif
  // Writes through data pointers bypass autograd: bump versions as an in-place op would (before
  // writing, so a tensor that refuses the bump leaves everything untouched).
  for (const at::Tensor& t : teacher) t.unsafeGetTensorImpl()->bump_version();
  const float a = static_cast<float>(alpha);
  const float b = static_cast<float>(1.0 - alpha);
  if (teacher.front().is_cuda()) {
#ifdef FASTMMT_WITH_CUDA
    ema_update_cuda(teacher, student, a, b);
#endif
  } else {
    switch (teacher.front().scalar_type()) {
      case at::kFloat: ema_cpu<float>(teacher, student, a, b); break;
      case at::kHalf: ema_cpu<c10::Half>(teacher, student, a, b); break;
      default: ema_cpu<c10::BFloat16>(teacher, student, a, b); break;
    }
  }
}

}  // namespace
}  // namespace fastmmt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastmmt multi-tensor EMA (mean-teacher) update and memory-bank ordered update";
  m.def("ema_update_", &fastmmt::ema_update_, pybind11::arg("teacher_tensors"),
        pybind11::arg("student_tensors"), pybind11::arg("alpha"),
        "teacher <- alpha*teacher + (1-alpha)*student for every pair, in place (fp32 arithmetic). "
        "Validates all inputs before writing.");
  m.def("memory_ordered_update_", &fastmmt::memory_ordered_update_, pybind11::arg("memory"),
        pybind11::arg("x"), pybind11::arg("indexes"), pybind11::arg("momentum"),
        pybind11::arg("hard") = false,
        "CPU, in place: memory[indexes[j]] <- m c + (1-m) x_j, c <- c/|c|, per row in batch order "
        "(hard: once per row, its least similar sample). Validates all inputs before writing.");
  m.def("has_cuda", &fastmmt::cuda_built, "True when this build contains the CUDA kernel.");
  m.def("num_threads", &at::get_num_threads, "Threads at::parallel_for uses for the CPU path.");
}
