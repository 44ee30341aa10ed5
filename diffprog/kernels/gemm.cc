// C = op(A) op(B) by the vendor's BLAS (Intel MKL's cblas, which picks AVX2, AVX-512 or AMX code
// for the CPU it runs on — on AMD's, AVX2 code at most), as one XLA FFI handler per operand type:
//   float32 × float32 → float32 (cblas_sgemm; where library.py says so — AVX2 CPUs, AMD's AVX-512 ones — products of
//   depth ≤ 256 with A not transposed by cpu.h's micro-kernel, in `shallow_product` below);
//   bfloat16 × bfloat16 → float32 (cblas_gemm_bf16bf16f32: bfloat16 products summed in float32,
//   on AMX or AVX512-BF16 where the CPU has them; where library.py says so — AMD's AVX-512 CPUs —
//   Aᵀ B by cpu.h's micro-kernel on AVX512-BF16's pairs, in `paired_product` below).
// A is (M, K), or (K, M) read as its transpose with `transpose_a`; B is (K, N), or (N, K) with
// `transpose_b`; C is (M, N), row-major. MKL runs sequentially in each of XLA's CPU threads, the
// longer side of C split among them. A third float32 handler, C = relu(A B + bias)
// (`diffprog_relu_affine_f32`: FeedForward's ReLU layer), adds the bias and takes the ReLU as the
// micro-kernel has stored each tile of a shallow product, the tile still in the L1 cache (after
// MKL's product, as a pass over each thread's part of C).
#include <mkl.h>

#include <type_traits>
#include <vector>

#include "cpu.h"

namespace {

constexpr double kSplitWork = 1 << 21;  // multiply-adds below which one thread does it all

// What a product does to C's values after computing them: + bias (C's columns, from its first;
// null: none), then max(·, 0) with `relu`. The default leaves them as they are.
struct Epilogue {
  const float* bias = nullptr;
  bool relu = false;
  Epilogue at(long column) const { return {bias ? bias + column : nullptr, relu}; }
};

// C's block of `rows` × `cols` (ldc floats a row) = finish(C's block), finish taken at the
// block's first column.
void finish_block(float* c, long ldc, long rows, long cols, Epilogue finish) {
  if (!finish.bias && !finish.relu) return;
  for (long r = 0; r < rows; ++r)
    for (long j = 0; j < cols; j += kLanes) {
      const Lanes in_row(cols - j);
      float* x = c + r * ldc + j;
      vec y = in_row.load(x);
      if (finish.bias) y = y + in_row.load(finish.bias + j);
      in_row.store(x, finish.relu ? simd::max(y, simd::zero()) : y);
    }
}

// float32 products of depth ≤ kShallow with A not transposed by `shallow_product` instead of MKL's
// sgemm: set by library.py where that is the faster (AVX2 CPUs, AMD's AVX-512 ones).
constexpr long kShallow = 256;  // products.py's SHALLOW_DEPTH repeats it (relu_affine chooses by it)
std::atomic<bool> shallow_by_micro_kernel{false};

// C (m × n, row-major) = A op(B) for a shallow product (depth k ≤ kShallow): A (m × k) and B
// (k × n, or n × k with `transpose_b`) row-major with leading dimensions lda and ldb. Each thread
// takes a range of C's column panels (kCols columns), packs them (each panel k × kCols: the L1
// cache's), then runs every panel against each block of kBlockRows rows of A, read in place
// (kBlockRows × k: the L2 cache's), 6 rows at a time — Goto's loops with a single depth block,
// C written once (no pass that zeroes it first). Under kSplitWork multiply-adds, one thread.
void shallow_product(ffi::ThreadPool pool, long m, long n, long k, const float* a, long lda, const float* b, long ldb,
                     bool transpose_b, float* c, Epilogue finish) {
  constexpr long kBlockRows = 120;
  const long panels = (n + kCols - 1) / kCols;
  const long parts = static_cast<double>(m) * n * k < kSplitWork ? 1 : pool.num_threads();
  in_parallel(pool, panels, [&](long first, long last) {
    const long j0 = first * kCols, j1 = std::min(n, last * kCols);
    thread_local std::vector<float> packed;
    packed.resize(packed_size(k, j1 - j0));
    transpose_b ? pack_transposed(b + j0 * ldb, ldb, j1 - j0, k, packed.data()) : pack(b + j0, ldb, k, j1 - j0, packed.data());
    for (long i0 = 0; i0 < m; i0 += kBlockRows)
      for (long j = j0; j < j1; j += kCols)
        for (long i = i0; i < std::min(m, i0 + kBlockRows); i += kRows) {
          const long rows = std::min<long>(kRows, m - i), cols = std::min<long>(kCols, j1 - j);
          tile(rows, k, {a + i * lda, lda, 1}, packed.data() + (j - j0) * k, c + i * n + j, n, cols);
          finish_block(c + i * n + j, n, rows, cols, finish.at(j));  // the tile still in L1
        }
  }, parts);
}

// bfloat16 Aᵀ B by `paired_product` instead of MKL: set by library.py where MKL runs narrower than
// the CPU (AMD's AVX-512 CPUs, whose MKL bfloat16 GEMM is AVX2 code) and the kernels are built
// with AVX512-BF16.
std::atomic<bool> transposed_bf16_by_pairs{false};

#if defined(__AVX512BF16__)
// out[p · width + c] = the bfloat16 pair (X[2p][c0 + c], X[2p + 1][c0 + c]) for c < cols ≤ width
// (`Bfloat16Pairs`; an odd last row paired with 0, columns past cols 0 up to the next multiple
// of kLanes): X (rows × ldx) bfloat16 bits.
void pair_rows_of(const uint16_t* x, long ldx, long rows, long c0, long cols, long width, uint32_t* out) {
  for (long p = 0; p < (rows + 1) / 2; ++p)
    for (long c = 0; c < cols; c += kLanes) {
      const simd::mask lanes = simd::first(static_cast<int>(cols - c));
      const uint16_t* even = x + 2 * p * ldx + c0 + c;
      const __m256i odd = 2 * p + 1 < rows ? _mm256_maskz_loadu_epi16(lanes, even + ldx) : _mm256_setzero_si256();
      _mm512_mask_storeu_epi32(out + p * width + c, simd::first(static_cast<int>(std::min<long>(width - c, kLanes))),
                               bfloat16_pairs(_mm256_maskz_loadu_epi16(lanes, even), odd));
    }
}

// C (m × n) = Aᵀ B for A (r × m) and B (r × n), bfloat16, row-major, by cpu.h's micro-kernel on
// AVX512-BF16's pairs of A's and B's rows: A's columns paired once in blocks of kRows (each
// pairs × kRows), then each thread pairs its range of B's column panels (pairs × kCols, the L2
// cache's) and runs each against every block of A — the blocks read once per panel, so for
// m > n Cᵀ = Bᵀ A is computed so and transposed.
void paired_product(ffi::ThreadPool pool, long m, long n, long r, const uint16_t* a, long lda, const uint16_t* b,
                    long ldb, float* c) {
  if (m > n) {
    std::vector<float> transposed(static_cast<size_t>(n) * m);
    paired_product(pool, n, m, r, b, ldb, a, lda, transposed.data());
    for (long i = 0; i < m; ++i)
      for (long j = 0; j < n; ++j) c[i * n + j] = transposed[j * m + i];
    return;
  }
  const long pairs = (r + 1) / 2, blocks = (m + kRows - 1) / kRows;
  std::vector<uint32_t> a_blocks(static_cast<size_t>(blocks) * pairs * kRows);
  for (long i = 0; i < m; i += kRows)
    pair_rows_of(a, lda, r, i, std::min<long>(kRows, m - i), kRows, a_blocks.data() + i * pairs);
  const long panels = (n + kCols - 1) / kCols;
  in_parallel(pool, panels, [&](long first, long last) {
    thread_local std::vector<uint32_t> panel;
    panel.resize(static_cast<size_t>(pairs) * kCols);
    for (long j = first * kCols; j < std::min(n, last * kCols); j += kCols) {
      const long cols = std::min<long>(kCols, n - j);
      pair_rows_of(b, ldb, r, j, cols, kCols, panel.data());
      for (long i = 0; i < m; i += kRows)
        tile<Bfloat16Pairs>(std::min<long>(kRows, m - i), pairs, {a_blocks.data() + i * pairs, 1, kRows}, panel.data(),
                            c + i * n + j, n, cols);
    }
  }, static_cast<double>(m) * n * r < kSplitWork ? 1 : pool.num_threads());
}
#endif

// C = finish(op(A) op(B)) by blas(...) (cblas_sgemm's arguments), the longer side of C split
// among the threads.
template <class In, class Blas>
ffi::Error Gemm(ffi::ThreadPool pool, ffi::Span<const int64_t> a_dims, const In* a,
                ffi::Span<const int64_t> b_dims, const In* b, bool transpose_a, bool transpose_b,
                float* c, Blas blas, Epilogue finish = {}) {
  if (a_dims.size() != 2 || b_dims.size() != 2) return ffi::Error::InvalidArgument("gemm: A and B must be matrices");
  const long m = transpose_a ? a_dims[1] : a_dims[0], k = transpose_a ? a_dims[0] : a_dims[1];
  const long n = transpose_b ? b_dims[0] : b_dims[1];
  if ((transpose_b ? b_dims[1] : b_dims[0]) != k) return ffi::Error::InvalidArgument("gemm: A and B do not chain");
  const long lda = a_dims[1], ldb = b_dims[1];
  if constexpr (std::is_same_v<In, float>) {
    if (shallow_by_micro_kernel.load() && !transpose_a && k <= kShallow) {
      shallow_product(pool, m, n, k, a, lda, b, ldb, transpose_b, c, finish);
      return ffi::Error::Success();
    }
  }
  const auto ta = transpose_a ? CblasTrans : CblasNoTrans, tb = transpose_b ? CblasTrans : CblasNoTrans;
  const double work = static_cast<double>(m) * n * k;
  const long parts = work < kSplitWork ? 1 : pool.num_threads();
  if (m >= n) {  // rows [r0, r1) of C: rows of op(A)
    in_parallel(pool, m, [&](long r0, long r1) {
      blas(CblasRowMajor, ta, tb, r1 - r0, n, k, 1.0f, transpose_a ? a + r0 : a + r0 * lda, lda, b, ldb, 0.0f,
           c + r0 * n, n);
      finish_block(c + r0 * n, n, r1 - r0, n, finish);
    }, parts);
  } else {  // columns [c0, c1) of C: columns of op(B)
    in_parallel(pool, n, [&](long c0, long c1) {
      blas(CblasRowMajor, ta, tb, m, c1 - c0, k, 1.0f, a, lda, transpose_b ? b + c0 * ldb : b + c0, ldb, 0.0f,
           c + c0, n);
      finish_block(c + c0, n, m, c1 - c0, finish.at(c0));
    }, parts);
  }
  return ffi::Error::Success();
}

ffi::Error GemmF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, bool transpose_a,
                   bool transpose_b, ffi::ResultBuffer<ffi::F32> c) {
  return Gemm(pool, a.dimensions(), a.typed_data(), b.dimensions(), b.typed_data(), transpose_a, transpose_b,
              c->typed_data(), cblas_sgemm);
}

// C (..., N) = relu(A B + bias): A (..., K), its leading axes read as rows; B (K, N); bias (N,).
ffi::Error ReluAffineF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                         ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> c) {
  auto dims = a.dimensions();
  const int64_t rows[2] = {static_cast<int64_t>(a.element_count()) / dims.back(), dims.back()};
  if (b.dimensions().size() != 2 || bias.element_count() != b.dimensions()[1])
    return ffi::Error::InvalidArgument("relu_affine: expected B (K, N) and a bias of N");
  return Gemm(pool, {rows, 2}, a.typed_data(), b.dimensions(), b.typed_data(), false, false, c->typed_data(),
              cblas_sgemm, {bias.typed_data(), true});
}

ffi::Error GemmBF16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b, bool transpose_a,
                    bool transpose_b, ffi::ResultBuffer<ffi::F32> c) {
  static_assert(sizeof(ffi::NativeType<ffi::BF16>) == sizeof(MKL_BF16));
#if defined(__AVX512BF16__)
  if (transposed_bf16_by_pairs.load() && transpose_a && !transpose_b && a.dimensions().size() == 2 &&
      b.dimensions().size() == 2 && a.dimensions()[0] == b.dimensions()[0]) {
    const auto bits = [](auto& x) { return reinterpret_cast<const uint16_t*>(x.typed_data()); };
    paired_product(pool, a.dimensions()[1], b.dimensions()[1], a.dimensions()[0], bits(a), a.dimensions()[1], bits(b),
                   b.dimensions()[1], c->typed_data());
    return ffi::Error::Success();
  }
#endif
  return Gemm(pool, a.dimensions(), reinterpret_cast<const MKL_BF16*>(a.typed_data()), b.dimensions(),
              reinterpret_cast<const MKL_BF16*>(b.typed_data()), transpose_a, transpose_b, c->typed_data(),
              cblas_gemm_bf16bf16f32);
}

}  // namespace

// MKL sequential in every thread that calls it (the threads are XLA's).
extern "C" void diffprog_gemm_setup() { mkl_set_threading_layer(MKL_THREADING_SEQUENTIAL); }

// The shallow float32 products by the micro-kernel (on) or by MKL (off: the default).
extern "C" void diffprog_gemm_shallow_by_micro_kernel(int on) { shallow_by_micro_kernel.store(on); }

// bfloat16 Aᵀ B by `paired_product` (on; where the kernels have AVX512-BF16) or by MKL (off: the
// default). Returns whether the pairs are built in.
extern "C" int diffprog_gemm_transposed_bf16_by_pairs(int on) {
#if defined(__AVX512BF16__)
  transposed_bf16_by_pairs.store(on);
  return 1;
#else
  return 0;
#endif
}

template <ffi::DataType T>
static auto with_operands() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<T>>()
      .template Attr<bool>("transpose_a")
      .template Attr<bool>("transpose_b")
      .template Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_gemm_f32, GemmF32, with_operands<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_gemm_bf16, GemmBF16, with_operands<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_relu_affine_f32, ReluAffineF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
