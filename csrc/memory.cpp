// fastmmt._C: the ordered momentum update of a memory bank (Cluster Contrast's ClusterMemory,
// SpCL's HybridMemory) on the CPU. The batch's sample positions are grouped by memory row (a
// stable counting sort: batch order kept within a row); at::parallel_for then runs distinct rows
// on distinct threads, each walking its samples in batch order. Arithmetic in the memory's dtype
// (float32 or float64), the sums of squares and similarities accumulated in float64.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "memory.h"

namespace fastmmt {
namespace {

constexpr int64_t kGrain = 1 << 15;  // element updates; less work runs on the calling thread

void validate(const at::Tensor& memory, const at::Tensor& x, const at::Tensor& indexes, double momentum) {
  TORCH_CHECK_VALUE(memory.dim() == 2, "memory_ordered_update_: the memory must be 2-D, got ",
                    memory.dim(), "-D");
  TORCH_CHECK_VALUE(memory.device().is_cpu() && x.device().is_cpu() && indexes.device().is_cpu(),
                    "memory_ordered_update_: the ext backend runs on CPU tensors, got memory on ",
                    memory.device(), ", inputs on ", x.device(), ", indexes on ", indexes.device());
  TORCH_CHECK_VALUE(memory.scalar_type() == at::kFloat || memory.scalar_type() == at::kDouble,
                    "memory_ordered_update_: the memory must be float32 or float64, got ",
                    memory.scalar_type());
  TORCH_CHECK_VALUE(memory.size(1) <= 1 || memory.stride(1) == 1,
                    "memory_ordered_update_: the memory must have contiguous rows (stride 1 along "
                    "features), got strides ", memory.strides());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == memory.size(1), "memory_ordered_update_: inputs ",
                    x.sizes(), " do not match the memory's ", memory.size(1), " features");
  TORCH_CHECK_VALUE(x.is_floating_point(), "memory_ordered_update_: inputs must be floating point, got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(indexes.dim() == 1 && indexes.size(0) == x.size(0) &&
                        indexes.scalar_type() == at::kLong,
                    "memory_ordered_update_: indexes must be an int64 vector of ", x.size(0),
                    " entries, got ", indexes.scalar_type(), " of shape ", indexes.sizes());
  TORCH_CHECK_VALUE(std::isfinite(momentum), "memory_ordered_update_: momentum must be finite, got ",
                    momentum);
}

// The samples of each row, in batch order: pos[start[g]:start[g + 1]] belong to row rows[g].
struct Groups {
  std::vector<int64_t> rows, start, pos;
};

Groups group_by_row(const int64_t* idx, int64_t b, int64_t k) {
  Groups out;
  std::vector<int64_t> slot(static_cast<size_t>(k), -1);  // row -> its group
  std::vector<int64_t> count;
  for (int64_t j = 0; j < b; ++j) {
    const int64_t r = idx[j];
    TORCH_CHECK_INDEX(r >= 0 && r < k, "memory_ordered_update_: index ", r, " of sample ", j,
                      " is outside the memory's rows [0, ", k, ")");
    if (slot[r] < 0) {
      slot[r] = static_cast<int64_t>(out.rows.size());
      out.rows.push_back(r);
      count.push_back(0);
    }
    ++count[slot[r]];
  }
  out.start.assign(out.rows.size() + 1, 0);
  for (size_t g = 0; g < count.size(); ++g) out.start[g + 1] = out.start[g] + count[g];
  std::vector<int64_t> fill(out.start.begin(), out.start.end() - 1);
  out.pos.resize(static_cast<size_t>(b));
  for (int64_t j = 0; j < b; ++j) out.pos[fill[slot[idx[j]]]++] = j;
  return out;
}

// c <- m c + (1 - m) x, then c <- c / |c|. The sums are vectorised reductions (omp simd: several
// partial sums, added at the end), else each addition waits for the one before.
template <typename T>
inline void step_impl(T* __restrict__ c, const T* __restrict__ x, int64_t d, T m, T one_m) {
  double ss = 0.0;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < d; ++i) {
    const T v = m * c[i] + one_m * x[i];
    c[i] = v;
    ss += static_cast<double>(v) * static_cast<double>(v);
  }
  const T norm = static_cast<T>(std::sqrt(ss));
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) c[i] /= norm;
}

template <typename T>
inline double dot_impl(const T* __restrict__ a, const T* __restrict__ b, int64_t d) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return s;
}

// Cloned for AVX2 and the baseline ISA, picked at load time (as ema.cpp's loops).
__attribute__((target_clones("avx2", "default")))
void step(float* __restrict__ c, const float* __restrict__ x, int64_t d, float m, float one_m) {
  step_impl(c, x, d, m, one_m);
}
__attribute__((target_clones("avx2", "default")))
void step(double* __restrict__ c, const double* __restrict__ x, int64_t d, double m, double one_m) {
  step_impl(c, x, d, m, one_m);
}
__attribute__((target_clones("avx2", "default")))
double dot(const float* __restrict__ a, const float* __restrict__ b, int64_t d) {
  return dot_impl(a, b, d);
}
__attribute__((target_clones("avx2", "default")))
double dot(const double* __restrict__ a, const double* __restrict__ b, int64_t d) {
  return dot_impl(a, b, d);
}

template <typename T>
void update_rows(const at::Tensor& memory, const at::Tensor& x, const Groups& g, double momentum,
                 bool hard) {
  const int64_t d = memory.size(1);
  const int64_t n_groups = static_cast<int64_t>(g.rows.size());
  const int64_t b = x.size(0);
  T* mem = memory.data_ptr<T>();
  const T* xs = x.data_ptr<T>();
  const int64_t ms = memory.stride(0), xstride = x.stride(0);
  const T m = static_cast<T>(momentum), one_m = static_cast<T>(1.0 - momentum);
  // grain in rows: about kGrain element updates per chunk at this batch's samples per row
  const int64_t per_row = hard ? 2 : std::max<int64_t>(1, b / std::max<int64_t>(1, n_groups));
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, d * per_row));
  at::parallel_for(0, n_groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin; gi < end; ++gi) {
      T* c = mem + g.rows[gi] * ms;
      const int64_t* p = g.pos.data() + g.start[gi];
      const int64_t n = g.start[gi + 1] - g.start[gi];
      if (hard) {  // the similarities all read the row as it was: one update per row
        int64_t pick = p[0];
        double best = std::numeric_limits<double>::infinity();
        for (int64_t s = 0; s < n; ++s) {
          const double sim = dot(xs + p[s] * xstride, c, d);
          if (sim < best) {
            best = sim;
            pick = p[s];
          }
        }
        step(c, xs + pick * xstride, d, m, one_m);
      } else {
        for (int64_t s = 0; s < n; ++s) step(c, xs + p[s] * xstride, d, m, one_m);
      }
    }
  });
}

}  // namespace

void memory_ordered_update_(const at::Tensor& memory, const at::Tensor& x, const at::Tensor& indexes,
                            double momentum, bool hard) {
  validate(memory, x, indexes, momentum);
  const at::Tensor xc = x.to(memory.scalar_type()).contiguous();
  const at::Tensor idx = indexes.contiguous();
  const int64_t b = xc.size(0);
  if (b == 0 || memory.size(1) == 0) return;
  const Groups groups = group_by_row(idx.data_ptr<int64_t>(), b, memory.size(0));  // checks the range
  // Writes through data pointers bypass autograd: bump the version as an in-place op would.
  memory.unsafeGetTensorImpl()->bump_version();
  if (memory.scalar_type() == at::kFloat) {
    update_rows<float>(memory, xc, groups, momentum, hard);
  } else {
    update_rows<double>(memory, xc, groups, momentum, hard);
  }
}

}  // namespace fastmmt
