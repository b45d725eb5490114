// The exact k-NN search's selection step (knn.cpp), registered in ema.cpp's module.
#pragma once
#include <ATen/core/Tensor.h>

namespace fastmmt {

// In place, CPU, float32: one strip of the symmetric squared-distance matrix, ``d2`` (b, m) holding
// the distances from points first..first+b to points first..first+m (as BLAS computed them, maybe
// slightly negative), goes into the per-point top-k max-heaps ``heap_val`` / ``heap_ids`` (N, k)
// and the row maxima ``row_max`` (N). Each distance is clamped at 0 (exactly 0 from a point to
// itself); it enters a heap when strictly below its root. Rows first..first+b get their strip
// row; the later points first+b..first+m get their column (the same distances, seen from them).
void knn_strip_select_(const at::Tensor& d2, int64_t first, const at::Tensor& heap_val,
                       const at::Tensor& heap_ids, const at::Tensor& row_max);

}  // namespace fastmmt
