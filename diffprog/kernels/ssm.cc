// The selective scan of Mamba (dp.SelectiveSSM) for float32 on x86-64 CPUs with AVX2 and FMA, as
// two XLA FFI handlers. With a_t = exp(Δ_t A) and b_t = (Δ_t ⊗ u_t) B_t, never stored:
//   h_t = a_t ⊗ h_{t-1} + b_t  (I × N, from h_{-1} = h0),   y_t = h_t C_t
//   backward, from ∂y_t and ∂h_{T-1}: g_t = ∂h_t = c_t ∂y_t + a_{t+1} ⊗ g_{t+1},
//   ∂C_t = Σ_i h_t ∂y_t,  ∂B_t = Σ_i g_t Δ_t u_t,  ∂u_t = Δ_t Σ_n g_t B_t,
//   ∂Δ_t = Σ_n g_t (h_{t-1} a_t A + u_t B_t),  ∂A = Σ_t g_t h_{t-1} a_t Δ_t,  ∂h0 = a_0 ⊗ g_0.
// Channels are independent: a vector holds 8 channels i and the state is N such vectors. The
// forward pass runs a (row, 8 channels) item per task; the backward pass runs a row per task, its
// blocks of channels one after the other, each first recomputing its states forward (T·N vectors)
// and then running the steps in reverse. ∂A comes back per row (summed by the caller).
// Layout: Δ, u, y, ∂Δ, ∂u (B, T, I); B, C, ∂B, ∂C (B, T, N); A (I, N); h0, h, ∂A (B, I, N).
#include <vector>

#include "cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

struct Sizes {
  int batch, steps, inner, state;
  int blocks() const { return (inner + 7) / 8; }
  // Threads worth starting: handing work to another thread costs ~50 µs, the time of ~4 MFLOP.
  long parts() const { return 1 + 20L * batch * steps * inner * state / 4'000'000; }
  size_t at(int b, int t, int width) const { return (static_cast<size_t>(b) * steps + t) * width; }
};

Sizes sizes_of(ffi::Buffer<ffi::F32>& delta, ffi::Buffer<ffi::F32>& A) {
  auto d = delta.dimensions();
  return {static_cast<int>(d[0]), static_cast<int>(d[1]), static_cast<int>(d[2]),
          static_cast<int>(A.dimensions()[1])};
}

// Arrays of vectors, 32-byte aligned: std::vector<__m256> is not (GCC drops __m256's alignment
// when it is a template argument).
struct alignas(32) Vector { float lanes[8]; };
struct Vectors {
  std::vector<Vector> storage;
  explicit Vectors(size_t n) : storage(n) {}
  __m256* data() { return reinterpret_cast<__m256*>(storage.data()); }
  __m256& operator[](size_t k) { return data()[k]; }
};

// Aᵀ in blocks of 8 channels: the vector of A[i0..i0+8, n] at [block · N + n], 0 past I.
Vectors transposed(const Sizes& s, const float* A) {
  Vectors out(static_cast<size_t>(s.blocks()) * s.state);
  for (int k = 0; k < s.blocks(); ++k)
    for (int n = 0; n < s.state; ++n) {
      alignas(32) float lanes[8] = {};
      for (int l = 0; l < 8 && 8 * k + l < s.inner; ++l) lanes[l] = A[(8 * k + l) * s.state + n];
      out[static_cast<size_t>(k) * s.state + n] = _mm256_load_ps(lanes);
    }
  return out;
}

// The state of a block of channels as N vectors from / to a (I, N) row-major matrix.
void gather(const Sizes& s, const float* from, int block, __m256* h) {
  for (int n = 0; n < s.state; ++n) {
    alignas(32) float lanes[8] = {};
    for (int l = 0; l < 8 && 8 * block + l < s.inner; ++l) lanes[l] = from[(8 * block + l) * s.state + n];
    h[n] = _mm256_load_ps(lanes);
  }
}

void scatter(const Sizes& s, const __m256* h, int block, float* to) {
  for (int n = 0; n < s.state; ++n) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, h[n]);
    for (int l = 0; l < 8 && 8 * block + l < s.inner; ++l) to[(8 * block + l) * s.state + n] = lanes[l];
  }
}

// One block's T steps forward from h (N vectors, updated in place). With `ys`, y_t is stored
// there; with `hs`, the states h_0 .. h_{T-1} at hs + t·N.
void steps_forward(const Sizes& s, int b, int block, const __m256* A, const float* delta, const float* u,
                   const float* Bs, const float* Cs, __m256* h, float* ys, __m256* hs) {
  const Lanes m(s.inner - 8 * block);
  const int i = 8 * block;
  for (int t = 0; t < s.steps; ++t) {
    const __m256 d = m.load(delta + s.at(b, t, s.inner) + i);
    const __m256 du = _mm256_mul_ps(d, m.load(u + s.at(b, t, s.inner) + i));
    const float *B = Bs + s.at(b, t, s.state), *C = Cs + s.at(b, t, s.state);
    __m256 y = _mm256_setzero_ps();
    for (int n = 0; n < s.state; ++n) {
      const __m256 a = exp_nonpositive(_mm256_mul_ps(d, A[n]));
      h[n] = _mm256_fmadd_ps(a, h[n], _mm256_mul_ps(du, _mm256_set1_ps(B[n])));
      y = _mm256_fmadd_ps(h[n], _mm256_set1_ps(C[n]), y);
    }
    if (ys) m.store(ys + s.at(b, t, s.inner) + i, y);
    if (hs) std::copy_n(h, s.state, hs + static_cast<size_t>(t) * s.state);
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::F32> A,
                   ffi::Buffer<ffi::F32> Bs, ffi::Buffer<ffi::F32> Cs, ffi::Buffer<ffi::F32> u,
                   ffi::Buffer<ffi::F32> h0, ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> h_last) {
  const Sizes s = sizes_of(delta, A);
  Vectors At = transposed(s, A.typed_data());
  const size_t matrix = static_cast<size_t>(s.inner) * s.state;
  in_parallel(pool, static_cast<long>(s.batch) * s.blocks(), [&](long begin, long end) {
    Vectors h(s.state);
    for (long item = begin; item < end; ++item) {
      const int b = static_cast<int>(item / s.blocks()), block = static_cast<int>(item % s.blocks());
      gather(s, h0.typed_data() + b * matrix, block, h.data());
      steps_forward(s, b, block, At.data() + static_cast<size_t>(block) * s.state, delta.typed_data(),
                    u.typed_data(), Bs.typed_data(), Cs.typed_data(), h.data(), ys->typed_data(), nullptr);
      scatter(s, h.data(), block, h_last->typed_data() + b * matrix);
    }
  }, s.parts());
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::F32> A,
                    ffi::Buffer<ffi::F32> Bs, ffi::Buffer<ffi::F32> Cs, ffi::Buffer<ffi::F32> u,
                    ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> d_ys, ffi::Buffer<ffi::F32> d_last,
                    ffi::ResultBuffer<ffi::F32> d_delta, ffi::ResultBuffer<ffi::F32> d_A,
                    ffi::ResultBuffer<ffi::F32> d_Bs, ffi::ResultBuffer<ffi::F32> d_Cs,
                    ffi::ResultBuffer<ffi::F32> d_u, ffi::ResultBuffer<ffi::F32> d_h0) {
  const Sizes s = sizes_of(delta, A);
  Vectors At = transposed(s, A.typed_data());
  const size_t matrix = static_cast<size_t>(s.inner) * s.state;
  in_parallel(pool, s.batch, [&](long begin, long end) {
    const int N = s.state;
    Vectors hs(static_cast<size_t>(s.steps + 1) * N), g(N), d_a(N);  // hs: h_{-1} .. h_{T-1}
    for (int b = static_cast<int>(begin); b < end; ++b) {
      float *dB_row = d_Bs->typed_data() + s.at(b, 0, N), *dC_row = d_Cs->typed_data() + s.at(b, 0, N);
      std::fill_n(dB_row, static_cast<size_t>(s.steps) * N, 0.0f), std::fill_n(dC_row, static_cast<size_t>(s.steps) * N, 0.0f);
      for (int block = 0; block < s.blocks(); ++block) {
        const __m256* Ab = At.data() + static_cast<size_t>(block) * N;
        const Lanes m(s.inner - 8 * block);
        const int i = 8 * block;
        gather(s, h0.typed_data() + b * matrix, block, hs.data());
        std::copy_n(hs.data(), N, g.data());  // g holds the state going forward, then ∂h going back
        steps_forward(s, b, block, Ab, delta.typed_data(), u.typed_data(), Bs.typed_data(), Cs.typed_data(),
                      g.data(), nullptr, hs.data() + N);
        gather(s, d_last.typed_data() + b * matrix, block, g.data());
        std::fill_n(d_a.data(), N, _mm256_setzero_ps());
        for (int t = s.steps - 1; t >= 0; --t) {
          const size_t row = s.at(b, t, s.inner) + i;
          const __m256 d = m.load(delta.typed_data() + row), x = m.load(u.typed_data() + row);
          const __m256 dy = m.load(d_ys.typed_data() + row), dx = _mm256_mul_ps(d, x);
          const float *B = Bs.typed_data() + s.at(b, t, N), *C = Cs.typed_data() + s.at(b, t, N);
          float *dB = dB_row + static_cast<size_t>(t) * N, *dC = dC_row + static_cast<size_t>(t) * N;
          const __m256 *h = hs.data() + static_cast<size_t>(t + 1) * N, *h_prev = h - N;
          __m256 dd = _mm256_setzero_ps(), gB = _mm256_setzero_ps();
          for (int n = 0; n < N; ++n) {
            const __m256 Bn = _mm256_set1_ps(B[n]);
            const __m256 gn = _mm256_fmadd_ps(dy, _mm256_set1_ps(C[n]), g[n]);
            dC[n] += sum8(_mm256_mul_ps(h[n], dy));
            const __m256 a = exp_nonpositive(_mm256_mul_ps(d, Ab[n]));
            const __m256 ga = _mm256_mul_ps(_mm256_mul_ps(gn, h_prev[n]), a);  // ∂a_t ⊗ a_t
            dd = _mm256_fmadd_ps(ga, Ab[n], _mm256_fmadd_ps(_mm256_mul_ps(gn, x), Bn, dd));
            d_a[n] = _mm256_fmadd_ps(ga, d, d_a[n]);
            dB[n] += sum8(_mm256_mul_ps(gn, dx));
            gB = _mm256_fmadd_ps(gn, Bn, gB);
            g[n] = _mm256_mul_ps(gn, a);
          }
          m.store(d_delta->typed_data() + row, dd);
          m.store(d_u->typed_data() + row, _mm256_mul_ps(gB, d));
        }
        scatter(s, g.data(), block, d_h0->typed_data() + b * matrix);
        scatter(s, d_a.data(), block, d_A->typed_data() + b * matrix);
      }
    }
  }, s.parts());
  return ffi::Error::Success();
}

}  // namespace

#pragma GCC pop_options

// What both handlers take first: the thread pool, then Δ, A, B, C, u, h0.
static auto with_scan_inputs() {
  using F32 = ffi::Buffer<ffi::F32>;
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_selective_forward, Forward,
                              with_scan_inputs()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>());  // h_{T-1}

XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_selective_backward, Backward,
                              with_scan_inputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ∂y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ∂h_{T-1}
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ∂Δ
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ∂A, per row
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ∂B
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ∂C
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ∂u
                                  .Ret<ffi::Buffer<ffi::F32>>());  // ∂h0
