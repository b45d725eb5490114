// The memory-bank ordered momentum update (memory.cpp), registered in ema.cpp's module.
#pragma once
#include <ATen/core/Tensor.h>

namespace fastmmt {

// In place, CPU: for every sample j in batch order, memory[indexes[j]] <- m c + (1 - m) x_j,
// then c <- c / |c| (rows in parallel, the samples of one row in batch order); ``hard``: once per
// row with its sample of lowest x_j . c (the first on ties). Validates everything before writing.
void memory_ordered_update_(const at::Tensor& memory, const at::Tensor& x, const at::Tensor& indexes,
                            double momentum, bool hard);

}  // namespace fastmmt
