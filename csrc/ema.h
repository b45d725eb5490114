// Shared by the CPU module (ema.cpp) and the CUDA binding (ema_cuda_binding.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace fastmmt {

// Teacher/student lists already validated by ema.cpp: same length, pairwise same shape, one
// dtype (float32/float16/bfloat16), one CUDA device, all contiguous.
// teacher[i] <- a * teacher[i] + b * student[i] on the current CUDA stream.
void ema_update_cuda(const std::vector<at::Tensor>& teacher, const std::vector<at::Tensor>& student,
                     float a, float b);

}  // namespace fastmmt
