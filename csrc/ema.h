// Shared by the CPU module (ema.cpp) and the CUDA binding (ema_cuda_binding.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace fastmmt {

// Teacher/student lists already validated by ema.cpp: same length, pairwise same shape, one
// dtype (float32/float16/bfloat16), one CUDA device, each pair dense with one shared layout.
// teacher[i] <- a * teacher[i] + b * student[i] on the current CUDA stream.
void ema_update_cuda(const std::vector<at::Tensor>& teacher, const std::vector<at::Tensor>& student,
                     float a, float b);

// Raise (naming it as earlier work's) a CUDA error still pending on this thread, before the EMA
// launch, so that it is not reported as the EMA kernel's failure. Clears it.
void ema_cuda_check_pending();

}  // namespace fastmmt
