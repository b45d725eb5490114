// Multi-tensor EMA kernel, apex multi_tensor_apply style: the host cuts every tensor into chunks
// of kChunk elements and passes (tensor pointers, sizes, block -> (tensor, chunk) map) by value in
// one kernel-argument struct, so a single launch covers up to kMaxTensors tensors / kMaxBlocks
// chunks. Each block updates one chunk with 16-byte vector loads/stores when both pointers are
// 16-byte aligned, else element by element. No torch headers (see ema_cuda.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ema_cuda.h"

namespace {

constexpr int kMaxTensors = 64;   // tensor pairs per launch
constexpr int kMaxBlocks = 320;   // chunks per launch
constexpr int64_t kChunk = 65536; // elements per chunk (one block)
constexpr int kThreads = 512;

// Kernel argument: 3,136 bytes, under the classic 4 KiB parameter limit.
struct TensorListMeta {
  void* teacher[kMaxTensors];
  const void* student[kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
};
static_assert(sizeof(TensorListMeta) <= 4096, "kernel argument over the 4 KiB limit");

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  __device__ static float load(float x) { return x; }
  __device__ static float store(float x) { return x; }
};
template <> struct Cvt<__half> {
  __device__ static float load(__half x) { return __half2float(x); }
  __device__ static __half store(float x) { return __float2half_rn(x); }
};
template <> struct Cvt<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// Same rounding as the CPU path: a*t and b*s rounded, then their sum (explicit _rn: no FMA).
template <typename T>
__device__ __forceinline__ T ema_one(T t, T s, float a, float b) {
  return Cvt<T>::store(__fadd_rn(__fmul_rn(a, Cvt<T>::load(t)), __fmul_rn(b, Cvt<T>::load(s))));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ema_kernel(TensorListMeta meta, float a, float b) {
  const int tensor = meta.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t rest = meta.numel[tensor] - start;
  const int64_t n = rest < kChunk ? rest : kChunk;
  T* t = static_cast<T*>(meta.teacher[tensor]) + start;
  const T* s = static_cast<const T*>(meta.student[tensor]) + start;

  constexpr int kVec = 16 / sizeof(T);
  int64_t done = 0;
  if (((reinterpret_cast<uintptr_t>(t) | reinterpret_cast<uintptr_t>(s)) & 15) == 0) {
    const int64_t nvec = n / kVec;
    uint4* tv = reinterpret_cast<uint4*>(t);
    const uint4* sv = reinterpret_cast<const uint4*>(s);
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      uint4 tr = tv[i];
      const uint4 sr = sv[i];
      T* te = reinterpret_cast<T*>(&tr);
      const T* se = reinterpret_cast<const T*>(&sr);
#pragma unroll
      for (int k = 0; k < kVec; ++k) te[k] = ema_one(te[k], se[k], a, b);
      tv[i] = tr;
    }
    done = nvec * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) t[i] = ema_one(t[i], s[i], a, b);
}

template <typename T>
int launch_all(void* const* teacher, const void* const* student, const int64_t* numel, int n,
               float a, float b, cudaStream_t stream) {
  TensorListMeta meta;
  int nt = 0;  // tensor slots used in meta
  int nb = 0;  // blocks (chunks) queued in meta
  for (int i = 0; i < n; ++i) {
    if (numel[i] == 0) continue;
    meta.teacher[nt] = teacher[i];
    meta.student[nt] = student[i];
    meta.numel[nt] = numel[i];
    ++nt;
    const int64_t chunks = (numel[i] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[nb] = static_cast<unsigned char>(nt - 1);
      meta.block_to_chunk[nb] = static_cast<int>(c);
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == kMaxBlocks || (nt == kMaxTensors && last_chunk)) {
        ema_kernel<T><<<nb, kThreads, 0, stream>>>(meta, a, b);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return static_cast<int>(err);
        nb = 0;
        if (last_chunk) {
          nt = 0;
        } else {  // the current tensor continues in the next launch, in slot 0
          meta.teacher[0] = meta.teacher[nt - 1];
          meta.student[0] = meta.student[nt - 1];
          meta.numel[0] = meta.numel[nt - 1];
          nt = 1;
        }
      }
    }
  }
  if (nb > 0) {
    ema_kernel<T><<<nb, kThreads, 0, stream>>>(meta, a, b);
    return static_cast<int>(cudaGetLastError());
  }
  return 0;
}

}  // namespace

extern "C" int fastmmt_ema_cuda_launch(void* const* teacher, const void* const* student,
                                       const int64_t* numel, int n, int dtype, float a, float b,
                                       void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case FASTMMT_EMA_F32: return launch_all<float>(teacher, student, numel, n, a, b, st);
    case FASTMMT_EMA_F16: return launch_all<__half>(teacher, student, numel, n, a, b, st);
    case FASTMMT_EMA_BF16: return launch_all<__nv_bfloat16>(teacher, student, numel, n, a, b, st);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int fastmmt_cuda_take_pending_error(void) {
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* fastmmt_ema_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
