// What the CPU kernels share: float32 matrix products on packed operands with an AVX2/FMA
// micro-kernel, a vectorised exp, and the split of work among XLA's CPU threads.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <cstddef>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// The vendor's float32 GEMM, cblas_sgemm's signature (row-major = 101, no transpose = 111,
// transpose = 112): MKL's, handed over by Python where it is installed (`diffprog_use_sgemm`,
// lstm.cc); null: the kernels multiply with the micro-kernel below.
using Sgemm = void (*)(int layout, int transpose_a, int transpose_b, int m, int n, int k, float alpha,
                       const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
inline std::atomic<Sgemm> vendor_sgemm{nullptr};

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

constexpr int kRows = 6;     // rows of C per micro-kernel call
constexpr int kCols = 16;    // columns of C per micro-kernel call (two 8-float vectors)

__m256i column_mask(int n) {  // lanes < n set
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The lanes [j, min(j + 8, n)) of a row: whole vectors where they fit, masked at the row's end
// (a masked store is many times slower than a plain one on AMD's cores).
struct Lanes {
  bool whole;
  __m256i mask;
  explicit Lanes(int left) : whole(left >= 8), mask(column_mask(left)) {}
  __m256 load(const float* p) const { return whole ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask); }
  void store(float* p, __m256 v) const { whole ? _mm256_storeu_ps(p, v) : _mm256_maskstore_ps(p, mask, v); }
};

// B operands are packed: panels of 16 columns, each panel its `rows` × 16 values contiguous
// (zero past the last column), so the micro-kernel reads B sequentially whatever its source.
size_t packed_size(int rows, int cols) { return static_cast<size_t>(rows) * ((cols + kCols - 1) / kCols * kCols); }

void pack(const float* x, long ldx, int rows, int cols, float* out) {  // B = x (rows × cols)
  for (int j = 0; j < cols; j += kCols, out += static_cast<size_t>(rows) * kCols) {
    const __m256i m0 = column_mask(cols - j), m1 = column_mask(cols - j - 8);
    for (int r = 0; r < rows; ++r) {
      _mm256_storeu_ps(out + r * kCols, _mm256_maskload_ps(x + r * ldx + j, m0));
      _mm256_storeu_ps(out + r * kCols + 8, _mm256_maskload_ps(x + r * ldx + j + 8, m1));
    }
  }
}

void pack_transposed(const float* x, long ldx, int rows, int cols, float* out) {  // B = xᵀ (cols × rows)
  for (int j = 0; j < rows; j += kCols, out += static_cast<size_t>(cols) * kCols)
    for (int c = 0; c < kCols; ++c)
      for (int r = 0; r < cols; ++r) out[r * kCols + c] = j + c < rows ? x[(j + c) * ldx + r] : 0.0f;
}

// An A operand: element (r, p) at a[r * lda + p * step] (step 1: row-major; lda 1: A is the
// transpose of a row-major matrix, read in place).
struct Operand {
  const float* a;
  long lda, step;
  Operand at(long r, long p) const { return {a + r * lda + p * step, lda, step}; }
};

// C[R × nr] = A[R × kc] B[kc × 16] for R ≤ 6 rows and nr ≤ 16 columns, B a packed panel.
// Twelve named accumulators (those past R are never used): GCC keeps an array of them in
// memory, storing it every iteration.
template <int R = kRows>
void micro_kernel(int kc, Operand op, const float* b, float* c, long ldc, int nr = kCols) {
  static_assert(R >= 1 && R <= kRows);
  const float* a = op.a;
  const long lda = op.lda;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int p = 0; p < kc; ++p, b += kCols, a += op.step) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 x = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
    if constexpr (R > 1) {
      x = _mm256_broadcast_ss(a + lda);
      c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
    }
    if constexpr (R > 2) {
      x = _mm256_broadcast_ss(a + 2 * lda);
      c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
    }
    if constexpr (R > 3) {
      x = _mm256_broadcast_ss(a + 3 * lda);
      c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
    }
    if constexpr (R > 4) {
      x = _mm256_broadcast_ss(a + 4 * lda);
      c40 = _mm256_fmadd_ps(x, b0, c40), c41 = _mm256_fmadd_ps(x, b1, c41);
    }
    if constexpr (R > 5) {
      x = _mm256_broadcast_ss(a + 5 * lda);
      c50 = _mm256_fmadd_ps(x, b0, c50), c51 = _mm256_fmadd_ps(x, b1, c51);
    }
  }
  const __m256 rows[kRows][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (nr == kCols) {
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(c + r * ldc, rows[r][0]);
      _mm256_storeu_ps(c + r * ldc + 8, rows[r][1]);
    }
  } else {
    const __m256i m0 = column_mask(nr), m1 = column_mask(nr - 8);
    for (int r = 0; r < R; ++r) {
      _mm256_maskstore_ps(c + r * ldc, m0, rows[r][0]);
      _mm256_maskstore_ps(c + r * ldc + 8, m1, rows[r][1]);
    }
  }
}

// C[mr × nr] = A[mr × kc] B for mr ≤ 6 rows and nr ≤ 16 columns, B a packed panel.
void tile(int mr, int kc, Operand a, const float* b, float* c, long ldc, int nr) {
  switch (mr) {
    case 6: micro_kernel<6>(kc, a, b, c, ldc, nr); break;
    case 5: micro_kernel<5>(kc, a, b, c, ldc, nr); break;
    case 4: micro_kernel<4>(kc, a, b, c, ldc, nr); break;
    case 3: micro_kernel<3>(kc, a, b, c, ldc, nr); break;
    case 2: micro_kernel<2>(kc, a, b, c, ldc, nr); break;
    default: micro_kernel<1>(kc, a, b, c, ldc, nr); break;
  }
}

// C[m × n] = A[m × k] B, B packed with k rows; any m and n. Column panels outside, row blocks
// inside, so each panel of B is read from memory once and reused from the L1 cache.
void multiply(int m, int n, int k, Operand a, const float* b, float* c, long ldc) {
  for (int j = 0; j < n; j += kCols)
    for (int i = 0; i < m; i += kRows)
      tile(std::min(kRows, m - i), k, a.at(i, 0), b + static_cast<size_t>(j) * k, c + i * ldc + j, ldc,
           std::min(kCols, n - j));
}

// exp(x) for x ≤ 0; exp(−inf) and underflow give 0. Relative error ~2e-7.
__m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// work(begin, end) over [0, items) in `parts` contiguous ranges (so that no two threads write the
// same cache line), shared among XLA's CPU threads, at most `max_parts` of them. The calling thread
// takes ranges too until none is left, then waits only for ranges that another thread has
// started. It never waits for a task still in the pool's queue: XLA runs independent thunks on
// the pool's own threads, and two kernels each waiting for a queued task of theirs, with every
// pool thread so occupied, would wait forever.
template <class Work>
void in_parallel(ffi::ThreadPool pool, long items, Work work, long max_parts = 1L << 30) {
  if (items <= 0) return;
  const long parts = std::clamp<long>(std::min<long>(pool.num_threads(), max_parts), 1, items);
  struct Progress { std::atomic<long> next{0}, done{0}; };
  auto progress = std::make_shared<Progress>();  // outlives this call for tasks that start late
  auto take = [progress, parts, items, &work] {  // a late task finds no range left, and never touches work
    for (long part = progress->next++; part < parts; part = progress->next++) {
      work(items * part / parts, items * (part + 1) / parts);
      ++progress->done;
    }
  };
  for (long part = 1; part < parts; ++part) pool.Schedule([take] { take(); });
  take();
  while (progress->done.load() < parts) std::this_thread::yield();
}

}  // namespace

#pragma GCC pop_options
