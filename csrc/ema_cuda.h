// C interface between the torch binding (ema_cuda_binding.cpp) and the CUDA kernel
// (ema_kernel.cu). Plain pointers and sizes only, so the .cu never includes torch headers and
// compiles with nvcc alone in about a second.
#pragma once
#include <cstdint>

#ifdef __cplusplus
extern "C" {
#endif

// Element types understood by the kernel.
enum FastmmtEmaDtype { FASTMMT_EMA_F32 = 0, FASTMMT_EMA_F16 = 1, FASTMMT_EMA_BF16 = 2 };

// teacher[i] <- a * teacher[i] + b * student[i] for n tensors of numel[i] elements each, all of
// `dtype`, on the current device, enqueued on `stream` (a cudaStream_t). Arithmetic is fp32
// (two products and a sum, each rounded; no FMA), the result rounded once to `dtype`.
// Returns 0 or a cudaError_t code.
int fastmmt_ema_cuda_launch(void* const* teacher, const void* const* student, const int64_t* numel,
                            int n, int dtype, float a, float b, void* stream);

// The calling thread's last CUDA runtime error (cudaGetLastError: returned and cleared), 0 if
// none. Called before the launch, so that an error left by earlier work is not taken for the
// EMA kernel's.
int fastmmt_cuda_take_pending_error(void);

// Human-readable text for a code returned by fastmmt_ema_cuda_launch.
const char* fastmmt_ema_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif
