// What the CPU kernels share: float32 vectors at the CPU's native width, matrix products on
// packed operands with a register-tiled micro-kernel, a vectorised exp, and the split of work
// among XLA's CPU threads.
//
// The kernels are compiled on the user's machine with -march=native, and `simd` below is the
// one place that knows the vector width: 16 floats (AVX-512) where the compiler targets
// AVX512F, else 8 (AVX2 + FMA). Every loop is written against `simd` and `kLanes`.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// The vendor's GEMM with a packed operand, MKL's {cblas_sgemm, cblas_gemm_bf16bf16f32} ×
// {_pack_get_size, _pack, _compute} (row-major = 101, no transpose = 111, transpose = 112,
// packed = 151, B matrix = 162; bfloat16 as its uint16_t bits): handed over by Python where MKL
// is installed (`diffprog_use_sgemm`, lstm.cc); null: the kernels multiply with the micro-kernel
// below.
struct PackedGemms {
  size_t (*size)(int identifier, int m, int n, int k);
  void (*pack)(int layout, int identifier, int transpose, int m, int n, int k, float alpha, const float* src,
               int ld, float* dest);
  void (*compute)(int layout, int transpose_a, int transpose_b, int m, int n, int k, const float* a, int lda,
                  const float* b, int ldb, float beta, float* c, int ldc);
  size_t (*size_bf16)(int identifier, int m, int n, int k);
  void (*pack_bf16)(int layout, int identifier, int transpose, int m, int n, int k, const uint16_t* src, int ld,
                    uint16_t* dest);
  void (*compute_bf16)(int layout, int transpose_a, int transpose_b, int m, int n, int k, float alpha,
                       const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);
};
inline std::atomic<const PackedGemms*> vendor_gemms{nullptr};

namespace simd {

#if defined(__AVX512F__)
using vec = __m512;       // kLanes floats
using mask = __mmask16;   // one bit a lane
constexpr int kLanes = 16;
inline vec zero() { return _mm512_setzero_ps(); }
inline vec splat(float x) { return _mm512_set1_ps(x); }
inline vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline mask first(int n) { return n >= kLanes ? 0xFFFF : n <= 0 ? 0 : static_cast<mask>((1u << n) - 1); }
inline mask both(mask a, mask b) { return a & b; }
inline vec load(const float* p, mask m) { return _mm512_maskz_loadu_ps(m, p); }  // 0 outside m
inline void store(float* p, mask m, vec v) { _mm512_mask_storeu_ps(p, m, v); }
inline vec select(mask m, vec a, vec b) { return _mm512_mask_blend_ps(m, b, a); }  // a in m, b outside
inline vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }     // a b + c
inline vec fnmadd(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }   // c − a b
inline vec fmsub(vec a, vec b, vec c) { return _mm512_fmsub_ps(a, b, c); }     // a b − c
inline vec min(vec a, vec b) { return _mm512_min_ps(a, b); }
inline vec max(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec round(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec exp2_integer(vec n) {  // 2ⁿ for integral n in [−126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline float sum(vec v) { return _mm512_reduce_add_ps(v); }
inline float max_lane(vec v) { return _mm512_reduce_max_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
using vec = __m256;
using mask = __m256i;     // all bits of a lane
constexpr int kLanes = 8;
inline vec zero() { return _mm256_setzero_ps(); }
inline vec splat(float x) { return _mm256_set1_ps(x); }
inline vec load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline mask first(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
inline mask both(mask a, mask b) { return _mm256_and_si256(a, b); }
inline vec load(const float* p, mask m) { return _mm256_maskload_ps(p, m); }
inline void store(float* p, mask m, vec v) { _mm256_maskstore_ps(p, m, v); }
inline vec select(mask m, vec a, vec b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m)); }
inline vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec fnmadd(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }
inline vec fmsub(vec a, vec b, vec c) { return _mm256_fmsub_ps(a, b, c); }
inline vec min(vec a, vec b) { return _mm256_min_ps(a, b); }
inline vec max(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec round(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vec exp2_integer(vec n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline float sum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float max_lane(vec v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
#else
#error "diffprog's CPU kernels need AVX2 and FMA (or AVX-512)"
#endif

}  // namespace simd

using simd::kLanes;
using simd::vec;

namespace {

constexpr int kRows = 6;               // rows of C per micro-kernel call
constexpr int kCols = 2 * kLanes;      // columns of C per micro-kernel call (two vectors)

// The lanes [j, min(j + kLanes, n)) of a row: whole vectors where they fit, masked at the row's
// end (a masked store is many times slower than a plain one on AMD's cores).
struct Lanes {
  bool whole;
  simd::mask mask;
  explicit Lanes(int left) : whole(left >= kLanes), mask(simd::first(left)) {}
  vec load(const float* p) const { return whole ? simd::load(p) : simd::load(p, mask); }
  void store(float* p, vec v) const { whole ? simd::store(p, v) : simd::store(p, mask, v); }
};

// B operands are packed: panels of kCols columns, each panel its `rows` × kCols values
// contiguous (zero past the last column), so the micro-kernel reads B sequentially whatever its
// source.
size_t packed_size(int rows, int cols) { return static_cast<size_t>(rows) * ((cols + kCols - 1) / kCols * kCols); }

// B = x (rows × cols), + bias (cols) on every row where given.
void pack(const float* x, long ldx, int rows, int cols, float* out, const float* bias = nullptr) {
  for (int j = 0; j < cols; j += kCols, out += static_cast<size_t>(rows) * kCols) {
    const simd::mask m0 = simd::first(cols - j), m1 = simd::first(cols - j - kLanes);
    const vec b0 = bias ? simd::load(bias + j, m0) : simd::zero(), b1 = bias ? simd::load(bias + j + kLanes, m1) : simd::zero();
    for (int r = 0; r < rows; ++r) {
      simd::store(out + r * kCols, simd::load(x + r * ldx + j, m0) + b0);
      simd::store(out + r * kCols + kLanes, simd::load(x + r * ldx + j + kLanes, m1) + b1);
    }
  }
}

// The 8 × 8 floats in r transposed, in registers (AVX's 8-float vectors, at either width: the
// packing below moves 8 of x's rows at a time).
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  for (int i = 0; i < 8; i += 4)
    for (int h = 0; h < 2; ++h) {
      u[i + h] = _mm256_shuffle_ps(t[i + h], t[i + h + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[i + h + 2] = _mm256_shuffle_ps(t[i + h], t[i + h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    }
  const int order[4] = {0, 2, 1, 3};  // u[0..3] hold the columns (0, 4), (2, 6), (1, 5), (3, 7)
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[order[i]], u[order[i] + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[order[i]], u[order[i] + 4], 0x31);
  }
}

// B = xᵀ (cols × rows), x's rows + bias (cols) where given: 8 × 8 blocks of x transposed in
// registers, the last cols % 8 one by one.
void pack_transposed(const float* x, long ldx, int rows, int cols, float* out, const float* bias = nullptr) {
  for (int j = 0; j < rows; j += kCols, out += static_cast<size_t>(cols) * kCols)
    for (int c = 0; c < kCols; c += 8) {  // the panel's columns c .. c + 7: x's rows j + c .. j + c + 7
      const int present = std::clamp(rows - j - c, 0, 8);
      int r = 0;
      for (; r + 8 <= cols; r += 8) {
        const __m256 b = bias ? _mm256_loadu_ps(bias + r) : _mm256_setzero_ps();
        __m256 v[8];
        for (int i = 0; i < 8; ++i)
          v[i] = i < present ? _mm256_add_ps(_mm256_loadu_ps(x + (j + c + i) * ldx + r), b) : _mm256_setzero_ps();
        transpose8(v);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + (r + i) * kCols + c, v[i]);
      }
      for (; r < cols; ++r)
        for (int i = 0; i < 8; ++i) out[r * kCols + c + i] = i < present ? x[(j + c + i) * ldx + r] + (bias ? bias[r] : 0.0f) : 0.0f;
    }
}

// An A operand: element (r, p) at a[r * lda + p * step] (step 1: row-major; lda 1: A is the
// transpose of a row-major matrix, read in place).
template <class Element>
struct OperandOf {
  const Element* a;
  long lda, step;
  OperandOf at(long r, long p) const { return {a + r * lda + p * step, lda, step}; }
};
using Operand = OperandOf<float>;

// What the micro-kernel multiplies: float32 (A's floats, B's packed floats: FMAs) or, where the
// CPU has AVX512-BF16, bfloat16 pairs (`Bfloat16Pairs`).
struct Float32 {
  using Element = float;
  using Panel = vec;
  static Panel load(const float* b) { return simd::load(b); }
  static Panel broadcast(float a) { return simd::splat(a); }
  static vec multiply_add(Panel a, Panel b, vec c) { return simd::fmadd(a, b, c); }
};

#if defined(__AVX512BF16__)
// bfloat16 × bfloat16 → float32 by AVX512-BF16's dot products of pairs (vdpbf16ps, twice the
// FMA's multiply-adds): an element is two consecutive bfloat16 as one 32-bit lane — for A two
// neighbours in its row (`pair_row`), for B the same column of two neighbouring rows
// (`pair_rows`) —, and a lane of C gains a₀b₀ + a₁b₁ per element (sums in float32).
struct Bfloat16Pairs {
  using Element = uint32_t;
  using Panel = __m512bh;
  static Panel load(const uint32_t* b) { return (__m512bh)_mm512_loadu_si512(b); }
  static Panel broadcast(uint32_t a) { return (__m512bh)_mm512_set1_epi32(static_cast<int>(a)); }
  static vec multiply_add(Panel a, Panel b, vec c) { return _mm512_dpbf16_ps(c, a, b); }
};
#endif

// C[R × nr] = A[R × kc] B[kc × kCols] for R ≤ 6 rows and nr ≤ kCols columns, B a packed panel;
// row r of C times row_scale[r] where row_scale is given.
// Twelve named accumulators (those past R are never used): GCC keeps an array of them in
// memory, storing it every iteration.
template <int R = kRows, class Kind = Float32>
void micro_kernel(int kc, OperandOf<typename Kind::Element> op, const typename Kind::Element* b, float* c, long ldc,
                  int nr = kCols, const float* row_scale = nullptr) {
  static_assert(R >= 1 && R <= kRows);
  const auto* a = op.a;
  const long lda = op.lda;
  vec c00 = simd::zero(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  vec c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int p = 0; p < kc; ++p, b += kCols, a += op.step) {
    typename Kind::Panel b0 = Kind::load(b), b1 = Kind::load(b + kLanes);
    // B's two vectors in registers: for R < 6 GCC folds their loads into the FMAs, 2R loads a
    // step instead of 2, and AVX2 cores (two loads a cycle) then wait on loads, not FMAs.
    asm("" : "+v"(b0), "+v"(b1));
    auto x = Kind::broadcast(a[0]);
    c00 = Kind::multiply_add(x, b0, c00), c01 = Kind::multiply_add(x, b1, c01);
    if constexpr (R > 1) {
      x = Kind::broadcast(a[lda]);
      c10 = Kind::multiply_add(x, b0, c10), c11 = Kind::multiply_add(x, b1, c11);
    }
    if constexpr (R > 2) {
      x = Kind::broadcast(a[2 * lda]);
      c20 = Kind::multiply_add(x, b0, c20), c21 = Kind::multiply_add(x, b1, c21);
    }
    if constexpr (R > 3) {
      x = Kind::broadcast(a[3 * lda]);
      c30 = Kind::multiply_add(x, b0, c30), c31 = Kind::multiply_add(x, b1, c31);
    }
    if constexpr (R > 4) {
      x = Kind::broadcast(a[4 * lda]);
      c40 = Kind::multiply_add(x, b0, c40), c41 = Kind::multiply_add(x, b1, c41);
    }
    if constexpr (R > 5) {
      x = Kind::broadcast(a[5 * lda]);
      c50 = Kind::multiply_add(x, b0, c50), c51 = Kind::multiply_add(x, b1, c51);
    }
  }
  vec rows[kRows][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (row_scale)
    for (int r = 0; r < R; ++r) {
      const vec by = simd::splat(row_scale[r]);
      rows[r][0] = rows[r][0] * by, rows[r][1] = rows[r][1] * by;
    }
  if (nr == kCols) {
    for (int r = 0; r < R; ++r) {
      simd::store(c + r * ldc, rows[r][0]);
      simd::store(c + r * ldc + kLanes, rows[r][1]);
    }
  } else {
    const simd::mask m0 = simd::first(nr), m1 = simd::first(nr - kLanes);
    for (int r = 0; r < R; ++r) {
      simd::store(c + r * ldc, m0, rows[r][0]);
      simd::store(c + r * ldc + kLanes, m1, rows[r][1]);
    }
  }
}

// C[mr × nr] = A[mr × kc] B for mr ≤ 6 rows and nr ≤ kCols columns, B a packed panel; row r
// times row_scale[r] where given.
template <class Kind = Float32>
void tile(int mr, int kc, OperandOf<typename Kind::Element> a, const typename Kind::Element* b, float* c, long ldc,
          int nr, const float* row_scale = nullptr) {
  switch (mr) {
    case 6: micro_kernel<6, Kind>(kc, a, b, c, ldc, nr, row_scale); break;
    case 5: micro_kernel<5, Kind>(kc, a, b, c, ldc, nr, row_scale); break;
    case 4: micro_kernel<4, Kind>(kc, a, b, c, ldc, nr, row_scale); break;
    case 3: micro_kernel<3, Kind>(kc, a, b, c, ldc, nr, row_scale); break;
    case 2: micro_kernel<2, Kind>(kc, a, b, c, ldc, nr, row_scale); break;
    default: micro_kernel<1, Kind>(kc, a, b, c, ldc, nr, row_scale); break;
  }
}

// C[m × n] = A[m × k] B, B packed with k rows (of pairs, for `Bfloat16Pairs`); any m and n.
// Column panels outside, row blocks inside, so each panel of B is read from memory once and
// reused from the L1 cache.
template <class Kind = Float32>
void multiply(int m, int n, int k, OperandOf<typename Kind::Element> a, const typename Kind::Element* b, float* c,
              long ldc) {
  for (int j = 0; j < n; j += kCols)
    for (int i = 0; i < m; i += kRows)
      tile<Kind>(std::min(kRows, m - i), k, a.at(i, 0), b + static_cast<size_t>(j) * k, c + i * ldc + j, ldc,
                 std::min(kCols, n - j));
}

#if defined(__AVX512BF16__)
// 16 pairs (even[i], odd[i]) of bfloat16 (given as their bits, or as floats rounded to nearest
// even, as XLA's convert), each one 32-bit lane, even in its low half.
inline __m512i bfloat16_pairs(__m256i even, __m256i odd) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(even), _mm512_slli_epi32(_mm512_cvtepu16_epi32(odd), 16));
}
inline __m512i bfloat16_pairs(vec even, vec odd) {
  return bfloat16_pairs((__m256i)_mm512_cvtneps_pbh(even), (__m256i)_mm512_cvtneps_pbh(odd));
}

size_t paired_size(int rows, int cols) { return packed_size((rows + 1) / 2, cols); }

// B packed by `pack` or `pack_transposed` (`rows` rows) as `Bfloat16Pairs`: in each panel the
// rows (2p, 2p + 1) paired column by column; an odd last row paired with 0.
void pair_rows(const float* packed, int rows, int cols, uint32_t* out) {
  const int pairs = (rows + 1) / 2;
  for (int j = 0; j < cols; j += kCols, packed += static_cast<size_t>(rows) * kCols, out += static_cast<size_t>(pairs) * kCols)
    for (int p = 0; p < pairs; ++p)
      for (int half = 0; half < kCols; half += kLanes) {
        const vec odd = 2 * p + 1 < rows ? simd::load(packed + (2 * p + 1) * kCols + half) : simd::zero();
        _mm512_storeu_si512(out + p * kCols + half, bfloat16_pairs(simd::load(packed + 2 * p * kCols + half), odd));
      }
}

// A row of k floats as (k + 1) / 2 `Bfloat16Pairs` elements (for odd k the last one's odd half 0).
void pair_row(const float* a, int k, uint32_t* out) {
  for (int p = 0; p < k; p += 2 * kLanes) {
    const __m512bh pairs = _mm512_cvtne2ps_pbh(simd::load(a + p + kLanes, simd::first(k - p - kLanes)),
                                               simd::load(a + p, simd::first(k - p)));
    _mm512_mask_storeu_epi32(out + p / 2, simd::first((k - p + 1) / 2), (__m512i)pairs);
  }
}
#endif

// bfloat16 bits of x rounded to nearest even (as XLA's convert); a NaN stays a (quiet) NaN.
inline uint16_t to_bfloat16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// exp(x) for x ≤ 0; exp(−inf) and underflow give 0. Relative error ~2e-7.
vec exp_nonpositive(vec x) {
  using simd::fmadd, simd::fnmadd, simd::splat;
  x = simd::max(x, splat(-87.0f));
  const vec n = simd::round(x * splat(1.44269504088896341f));
  vec r = fnmadd(n, splat(0.693359375f), x);
  r = fnmadd(n, splat(-2.12194440e-4f), r);
  vec p = splat(1.9875691500e-4f);
  for (float a : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = fmadd(p, r, splat(a));
  p = fmadd(p, r * r, r + splat(1.0f));
  return p * simd::exp2_integer(n);
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
