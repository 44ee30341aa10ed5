// Dot-product self-attention, causal or over all keys, for float32 on x86-64 CPUs with AVX2 and
// FMA or AVX-512 (cpu.h's `simd`), as two XLA FFI handlers: the forward pass (o, logsumexp) and the backward pass (dq, dk,
// dv). Each (example, head) pair is one item; the items are shared among the cores. Per item,
// with s = scale:
//   S = s Q Kᵀ (causal: only the columns j ≤ i are used),  P = softmax_rows(S),  O = P V
//   backward: dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O)), dQ = s dS K, dK = s dSᵀ Q
// P is recomputed in the backward pass from the saved logsumexp. Causal: a block of 6 rows
// computes the scores only up to its last row (rounded up to kCols columns), so most of the work
// above the diagonal is skipped.
// Layout: q, k, v, o, do and the gradients are (..., T, H, D) row-major; logsumexp (..., T, H).
#include <cmath>
#include <vector>

#include "cpu.h"

// Whether this CPU runs what the compiler built (-march=native; checked in case the cached
// library is loaded on another machine).
extern "C" int diffprog_cpu_supported() {
#if defined(__AVX512F__)
  if (!__builtin_cpu_supports("avx512f")) return 0;
#endif
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

extern "C" int diffprog_vector_lanes() { return kLanes; }  // floats in one of the kernels' vectors

namespace {

// C = A B for the rows [0, m), B packed with `b_rows` rows: a block of rows [i, i + 6) reads
// A's columns (B's rows) [k_begin(i), k_end(i)) and writes C's columns [0, n_end(i, i_end)).
template <class KBegin, class KEnd, class NEnd>
void product(int m, Operand a, const float* b, int b_rows, float* c, long ldc,
             KBegin k_begin, KEnd k_end, NEnd n_end) {
  for (int i = 0; i < m; i += kRows) {
    const int i_end = std::min(i + kRows, m), k0 = k_begin(i), kc = k_end(i) - k0;
    const int n = n_end(i, i_end);
    for (int j = 0; j < n; j += kCols)
      tile(i_end - i, kc, a.at(i, k0), b + static_cast<size_t>(j) * b_rows + k0 * kCols, c + i * ldc + j, ldc,
           std::min(kCols, n - j));
  }
}

// p[0, n) = exp(scale s[j] − shift) for j ≤ last, 0 after; returns Σ over j ≤ last.
float exp_row(const float* s, float* p, int n, int last, float scale, float shift) {
  const vec vs = simd::splat(scale), vshift = simd::splat(shift);
  vec total = simd::zero();
  for (int j = 0; j < n; j += kLanes) {
    const Lanes in_row(n - j);
    const simd::mask allowed = simd::both(in_row.mask, simd::first(last + 1 - j));
    const vec x = simd::fmsub(in_row.load(s + j), vs, vshift);
    const vec e = simd::select(allowed, exp_nonpositive(simd::min(x, simd::zero())), simd::zero());
    total = total + e;
    in_row.store(p + j, e);
  }
  return simd::sum(total);
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

// work(item, scratch) for every item, shared among XLA's CPU threads (`in_parallel`), each
// thread with its own `scratch_floats` of scratch memory.
template <class Work>
void for_each_item(ffi::ThreadPool pool, long items, size_t scratch_floats, Work work) {
  in_parallel(pool, items, [&](long begin, long end) {
    std::vector<float> scratch(scratch_floats);
    for (long i = begin; i < end; ++i) work(i, scratch.data());
  });
}

int row_block_end(int i, int steps) { return std::min(i / kRows * kRows + kRows, steps); }

float row_max(const float* s, int last) {  // max of s[0..last]
  vec top = simd::splat(-INFINITY);
  for (int j = 0; j <= last; j += kLanes) {
    const simd::mask allowed = simd::first(last + 1 - j);
    top = simd::select(allowed, simd::max(top, simd::load(s + j, allowed)), top);
  }
  return simd::max_lane(top);
}

// The products of one item (T steps, D features): A is T × T (ld) or T × D (row), B packed.
struct Products {
  int steps, dim;
  bool causal;
  int last(int i) const { return causal ? i : steps - 1; }  // the last key row i attends to
  int row_end(int i) const { return causal ? row_block_end(i, steps) : steps; }  // where row i's P ends
  // C (T × D) = L B or Lᵀ B (`transposed`, Lᵀ read in place), B packed T × D. Causal: L is
  // lower-triangular, zero past the diagonal up to its row blocks' end; row i of L ends at i,
  // row j of Lᵀ starts at j. Otherwise L is full.
  void by_values(const float* l, int ld, bool transposed, const float* b, float* c, long ldc) const {
    const int t = steps, d = dim;
    const bool lower = causal;
    auto width = [d](int, int) { return d; };
    if (transposed) product(t, {l, 1, ld}, b, t, c, ldc, [lower](int j) { return lower ? j : 0; }, [t](int) { return t; }, width);
    else product(t, {l, ld, 1}, b, t, c, ldc, [](int) { return 0; }, [t, lower](int i) { return lower ? std::min(i + kRows, t) : t; }, width);
  }
  // C (T × T; causal: the lower part up to the row blocks' end) = A (T × D) B, B packed D × T,
  // the columns rounded up to kCols.
  void scores(const float* a, long lda, const float* b, float* c, int ldc) const {
    const int d = dim, t = steps;
    const bool lower = causal;
    product(steps, {a, lda, 1}, b, d, c, ldc, [](int) { return 0; }, [d](int) { return d; },
            [t, lower](int, int i_end) { return ((lower ? i_end : t) + kCols - 1) / kCols * kCols; });
  }
};

// Row i of p (T × ld) becomes exp(scale S_ij − shift_i) for j ≤ last(i), 0 up to row_end(i),
// with S = Q Kᵀ. Forward (`totals` given): shift_i = scale max_j S_ij, written to lse with
// log Σ_j; the rows stay unnormalised and `totals` gets their sums. Backward: shift_i = lse_i.
void exponentials(const Products& on, const float* q, const float* k, long row, float scale,
                  float* packed, float* p, int ld, float* lse, long lse_stride, float* totals) {
  pack_transposed(k, row, on.steps, on.dim, packed);
  on.scores(q, row, packed, p, ld);
  for (int i = 0; i < on.steps; ++i) {
    float* s = p + i * ld;
    if (totals) {
      const float shift = scale * row_max(s, on.last(i));
      totals[i] = exp_row(s, s, on.row_end(i), on.last(i), scale, shift);
      lse[i * lse_stride] = shift + std::log(totals[i]);
    } else {
      exp_row(s, s, on.row_end(i), on.last(i), scale, lse[i * lse_stride]);
    }
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   float scale, bool causal, ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  const Shape sh = shape_of(q);
  const int steps = sh.steps, dim = sh.dim, ld = sh.padded();
  const long row = sh.row();
  const size_t b_size = std::max(packed_size(steps, dim), packed_size(dim, steps)), p_size = packed_size(steps, steps);
  for_each_item(pool, sh.items, b_size + p_size + steps, [&](long item, float* scratch) {
    const Products on{steps, dim, causal};
    float *packed = scratch, *p = packed + b_size, *totals = p + p_size;
    const long at = sh.offset(item);
    float* out = o->typed_data() + at;
    exponentials(on, q.typed_data() + at, k.typed_data() + at, row, scale, packed, p, ld,
                 const_cast<float*>(sh.lse(lse->typed_data(), item)), sh.heads, totals);
    pack(v.typed_data() + at, row, steps, dim, packed);
    on.by_values(p, ld, false, packed, out, row);
    for (int i = 0; i < steps; ++i) {
      const vec inverse = simd::splat(1.0f / totals[i]);
      for (int d = 0; d < dim; d += kLanes) {
        const Lanes in_row(dim - d);
        float* x = out + i * row + d;
        in_row.store(x, in_row.load(x) * inverse);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_o,
                    float scale, bool causal, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  const Shape sh = shape_of(q);
  const int steps = sh.steps, dim = sh.dim, ld = sh.padded();
  const long row = sh.row();
  const size_t b_size = std::max(packed_size(steps, dim), packed_size(dim, steps)), p_size = packed_size(steps, steps);
  for_each_item(pool, sh.items, b_size + 2 * p_size, [&](long item, float* scratch) {
    const Products on{steps, dim, causal};
    float *packed = scratch, *p = packed + b_size, *ds = p + p_size;
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
      vec dot = simd::zero();
      for (int d = 0; d < dim; d += kLanes) {
        const Lanes in_row(dim - d);
        dot = simd::fmadd(in_row.load(do_i + i * row + d), in_row.load(o_i + i * row + d), dot);
      }
      const vec delta = simd::splat(simd::sum(dot)), vscale = simd::splat(scale);
      float *s = ds + i * ld, *prob = p + i * ld;
      const int n = on.row_end(i);
      for (int j = 0; j < n; j += kLanes) {  // causal: P is 0 past the diagonal, so dS is too
        const Lanes in_row(n - j);
        const vec d_s = vscale * in_row.load(prob + j) * (in_row.load(s + j) - delta);
        in_row.store(s + j, d_s);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_attention_forward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_attention_backward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
