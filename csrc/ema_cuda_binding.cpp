// Torch side of the CUDA path (c10 CUDA headers only: no cuBLAS/cuSPARSE headers needed): turns validated tensor lists into raw pointers and sizes and calls
// the launcher in ema_kernel.cu on the current stream of the tensors' device. Compiled only when
// the extension is built with CUDA (FASTMMT_WITH_CUDA).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "ema.h"
#include "ema_cuda.h"

namespace fastmmt {

void ema_update_cuda(const std::vector<at::Tensor>& teacher, const std::vector<at::Tensor>& student,
                     float a, float b) {
  const c10::cuda::CUDAGuard guard(teacher.front().device());
  int code = FASTMMT_EMA_F32;
  switch (teacher.front().scalar_type()) {
    case at::kFloat: code = FASTMMT_EMA_F32; break;
    case at::kHalf: code = FASTMMT_EMA_F16; break;
    case at::kBFloat16: code = FASTMMT_EMA_BF16; break;
    default: TORCH_CHECK(false, "ema_update_: unsupported dtype ", teacher.front().scalar_type());
  }
  std::vector<void*> t_ptr;
  std::vector<const void*> s_ptr;
  std::vector<int64_t> numel;
  t_ptr.reserve(teacher.size());
  s_ptr.reserve(teacher.size());
  numel.reserve(teacher.size());
  for (size_t i = 0; i < teacher.size(); ++i) {
    t_ptr.push_back(teacher[i].data_ptr());
    s_ptr.push_back(student[i].data_ptr());
    numel.push_back(teacher[i].numel());
  }
  const int err = fastmmt_ema_cuda_launch(t_ptr.data(), s_ptr.data(), numel.data(),
                                          static_cast<int>(t_ptr.size()), code, a, b,
                                          c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "ema_update_: CUDA kernel launch failed: ",
              fastmmt_ema_cuda_error_string(err));
}

void ema_cuda_check_pending() {
  const int pending = fastmmt_cuda_take_pending_error();
  TORCH_CHECK(pending == 0, "a CUDA error from earlier work was pending when ema_update_ was called "
              "(nothing was updated; the error is not the EMA kernel's): ",
              fastmmt_ema_cuda_error_string(pending));
}

}  // namespace fastmmt
