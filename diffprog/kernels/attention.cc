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
// The float32 handlers also take q, k, v as one projection (..., T, 3·H·D) — the thirds q, k, v,
// each with its third of a bias added as it is read — and write dq, dk, dv into one such array
// (`diffprog_projected_attention_*`), so that self-attention reads x [W_q W_k W_v] as the product
// wrote it, with no slices and no concatenation around the kernel.
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

// Whether this CPU computes in bfloat16 (AMX or AVX512-BF16).
extern "C" int diffprog_bfloat16_hardware() {
  return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
}

namespace {

// C = A B for the rows [0, m), B packed with `b_rows` rows: a block of rows [i, i + 6) reads
// A's columns (B's rows) [k_begin(i), k_end(i)) and writes C's columns [0, n_end(i, i_end)),
// row r of C times row_scale[r] where given.
template <class KBegin, class KEnd, class NEnd>
void product(int m, Operand a, const float* b, int b_rows, float* c, long ldc,
             KBegin k_begin, KEnd k_end, NEnd n_end, const float* row_scale = nullptr) {
  for (int i = 0; i < m; i += kRows) {
    const int i_end = std::min(i + kRows, m), k0 = k_begin(i), kc = k_end(i) - k0;
    const int n = n_end(i, i_end);
    for (int j = 0; j < n; j += kCols)
      tile(i_end - i, kc, a.at(i, k0), b + static_cast<size_t>(j) * b_rows + k0 * kCols, c + i * ldc + j, ldc,
           std::min(kCols, n - j), row_scale ? row_scale + i : nullptr);
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
  long offset(long item, long stride) const { return (item / heads) * steps * stride + (item % heads) * dim; }
  long offset(long item) const { return offset(item, row()); }
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

float dot(const float* a, const float* b, int n) {  // Σ a_j b_j over j < n: rowsum(dO ⊙ O) of a row
  vec total = simd::zero();
  for (int j = 0; j < n; j += kLanes) {
    const Lanes in_row(n - j);
    total = simd::fmadd(in_row.load(a + j), in_row.load(b + j), total);
  }
  return simd::sum(total);
}

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
  // C (T × D) = L B or Lᵀ B (`transposed`, Lᵀ read in place), B packed T × D, row i of C times
  // row_scale[i] where given. Causal: L is lower-triangular, zero past the diagonal up to its row
  // blocks' end; row i of L ends at i, row j of Lᵀ starts at j. Otherwise L is full.
  void by_values(const float* l, int ld, bool transposed, const float* b, float* c, long ldc,
                 const float* row_scale = nullptr) const {
    const int t = steps, d = dim;
    const bool lower = causal;
    auto width = [d](int, int) { return d; };
    if (transposed) product(t, {l, 1, ld}, b, t, c, ldc, [lower](int j) { return lower ? j : 0; }, [t](int) { return t; }, width);
    else product(t, {l, ld, 1}, b, t, c, ldc, [](int) { return 0; }, [t, lower](int i) { return lower ? std::min(i + kRows, t) : t; }, width,
                 row_scale);
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

// The rows the next item of a thread reads (q, k, v; backward also o and dO), asked for into the
// cache a step at a time while this item computes its exponentials: an item's steps lie a
// projection's row apart (pages apart), where the hardware prefetcher does not follow, and read
// on demand each row waits on memory (B32 T128 H4 D64: ~65 µs an item against ~48 with the rows
// in the cache).
struct NextRows {
  const float* rows[5] = {};
  long strides[5] = {};
  int count = 0, dim = 0;
  void add(const float* x, long stride) { rows[count] = x, strides[count++] = stride; }
  void ask(int step) const {
    for (int r = 0; r < count; ++r)
      for (int d = 0; d < dim; d += 64 / sizeof(float))
        _mm_prefetch(reinterpret_cast<const char*>(rows[r] + step * strides[r] + d), _MM_HINT_T0);
  }
};

// Row i of p (T × ld) becomes exp(scale S_ij − shift_i) for j ≤ last(i), 0 up to row_end(i),
// with S = Q Kᵀ. Forward (`totals` given): shift_i = scale max_j S_ij, written to lse with
// log Σ_j; the rows stay unnormalised and `totals` gets their sums. Backward: shift_i = lse_i.
void exponentials(const Products& on, const float* q, long q_row, const float* k, long k_row, const float* k_bias,
                  float scale, float* packed, float* p, int ld, float* lse, long lse_stride, float* totals,
                  const NextRows& next) {
  pack_transposed(k, k_row, on.steps, on.dim, packed, k_bias);
  on.scores(q, q_row, packed, p, ld);
  for (int i = 0; i < on.steps; ++i) {
    next.ask(i);
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

// Where the items' q, k, v lie: those of item (example e, head h) start at q, k, v + e·T·row + h·D,
// their steps `row` floats apart; each with its bias (D floats from h·D; null: none) added as it
// is read. dq, dk, dv are written in the same places of their own arrays.
struct Operands {
  const float *q, *k, *v;
  long row;
  const float *q_bias, *k_bias, *v_bias;
};
struct Gradients {
  float *q, *k, *v;
  long row;
};

// One item's k, v (in place, `row` floats between steps) with their biases (null: none), which
// they take as they are packed; and q with its bias as the products read it: in place without a
// bias, else copied with it into `scratch` (T × D, q_row = D).
struct ItemOperands {
  const float *q, *k, *v, *k_bias, *v_bias;
  long q_row, row;
  static size_t size(const Shape& sh, const Operands& in) { return in.q_bias ? sh.steps * sh.dim : 0; }
  // The q, k, v rows of `item` (none past the last item).
  static NextRows next(const Shape& sh, const Operands& in, long item) {
    NextRows next;
    next.dim = static_cast<int>(sh.dim);
    if (item >= sh.items) return next;
    const long at = sh.offset(item, in.row);
    for (const float* x : {in.q, in.k, in.v}) next.add(x + at, in.row);
    return next;
  }
  ItemOperands(const Shape& sh, const Operands& in, long item, float* scratch) {
    const long at = sh.offset(item, in.row), head = (item % sh.heads) * sh.dim;
    q = in.q + at, k = in.k + at, v = in.v + at, q_row = row = in.row;
    k_bias = in.k_bias ? in.k_bias + head : nullptr;
    v_bias = in.v_bias ? in.v_bias + head : nullptr;
    if (!in.q_bias) return;
    for (int i = 0; i < sh.steps; ++i)
      for (int d = 0; d < sh.dim; d += kLanes) {
        const Lanes in_row(sh.dim - d);
        in_row.store(scratch + i * sh.dim + d, in_row.load(q + i * row + d) + in_row.load(in.q_bias + head + d));
      }
    q = scratch, q_row = sh.dim;
  }
};

void attend(ffi::ThreadPool pool, const Shape& sh, const Operands& in, float scale, bool causal, float* o, float* lse) {
  const int steps = sh.steps, dim = sh.dim, ld = sh.padded();
  const long row = sh.row();
  const size_t b_size = std::max(packed_size(steps, dim), packed_size(dim, steps)), p_size = packed_size(steps, steps);
  for_each_item(pool, sh.items, b_size + p_size + steps + ItemOperands::size(sh, in), [&](long item, float* scratch) {
    const Products on{steps, dim, causal};
    float *packed = scratch, *p = packed + b_size, *totals = p + p_size;
    const ItemOperands x(sh, in, item, totals + steps);
    float* out = o + sh.offset(item);
    exponentials(on, x.q, x.q_row, x.k, x.row, x.k_bias, scale, packed, p, ld,
                 const_cast<float*>(sh.lse(lse, item)), sh.heads, totals, ItemOperands::next(sh, in, item + 1));
    pack(x.v, x.row, steps, dim, packed, x.v_bias);
    for (int i = 0; i < steps; ++i) totals[i] = 1.0f / totals[i];
    on.by_values(p, ld, false, packed, out, row, totals);  // O = P V, each row over its total as it is stored
  });
}

void attend_backward(ffi::ThreadPool pool, const Shape& sh, const Operands& in, const float* o, const float* lse,
                     const float* d_o, float scale, bool causal, const Gradients& grads) {
  const int steps = sh.steps, dim = sh.dim, ld = sh.padded();
  const long row = sh.row();
  const size_t b_size = std::max(packed_size(steps, dim), packed_size(dim, steps)), p_size = packed_size(steps, steps);
  for_each_item(pool, sh.items, b_size + 2 * p_size + ItemOperands::size(sh, in), [&](long item, float* scratch) {
    const Products on{steps, dim, causal};
    float *packed = scratch, *p = packed + b_size, *ds = p + p_size;
    const ItemOperands x(sh, in, item, ds + p_size);
    const long at = sh.offset(item), grad_at = sh.offset(item, grads.row);
    const float *o_i = o + at, *do_i = d_o + at;
    NextRows next = ItemOperands::next(sh, in, item + 1);
    if (next.count)
      for (const float* x : {o, d_o}) next.add(x + sh.offset(item + 1), row);
    exponentials(on, x.q, x.q_row, x.k, x.row, x.k_bias, scale, packed, p, ld,
                 const_cast<float*>(sh.lse(lse, item)), sh.heads, nullptr, next);
    // dV = Pᵀ dO
    pack(do_i, row, steps, dim, packed);
    on.by_values(p, ld, true, packed, grads.v + grad_at, grads.row);
    // dP = dO Vᵀ, then dS = scale P ⊙ (dP − rowsum(dO ⊙ O))
    pack_transposed(x.v, x.row, steps, dim, packed, x.v_bias);
    on.scores(do_i, row, packed, ds, ld);
    for (int i = 0; i < steps; ++i) {
      const vec delta = simd::splat(dot(do_i + i * row, o_i + i * row, dim)), vscale = simd::splat(scale);
      float *s = ds + i * ld, *prob = p + i * ld;
      const int n = on.row_end(i);
      for (int j = 0; j < n; j += kLanes) {  // causal: P is 0 past the diagonal, so dS is too
        const Lanes in_row(n - j);
        const vec d_s = vscale * in_row.load(prob + j) * (in_row.load(s + j) - delta);
        in_row.store(s + j, d_s);
      }
    }
    // dQ = dS K, dK = dSᵀ Q
    pack(x.k, x.row, steps, dim, packed, x.k_bias);
    on.by_values(ds, ld, false, packed, grads.q + grad_at, grads.row);
    pack(x.q, x.q_row, steps, dim, packed);
    on.by_values(ds, ld, true, packed, grads.k + grad_at, grads.row);
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   float scale, bool causal, ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  const Shape sh = shape_of(q);
  attend(pool, sh, {q.typed_data(), k.typed_data(), v.typed_data(), sh.row(), nullptr, nullptr, nullptr}, scale, causal,
         o->typed_data(), lse->typed_data());
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_o,
                    float scale, bool causal, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  const Shape sh = shape_of(q);
  attend_backward(pool, sh, {q.typed_data(), k.typed_data(), v.typed_data(), sh.row(), nullptr, nullptr, nullptr},
                  o.typed_data(), lse.typed_data(), d_o.typed_data(), scale, causal,
                  {dq->typed_data(), dk->typed_data(), dv->typed_data(), sh.row()});
  return ffi::Error::Success();
}

// The shape of attention over a projection qkv (..., T, 3·H·D) with `heads` heads, and where its
// thirds and their biases lie.
Shape projected_shape(ffi::Buffer<ffi::F32>& qkv, long heads) {
  auto dims = qkv.dimensions();
  long examples = 1;
  for (size_t i = 0; i + 2 < dims.size(); ++i) examples *= dims[i];
  return {examples * heads, dims[dims.size() - 2], heads, dims[dims.size() - 1] / (3 * heads)};
}

Operands projected(const Shape& sh, const float* qkv, const float* bias) {
  const long width = sh.row();
  return {qkv, qkv + width, qkv + 2 * width, 3 * width, bias, bias + width, bias + 2 * width};
}

ffi::Error ProjectedForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> bias, float scale,
                            bool causal, int64_t heads, ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  const Shape sh = projected_shape(qkv, heads);
  attend(pool, sh, projected(sh, qkv.typed_data(), bias.typed_data()), scale, causal, o->typed_data(), lse->typed_data());
  return ffi::Error::Success();
}

ffi::Error ProjectedBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> bias,
                             ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_o, float scale,
                             bool causal, int64_t heads, ffi::ResultBuffer<ffi::F32> d_qkv) {
  const Shape sh = projected_shape(qkv, heads);
  float* d = d_qkv->typed_data();
  attend_backward(pool, sh, projected(sh, qkv.typed_data(), bias.typed_data()), o.typed_data(), lse.typed_data(),
                  d_o.typed_data(), scale, causal, {d, d + sh.row(), d + 2 * sh.row(), 3 * sh.row()});
  return ffi::Error::Success();
}

}  // namespace

// ---- bfloat16 products on AMX (`autocast`): the same two passes, each product's operands rounded
// to bfloat16 and summed in float32 by AMX tiles; the exponentials, dS and the rescaling stay
// float32. Operands are copied per item into zero-padded bfloat16 buffers (T and D rounded up to
// kBlock): A row-major, B "paired" — panels of 16 columns, each panel rows 2r and 2r + 1
// interleaved, as the tiles read it. A product's C is computed in blocks of kBlock × kBlock
// (2 × 2 tiles of 16 × 16); causal products skip the blocks and the K ranges that only meet zeros
// of P or dS. Products with a transposed operand are computed transposed (dVᵀ = dOᵀ P,
// dKᵀ = Qᵀ dS), so only T × D operands are transposed, never T × T ones.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>

namespace {
namespace amx {

constexpr int kBlock = 32;
using bf16 = uint16_t;

int padded(long n) { return static_cast<int>((n + kBlock - 1) / kBlock * kBlock); }

// tiles 0–3: C (16 × 16 float32); 4, 5: A (16 rows × 32 bfloat16); 6, 7: B (16 pair rows × 16 columns)
void configure() {
  struct { uint8_t palette = 1, start = 0, reserved[14] = {}; uint16_t bytes[16] = {}; uint8_t rows[16] = {}; } config;
  for (int t = 0; t < 8; ++t) config.bytes[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
}

// 32 floats (masked to the first n) rounded to bfloat16, as XLA's convert.
__m512i round32(const float* x, int n) {
  const __m512 lo = _mm512_maskz_loadu_ps(simd::first(n), x), hi = _mm512_maskz_loadu_ps(simd::first(n - 16), x + 16);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
}

// out (rp × cp, row-major) = x (rows × cols, row stride ld) rounded, zero outside.
void rows(const float* x, long ld, int rows_, int cols, int rp, int cp, bf16* out) {
  for (int i = 0; i < rp; ++i)
    for (int j = 0; j < cp; j += kBlock)
      _mm512_storeu_si512(out + static_cast<long>(i) * cp + j, i < rows_ ? round32(x + i * ld + j, cols - j) : _mm512_setzero_si512());
}

// B (K = r rows × N = c columns) paired from x (r × c row-major bfloat16, r and c multiples of kBlock).
void pairs(const bf16* x, int r, int c, bf16* out) {
  for (int p = 0; p < c; p += 16, out += static_cast<long>(r) * 16)
    for (int k = 0; k < r; k += 2) {
      const __m512i even = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + static_cast<long>(k) * c + p)));
      const __m512i odd = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + static_cast<long>(k + 1) * c + p)));
      _mm512_storeu_si512(out + k * 16, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
    }
}

// B = xᵀ (K = c rows × N = r columns) paired from x (r × c row-major): pair row k/2 of panel p
// holds, for its 16 columns n, x[p + n][k], x[p + n][k + 1] — one 32-bit gather per pair row.
void transposed_pairs(const bf16* x, int r, int c, bf16* out) {
  const __m512i rows16 = _mm512_mullo_epi32(_mm512_set1_epi32(c / 2), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  for (int p = 0; p < r; p += 16, out += static_cast<long>(c) * 16) {
    const int* panel = reinterpret_cast<const int*>(x + static_cast<long>(p) * c);
    for (int k = 0; k < c; k += 2) _mm512_storeu_si512(out + k * 16, _mm512_i32gather_epi32(rows16, panel + k / 2, 4));
  }
}

// The 16 × 16 floats in r transposed, in registers.
void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]), t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44), r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44), r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88), t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88), t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88), r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
}

// out (cp × rp, row-major) = xᵀ rounded, x (rows × cols, row stride ld), zero outside.
void columns(const float* x, long ld, int rows_, int cols, int rp, int cp, bf16* out) {
  __m512 r[16];
  for (int i = 0; i < rp; i += 16)
    for (int j = 0; j < cp; j += 16) {
      for (int k = 0; k < 16; ++k) r[k] = i + k < rows_ ? _mm512_maskz_loadu_ps(simd::first(cols - j), x + (i + k) * ld + j) : _mm512_setzero_ps();
      transpose16(r);
      for (int k = 0; k < 16; ++k)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + static_cast<long>(j + k) * rp + i), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(r[k])));
    }
}

// C (m × n, float32, ldc) = A (m × K, bfloat16, lda) B (B paired, k_rows rows): block (i, j) sums
// over k in range(i, j) = {k0, k1}, for the columns j < n_end(i). Multiples of kBlock throughout.
template <class Range, class NEnd>
void product(int m, const bf16* a, int lda, const bf16* b, int k_rows, float* c, int ldc, Range range, NEnd n_end) {
  for (int i = 0; i < m; i += kBlock)
    for (int j = 0, n = n_end(i); j < n; j += kBlock) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const bf16 *b0 = b + static_cast<long>(j) * k_rows, *b1 = b0 + 16L * k_rows;
      const auto [k0, k1] = range(i, j);
      for (int k = k0; k < k1; k += kBlock) {
        _tile_loadd(4, a + static_cast<long>(i) * lda + k, lda * 2);
        _tile_loadd(5, a + static_cast<long>(i + 16) * lda + k, lda * 2);
        _tile_loadd(6, b0 + k * 16, 64);
        _tile_loadd(7, b1 + k * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      float* out = c + static_cast<long>(i) * ldc + j;
      _tile_stored(0, out, ldc * 4);
      _tile_stored(1, out + 16, ldc * 4);
      _tile_stored(2, out + 16L * ldc, ldc * 4);
      _tile_stored(3, out + 16L * ldc + 16, ldc * 4);
    }
}

// One item's sizes and scratch: T, D padded to tp, dp; float32 s, d (tp × tp) and c (tp × dp or
// dp × tp); bfloat16 operands and a paired B.
struct Item {
  int steps, dim, tp, dp;
  bool causal;
  float scale;
  float *s, *d, *c;
  bf16 *q, *k, *v, *x, *xt, *p, *b;
  static size_t floats(int tp, int dp) { return 2L * tp * tp + static_cast<long>(tp) * dp; }
  static size_t halves(int tp, int dp) { return 5L * tp * dp + static_cast<long>(tp) * (tp + std::max(tp, dp)); }
  Item(int steps, int dim, bool causal, float scale, float* f, bf16* h)
      : steps(steps), dim(dim), tp(padded(steps)), dp(padded(dim)), causal(causal), scale(scale) {
    s = f, d = s + tp * tp, c = d + tp * tp;
    q = h, k = q + tp * dp, v = k + tp * dp, x = v + tp * dp, xt = x + tp * dp, p = xt + tp * dp, b = p + tp * tp;
  }
  int last(int i) const { return causal ? i : steps - 1; }
  int block_end(int i) const { return causal ? std::min(i / kBlock * kBlock + kBlock, tp) : tp; }  // columns of S computed
  auto all_k(int k_rows) const { return [k_rows](int, int) { return std::pair<int, int>{0, k_rows}; }; }
  // S = Q Kᵀ for the computed columns, then row i of s: exp(scale S_ij − shift_i) for j ≤ last(i),
  // 0 up to tp; rows ≥ T all 0. Forward (totals): shift = scale max S_i·, lse = shift + log Σ; backward: shift = lse.
  void exponentials(const float* lse, long lse_stride, float* lse_out, float* totals) {
    transposed_pairs(k, tp, dp, b);
    product(tp, q, dp, b, dp, s, tp, all_k(dp), [this](int i) { return block_end(i); });
    for (int i = 0; i < tp; ++i) {
      float* row = s + static_cast<long>(i) * tp;
      if (i >= steps) { std::fill(row, row + tp, 0.0f); continue; }
      const int end = block_end(i);
      if (totals) {
        const float shift = scale * row_max(row, last(i));
        totals[i] = exp_row(row, row, end, last(i), scale, shift);
        lse_out[i * lse_stride] = shift + std::log(totals[i]);
      } else {
        exp_row(row, row, end, last(i), scale, lse[i * lse_stride]);
      }
      std::fill(row + end, row + tp, 0.0f);
    }
    rows(s, tp, tp, tp, tp, tp, p);
  }
  // C (tp × dp) = L B for L (tp × tp, bfloat16) lower-triangular when causal, B paired from x.
  void by_values(const bf16* l, const bf16* values) {
    pairs(values, tp, dp, b);
    product(tp, l, tp, b, tp, c, dp, [this](int i, int) { return std::pair<int, int>{0, block_end(i)}; },
            [this](int) { return dp; });
  }
  // C (dp × tp) = xᵀ L for x (T × D, row stride ld) and L as above: (Lᵀ x)ᵀ.
  void transposed_by(const float* x_rows, long ld, const bf16* l) {
    columns(x_rows, ld, steps, dim, tp, dp, xt);
    pairs(l, tp, tp, b);
    product(dp, xt, tp, b, tp, c, tp, [this](int, int j) { return std::pair<int, int>{causal ? j : 0, tp}; },
            [this](int) { return tp; });
  }
  void write(float* out, long row, const float* factors = nullptr) const {  // C (tp × dp) → out (T × D, row stride)
    for (int i = 0; i < steps; ++i)
      for (int j = 0; j < dim; ++j) out[i * row + j] = c[static_cast<long>(i) * dp + j] * (factors ? factors[i] : 1.0f);
  }
  void write_transposed(float* out, long row) const {  // C (dp × tp) → out (T × D)
    __m512 r[16];
    for (int i = 0; i < steps; i += 16)
      for (int j = 0; j < dim; j += 16) {
        for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(c + static_cast<long>(j + k) * tp + i);
        transpose16(r);
        for (int k = 0; k < 16 && i + k < steps; ++k) _mm512_mask_storeu_ps(out + (i + k) * row + j, simd::first(dim - j), r[k]);
      }
  }
};

// AMX's tile state, asked of Linux once per process; false where it is refused.
bool granted() {
  static const bool yes = [] {
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return __builtin_cpu_supports("amx-bf16") && syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return yes;
}

template <class Work>
ffi::Error for_each_item(ffi::ThreadPool pool, long items, int tp, int dp, Work work) {
  if (!granted()) return ffi::Error::Internal("attention: this process may not use AMX (bfloat16 products)");
  in_parallel(pool, items, [&](long begin, long end) {
    std::vector<float> floats(Item::floats(tp, dp) + tp);
    std::vector<bf16> halves(Item::halves(tp, dp));
    configure();
    for (long i = begin; i < end; ++i) work(i, floats.data(), halves.data());
    _tile_release();
  });
  return ffi::Error::Success();
}

}  // namespace amx

ffi::Error ForwardBF16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                       float scale, bool causal, ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  const Shape sh = shape_of(q);
  const long row = sh.row();
  return amx::for_each_item(pool, sh.items, amx::padded(sh.steps), amx::padded(sh.dim), [&](long item, float* f, amx::bf16* h) {
    amx::Item it(sh.steps, sh.dim, causal, scale, f, h);
    const long at = sh.offset(item);
    float* totals = f + amx::Item::floats(it.tp, it.dp);
    amx::rows(q.typed_data() + at, row, it.steps, it.dim, it.tp, it.dp, it.q);
    amx::rows(k.typed_data() + at, row, it.steps, it.dim, it.tp, it.dp, it.k);
    amx::rows(v.typed_data() + at, row, it.steps, it.dim, it.tp, it.dp, it.v);
    it.exponentials(nullptr, sh.heads, const_cast<float*>(sh.lse(lse->typed_data(), item)), totals);
    it.by_values(it.p, it.v);
    for (int i = 0; i < it.steps; ++i) totals[i] = 1.0f / totals[i];
    it.write(o->typed_data() + at, row, totals);
  });
}

ffi::Error BackwardBF16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                        ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_o,
                        float scale, bool causal, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv) {
  const Shape sh = shape_of(q);
  const long row = sh.row();
  return amx::for_each_item(pool, sh.items, amx::padded(sh.steps), amx::padded(sh.dim), [&](long item, float* f, amx::bf16* h) {
    amx::Item it(sh.steps, sh.dim, causal, scale, f, h);
    const long at = sh.offset(item);
    const float *o_i = o.typed_data() + at, *do_i = d_o.typed_data() + at;
    amx::rows(q.typed_data() + at, row, it.steps, it.dim, it.tp, it.dp, it.q);
    amx::rows(k.typed_data() + at, row, it.steps, it.dim, it.tp, it.dp, it.k);
    amx::rows(v.typed_data() + at, row, it.steps, it.dim, it.tp, it.dp, it.v);
    amx::rows(do_i, row, it.steps, it.dim, it.tp, it.dp, it.x);
    it.exponentials(sh.lse(lse.typed_data(), item), sh.heads, nullptr, nullptr);
    it.transposed_by(do_i, row, it.p);  // dVᵀ = dOᵀ P
    it.write_transposed(dv->typed_data() + at, row);
    // dP = dO Vᵀ, then dS = scale P ⊙ (dP − rowsum(dO ⊙ O)) where P ≠ 0, exactly 0 elsewhere
    amx::transposed_pairs(it.v, it.tp, it.dp, it.b);
    amx::product(it.tp, it.x, it.dp, it.b, it.dp, it.d, it.tp, it.all_k(it.dp), [&](int i) { return it.block_end(i); });
    for (int i = 0; i < it.tp; ++i) {
      float *ds = it.d + static_cast<long>(i) * it.tp, *prob = it.s + static_cast<long>(i) * it.tp;
      if (i >= it.steps) { std::fill(ds, ds + it.tp, 0.0f); continue; }
      const vec delta = simd::splat(dot(do_i + i * row, o_i + i * row, it.dim)), vscale = simd::splat(scale);
      const int end = it.block_end(i);
      for (int j = 0; j < end; j += kLanes) {
        const simd::mask allowed = simd::first(it.last(i) + 1 - j);
        const vec d_s = vscale * simd::load(prob + j) * (simd::load(ds + j) - delta);
        simd::store(ds + j, simd::select(allowed, d_s, simd::zero()));
      }
      std::fill(ds + end, ds + it.tp, 0.0f);
    }
    amx::rows(it.d, it.tp, it.tp, it.tp, it.tp, it.tp, it.p);  // dS in bfloat16, in P's place
    it.by_values(it.p, it.k);  // dQ = dS K
    it.write(dq->typed_data() + at, row);
    it.transposed_by(q.typed_data() + at, row, it.p);  // dKᵀ = Qᵀ dS
    it.write_transposed(dk->typed_data() + at, row);
  });
}

}  // namespace

// 1 where the bfloat16 handlers run here: AMX compiled in, present, and granted to this process.
extern "C" int diffprog_attention_bfloat16() { return amx::granted(); }
#else
namespace {
ffi::Error ForwardBF16(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, float, bool,
                       ffi::ResultBuffer<ffi::F32>, ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error::Internal("attention: bfloat16 products need AMX, which this build does not have");
}
ffi::Error BackwardBF16(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                        ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, float, bool,
                        ffi::ResultBuffer<ffi::F32>, ffi::ResultBuffer<ffi::F32>, ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error::Internal("attention: bfloat16 products need AMX, which this build does not have");
}
}  // namespace
extern "C" int diffprog_attention_bfloat16() { return 0; }
#endif

// The handlers' operands: q, k, v → (o, logsumexp); q, k, v, o, logsumexp, do → (dq, dk, dv); and
// projected: qkv, bias → (o, logsumexp); qkv, bias, o, logsumexp, do → dqkv. (XLA's binding
// builder cannot be passed along, so each is spelled out.)
static auto forward_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Attr<float>("scale")
      .Attr<bool>("causal")
      .Ret<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

static auto backward_binding() {
  return ffi::Ffi::Bind()
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
      .Ret<ffi::Buffer<ffi::F32>>();
}

static auto projected_forward_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Attr<float>("scale")
      .Attr<bool>("causal")
      .Attr<int64_t>("heads")
      .Ret<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

static auto projected_backward_binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Attr<float>("scale")
      .Attr<bool>("causal")
      .Attr<int64_t>("heads")
      .Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_attention_forward, Forward, forward_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_attention_backward, Backward, backward_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_attention_forward_bf16, ForwardBF16, forward_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_attention_backward_bf16, BackwardBF16, backward_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_projected_attention_forward, ProjectedForward, projected_forward_binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_projected_attention_backward, ProjectedBackward, projected_backward_binding());
