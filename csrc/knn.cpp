// fastmmt._C: the selection step of the exact k-NN search (fastmmt.cluster.knn) on the CPU. The
// search computes the symmetric squared-distance matrix once per pair, in row strips (BLAS); each
// strip feeds the top-k of its own rows (its rows) and of the later points (its columns). Done in
// NumPy and FAISS's heaps, that costs a clamp pass, two max passes, a transposed copy of the strip
// and two heap passes; here it is two passes that read the strip: rows in parallel for the strip's
// own points, column tiles in parallel for the later points (each thread owns its columns' heaps,
// so no two threads touch one heap).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "knn.h"

namespace fastmmt {
namespace {

constexpr int64_t kRowGrain = 1 << 15;  // strip entries per chunk of rows
constexpr int64_t kTile = 256;          // later points (columns) per chunk

// Replace the root (the largest) of a max-heap of k (value, id) pairs, root at [0], children of
// i at 2i + 1 and 2i + 2, by (v, id), and restore the heap.
inline void replace_top(float* val, int64_t* ids, int64_t k, float v, int64_t id) {
  int64_t i = 0;
  while (true) {
    const int64_t l = 2 * i + 1;
    if (l >= k) break;
    const int64_t c = (l + 1 < k && val[l + 1] > val[l]) ? l + 1 : l;
    if (val[c] <= v) break;
    val[i] = val[c];
    ids[i] = ids[c];
    i = c;
  }
  val[i] = v;
  ids[i] = id;
}

void validate(const at::Tensor& d2, int64_t first, const at::Tensor& heap_val, const at::Tensor& heap_ids,
              const at::Tensor& row_max) {
  for (const at::Tensor* t : {&d2, &heap_val, &heap_ids, &row_max}) {
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->is_contiguous(),
                      "knn_strip_select_: every tensor must be a contiguous CPU tensor, got one on ",
                      t->device(), " with strides ", t->strides());
  }
  TORCH_CHECK_VALUE(d2.dim() == 2 && d2.scalar_type() == at::kFloat,
                    "knn_strip_select_: the strip must be 2-D float32, got ", d2.scalar_type(), " of shape ",
                    d2.sizes());
  TORCH_CHECK_VALUE(heap_val.dim() == 2 && heap_val.scalar_type() == at::kFloat && heap_val.size(1) >= 1 &&
                        heap_ids.sizes() == heap_val.sizes() && heap_ids.scalar_type() == at::kLong,
                    "knn_strip_select_: the heaps must be float32 values and int64 ids of one shape (N, k), "
                    "k >= 1, got ", heap_val.scalar_type(), " ", heap_val.sizes(), " and ",
                    heap_ids.scalar_type(), " ", heap_ids.sizes());
  const int64_t n = heap_val.size(0);
  TORCH_CHECK_VALUE(row_max.dim() == 1 && row_max.size(0) == n && row_max.scalar_type() == at::kFloat,
                    "knn_strip_select_: row_max must be float32 of shape (", n, "), got ",
                    row_max.scalar_type(), " ", row_max.sizes());
  TORCH_CHECK_VALUE(first >= 0 && d2.size(0) <= d2.size(1) && first + d2.size(1) <= n,
                    "knn_strip_select_: a strip of shape ", d2.sizes(), " from point ", first,
                    " does not fit ", n, " points (rows first..first+b against points first..first+m, b <= m)");
}

}  // namespace

void knn_strip_select_(const at::Tensor& d2, int64_t first, const at::Tensor& heap_val,
                       const at::Tensor& heap_ids, const at::Tensor& row_max) {
  validate(d2, first, heap_val, heap_ids, row_max);
  const int64_t b = d2.size(0), m = d2.size(1), k = heap_val.size(1);
  const float* dist = d2.data_ptr<float>();
  float* hv = heap_val.data_ptr<float>();
  int64_t* hi = heap_ids.data_ptr<int64_t>();
  float* rmax = row_max.data_ptr<float>();
  // the strip's own points: row i of the strip is point first + i against points first..first+m
  at::parallel_for(0, b, std::max<int64_t>(1, kRowGrain / std::max<int64_t>(1, m)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = dist + i * m;
      float* val = hv + (first + i) * k;
      int64_t* ids = hi + (first + i) * k;
      float top = rmax[first + i];
      for (int64_t j = 0; j < m; ++j) {
        const float v = j == i ? 0.0f : (row[j] > 0.0f ? row[j] : 0.0f);
        top = v > top ? v : top;
        if (v < val[0]) replace_top(val, ids, k, v, first + j);
      }
      rmax[first + i] = top;
    }
  });
  if (m == b) return;
  // the later points first+b..first+m: column j of the strip, in tiles of columns
  const int64_t tiles = (m - b + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kth(kTile), top(kTile);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = b + t * kTile, c1 = std::min(m, c0 + kTile), w = c1 - c0;
      for (int64_t c = 0; c < w; ++c) {
        kth[c] = hv[(first + c0 + c) * k];
        top[c] = rmax[first + c0 + c];
      }
      for (int64_t i = 0; i < b; ++i) {
        const float* row = dist + i * m + c0;
        for (int64_t c = 0; c < w; ++c) {
          const float v = row[c] > 0.0f ? row[c] : 0.0f;  // c0 + c >= b > i: never the point itself
          top[c] = v > top[c] ? v : top[c];
          if (v < kth[c]) {
            float* val = hv + (first + c0 + c) * k;
            replace_top(val, hi + (first + c0 + c) * k, k, v, first + i);
            kth[c] = val[0];
          }
        }
      }
      for (int64_t c = 0; c < w; ++c) rmax[first + c0 + c] = top[c];
    }
  });
}

}  // namespace fastmmt
