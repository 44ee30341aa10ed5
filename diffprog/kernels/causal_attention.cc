// Causal dot-product attention for float32 on x86-64 CPUs with AVX2 and FMA, as two XLA FFI
// handlers: the forward pass (o, logsumexp) and the backward pass (dq, dk, dv). Each (example,
// head) pair is one item; the items are shared among the cores. Per item, with s = scale:
//   S = s Q Kᵀ (only the columns j ≤ i are used),  P = softmax_rows(S),  O = P V
//   backward: dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O)), dQ = s dS K, dK = s dSᵀ Q
// P is recomputed in the backward pass from the saved logsumexp. A block of 6 rows computes the
// scores only up to its last row (rounded up to 16 columns), so most of the work above the
// diagonal is skipped.
// Layout: q, k, v, o, do and the gradients are (..., T, H, D) row-major; logsumexp (..., T, H).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" int diffprog_cpu_supported() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

constexpr int kRows = 6;     // rows of C per micro-kernel call
constexpr int kCols = 16;    // columns of C per micro-kernel call (two 8-float vectors)

__m256i column_mask(int n) {  // lanes < n set
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

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

// C[6 × 16] = A[6 × kc] B[kc × 16], B a packed panel. Twelve named accumulators: GCC keeps an
// array of them in memory, storing it every iteration.
void micro_kernel(int kc, Operand op, const float* b, float* c, long ldc) {
  const float* a = op.a;
  const long lda = op.lda;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int p = 0; p < kc; ++p, b += kCols, a += op.step) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 x = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(a + lda);
    c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(a + 2 * lda);
    c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(a + 3 * lda);
    c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(a + 4 * lda);
    c40 = _mm256_fmadd_ps(x, b0, c40), c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(a + 5 * lda);
    c50 = _mm256_fmadd_ps(x, b0, c50), c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  const __m256 rows[kRows][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < kRows; ++r) {
    _mm256_storeu_ps(c + r * ldc, rows[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, rows[r][1]);
  }
}

// C[mr × nr] = A[mr × kc] B for a tile at the edge (mr < 6 or nr < 16): through zero-padded copies.
void edge_tile(int kc, Operand op, const float* b, float* c, long ldc, int mr, int nr, float* padded_a) {
  float tile[kRows * kCols];
  for (int r = 0; r < kRows; ++r)
    for (int p = 0; p < kc; ++p) padded_a[r * kc + p] = r < mr ? *op.at(r, p).a : 0.0f;
  micro_kernel(kc, {padded_a, kc, 1}, b, tile, kCols);
  for (int r = 0; r < mr; ++r) std::copy(tile + r * kCols, tile + r * kCols + nr, c + r * ldc);
}

// C = A B for the rows [0, m), B packed with `b_rows` rows: a block of rows [i, i + 6) reads
// A's columns (B's rows) [k_begin(i), k_end(i)) and writes C's columns [0, n_end(i, i_end)).
// `padded_a` is scratch for 6 × b_rows floats.
template <class KBegin, class KEnd, class NEnd>
void product(int m, Operand a, const float* b, int b_rows, float* c, long ldc,
             KBegin k_begin, KEnd k_end, NEnd n_end, float* padded_a) {
  for (int i = 0; i < m; i += kRows) {
    const int i_end = std::min(i + kRows, m), k0 = k_begin(i), kc = k_end(i) - k0;
    const int n = n_end(i, i_end);
    for (int j = 0; j < n; j += kCols) {
      const Operand a_ij = a.at(i, k0);
      const float* b_j = b + static_cast<size_t>(j) * b_rows + k0 * kCols;
      if (i_end - i == kRows && n - j >= kCols) micro_kernel(kc, a_ij, b_j, c + i * ldc + j, ldc);
      else edge_tile(kc, a_ij, b_j, c + i * ldc + j, ldc, i_end - i, std::min(kCols, n - j), padded_a);
    }
  }
}

// exp(x) for x ≤ 0 (softmax arguments); exp(−inf) and underflow give 0. Relative error ~2e-7.
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

// p[0, n) = exp(scale s[j] − shift) for j ≤ last, 0 after; returns Σ over j ≤ last.
float exp_row(const float* s, float* p, int n, int last, float scale, float shift) {
  const __m256 vs = _mm256_set1_ps(scale), vshift = _mm256_set1_ps(shift);
  __m256 total = _mm256_setzero_ps();
  for (int j = 0; j < n; j += 8) {
    const __m256i in_row = column_mask(n - j);
    const __m256i allowed = _mm256_and_si256(in_row, column_mask(last + 1 - j));
    __m256 x = _mm256_fmsub_ps(_mm256_maskload_ps(s + j, in_row), vs, vshift);
    __m256 e = _mm256_and_ps(exp_nonpositive(_mm256_min_ps(x, _mm256_setzero_ps())),
                             _mm256_castsi256_ps(allowed));
    total = _mm256_add_ps(total, e);
    _mm256_maskstore_ps(p + j, in_row, e);
  }
  return sum8(total);
}

struct Shape {
  long items, steps, heads, dim;  // items = examples × heads
  long row() const { return heads * dim; }                       // stride between steps
  long offset(long item) const { return (item / heads) * steps * row() + (item % heads) * dim; }
  int padded() const { return static_cast<int>((steps + kCols - 1) / kCols * kCols); }
  const float* lse(const float* base, long item) const {  // logsumexp (..., T, H)
    return base + (item / heads) * steps * heads + item % heads;
  }
};

Shape shape_of(ffi::Buffer<ffi::F32>& x) {
  auto dims = x.dimensions();
  long examples = 1;
  for (size_t i = 0; i + 3 < dims.size(); ++i) examples *= dims[i];
  const long heads = dims[dims.size() - 2];
  return {examples * heads, dims[dims.size() - 3], heads, dims[dims.size() - 1]};
}

// work(item, scratch) for every item, shared among XLA's CPU threads: each thread takes a
// contiguous range of items (so that no two threads write the same cache line) and has its own
// `scratch_floats` of scratch memory. The calling thread runs the first range and waits for the rest.
template <class Work>
void for_each_item(ffi::ThreadPool pool, long items, size_t scratch_floats, Work work) {
  const long parts = std::clamp<long>(pool.num_threads(), 1, items);
  auto run = [&](long part) {
    std::vector<float> scratch(scratch_floats);
    for (long i = items * part / parts; i < items * (part + 1) / parts; ++i) work(i, scratch.data());
  };
  std::atomic<long> done{1};
  for (long part = 1; part < parts; ++part) pool.Schedule([&, part] { run(part); done.fetch_add(1); });
  run(0);
  while (done.load() < parts) std::this_thread::yield();
}

int row_block_end(int i, int steps) { return std::min(i / kRows * kRows + kRows, steps); }

float row_max(const float* s, int last) {  // max of s[0..last]
  __m256 top = _mm256_set1_ps(-INFINITY);
  for (int j = 0; j <= last; j += 8) {
    const __m256i allowed = column_mask(last + 1 - j);
    top = _mm256_blendv_ps(top, _mm256_max_ps(top, _mm256_maskload_ps(s + j, allowed)),
                           _mm256_castsi256_ps(allowed));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// The products of one item (T steps, D features): A is T × T (ld) or T × D (row), B packed.
struct Products {
  int steps, dim;
  float* padded_a;  // scratch: 6 × max(T, D)
  // C (T × D) = L B or Lᵀ B (`transposed`, Lᵀ read in place), L (T × T) lower-triangular and
  // zero past the diagonal up to its row blocks' end, B packed T × D. Row i of L ends at i,
  // row j of Lᵀ starts at j.
  void by_values(const float* l, int ld, bool transposed, const float* b, float* c, long ldc) const {
    const int t = steps, d = dim;
    auto width = [d](int, int) { return d; };
    if (transposed) product(t, {l, 1, ld}, b, t, c, ldc, [](int j) { return j; }, [t](int) { return t; }, width, padded_a);
    else product(t, {l, ld, 1}, b, t, c, ldc, [](int) { return 0; }, [t](int i) { return std::min(i + kRows, t); }, width, padded_a);
  }
  // C (T × T, lower part up to the row blocks' end rounded up to 16 columns) = A (T × D) B,
  // B packed D × T.
  void scores(const float* a, long lda, const float* b, float* c, int ldc) const {
    const int d = dim;
    product(steps, {a, lda, 1}, b, d, c, ldc, [](int) { return 0; }, [d](int) { return d; },
            [](int, int i_end) { return (i_end + kCols - 1) / kCols * kCols; }, padded_a);
  }
};

// Row i of p (T × ld) becomes exp(scale S_ij − shift_i) for j ≤ i, 0 up to the row block's end,
// with S = Q Kᵀ. Forward (`totals` given): shift_i = scale max_j S_ij, written to lse with
// log Σ_j; the rows stay unnormalised and `totals` gets their sums. Backward: shift_i = lse_i.
void exponentials(const Products& on, const float* q, const float* k, long row, float scale,
                  float* packed, float* p, int ld, float* lse, long lse_stride, float* totals) {
  pack_transposed(k, row, on.steps, on.dim, packed);
  on.scores(q, row, packed, p, ld);
  for (int i = 0; i < on.steps; ++i) {
    float* s = p + i * ld;
    if (totals) {
      const float shift = scale * row_max(s, i);
      totals[i] = exp_row(s, s, row_block_end(i, on.steps), i, scale, shift);
      lse[i * lse_stride] = shift + std::log(totals[i]);
    } else {
      exp_row(s, s, row_block_end(i, on.steps), i, scale, lse[i * lse_stride]);
    }
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   float scale, ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  const Shape sh = shape_of(q);
  const int steps = sh.steps, dim = sh.dim, ld = sh.padded();
  const long row = sh.row();
  const size_t b_size = std::max(packed_size(steps, dim), packed_size(dim, steps)), p_size = packed_size(steps, steps);
  const size_t a_size = kRows * std::max(steps, dim);
  for_each_item(pool, sh.items, a_size + b_size + p_size + steps, [&](long item, float* scratch) {
    const Products on{steps, dim, scratch};
    float *packed = scratch + a_size, *p = packed + b_size, *totals = p + p_size;
    const long at = sh.offset(item);
    float* out = o->typed_data() + at;
    exponentials(on, q.typed_data() + at, k.typed_data() + at, row, scale, packed, p, ld,
                 const_cast<float*>(sh.lse(lse->typed_data(), item)), sh.heads, totals);
    pack(v.typed_data() + at, row, steps, dim, packed);
    on.by_values(p, ld, false, packed, out, row);
    for (int i = 0; i < steps; ++i) {
      const __m256 inverse = _mm256_set1_ps(1.0f / totals[i]);
      for (int d = 0; d < dim; d += 8) {
        const __m256i in_row = column_mask(dim - d);
        float* x = out + i * row + d;
        _mm256_maskstore_ps(x, in_row, _mm256_mul_ps(_mm256_maskload_ps(x, in_row), inverse));
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_o,
                    float scale, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  const Shape sh = shape_of(q);
  const int steps = sh.steps, dim = sh.dim, ld = sh.padded();
  const long row = sh.row();
  const size_t b_size = std::max(packed_size(steps, dim), packed_size(dim, steps)), p_size = packed_size(steps, steps);
  const size_t a_size = kRows * std::max(steps, dim);
  for_each_item(pool, sh.items, a_size + b_size + 2 * p_size, [&](long item, float* scratch) {
    const Products on{steps, dim, scratch};
    float *packed = scratch + a_size, *p = packed + b_size, *ds = p + p_size;
    const long at = sh.offset(item);
    const float *q_i = q.typed_data() + at, *k_i = k.typed_data() + at, *v_i = v.typed_data() + at;
    const float *o_i = o.typed_data() + at, *do_i = d_o.typed_data() + at;
    exponentials(on, q_i, k_i, row, scale, packed, p, ld,
                 const_cast<float*>(sh.lse(lse.typed_data(), item)), sh.heads, nullptr);
    // dV = Pᵀ dO
    pack(do_i, row, steps, dim, packed);
    on.by_values(p, ld, true, packed, dv->typed_data() + at, row);
    // dP = dO Vᵀ, then dS = scale P ⊙ (dP − rowsum(dO ⊙ O))
    pack_transposed(v_i, row, steps, dim, packed);
    on.scores(do_i, row, packed, ds, ld);
    for (int i = 0; i < steps; ++i) {
      __m256 dot = _mm256_setzero_ps();
      for (int d = 0; d < dim; d += 8) {
        const __m256i in_row = column_mask(dim - d);
        dot = _mm256_fmadd_ps(_mm256_maskload_ps(do_i + i * row + d, in_row),
                              _mm256_maskload_ps(o_i + i * row + d, in_row), dot);
      }
      const __m256 delta = _mm256_set1_ps(sum8(dot)), vscale = _mm256_set1_ps(scale);
      float *s = ds + i * ld, *prob = p + i * ld;
      const int n = row_block_end(i, steps);
      for (int j = 0; j < n; j += 8) {  // P is 0 past the diagonal, so dS is too
        const __m256i in_row = column_mask(n - j);
        const __m256 d_s = _mm256_mul_ps(_mm256_mul_ps(vscale, _mm256_maskload_ps(prob + j, in_row)),
                                         _mm256_sub_ps(_mm256_maskload_ps(s + j, in_row), delta));
        _mm256_maskstore_ps(s + j, in_row, d_s);
      }
    }
    // dQ = dS K, dK = dSᵀ Q
    pack(k_i, row, steps, dim, packed);
    on.by_values(ds, ld, false, packed, dq->typed_data() + at, row);
    pack(q_i, row, steps, dim, packed);
    on.by_values(ds, ld, true, packed, dk->typed_data() + at, row);
  });
  return ffi::Error::Success();
}

}  // namespace

#pragma GCC pop_options

XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_causal_attention_forward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_causal_attention_backward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
