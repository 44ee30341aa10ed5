// The selective scan of Mamba (dp.SelectiveSSM) for float32 on x86-64 CPUs with AVX2 and FMA or
// AVX-512 (cpu.h's `simd`), as two XLA FFI handlers. With a_t = exp(Δ_t A) and b_t = (Δ_t ⊗ u_t) B_t, never stored:
//   h_t = a_t ⊗ h_{t-1} + b_t  (I × N, from h_{-1} = h0),   y_t = h_t C_t
//   backward, from ∂y_t and ∂h_{T-1}: g_t = ∂h_t = c_t ∂y_t + a_{t+1} ⊗ g_{t+1},
//   ∂C_t = Σ_i h_t ∂y_t,  ∂B_t = Σ_i g_t Δ_t u_t,  ∂u_t = Δ_t Σ_n g_t B_t,
//   ∂Δ_t = Σ_n g_t (h_{t-1} a_t A + u_t B_t),  ∂A = Σ_t g_t h_{t-1} a_t Δ_t,  ∂h0 = a_0 ⊗ g_0.
// Channels are independent: a vector holds kLanes channels i and the state is N such vectors.
// The forward pass runs a (row, kLanes channels) item per task; the backward pass runs a row per task, its
// blocks of channels one after the other, each first recomputing its states forward (T·N vectors)
// and then running the steps in reverse. ∂A comes back per row (summed by the caller).
// Layout: Δ, u, y, ∂Δ, ∂u (B, T, I); B, C, ∂B, ∂C (B, T, N); A (I, N); h0, h, ∂A (B, I, N).
#include <vector>

#include "cpu.h"

namespace {

struct Sizes {
  int batch, steps, inner, state;
  int blocks() const { return (inner + kLanes - 1) / kLanes; }
  // Threads worth starting: handing work to another thread costs ~50 µs, the time of ~4 MFLOP.
  long parts() const { return 1 + 20L * batch * steps * inner * state / 4'000'000; }
  size_t at(int b, int t, int width) const { return (static_cast<size_t>(b) * steps + t) * width; }
};

Sizes sizes_of(ffi::Buffer<ffi::F32>& delta, ffi::Buffer<ffi::F32>& A) {
  auto d = delta.dimensions();
  return {static_cast<int>(d[0]), static_cast<int>(d[1]), static_cast<int>(d[2]),
          static_cast<int>(A.dimensions()[1])};
}

// Arrays of vectors, aligned: std::vector<vec> is not (GCC drops the vector type's alignment
// when it is a template argument).
struct alignas(sizeof(vec)) Vector { float lanes[kLanes]; };
struct Vectors {
  std::vector<Vector> storage;
  explicit Vectors(size_t n) : storage(n) {}
  vec* data() { return reinterpret_cast<vec*>(storage.data()); }
  vec& operator[](size_t k) { return data()[k]; }
};

// The vector of a (I, N) row-major matrix's column n over the block's kLanes rows (0 past I).
vec column(const Sizes& s, const float* from, int block, int n) {
  float lanes[kLanes] = {};
  for (int l = 0; l < kLanes && kLanes * block + l < s.inner; ++l) lanes[l] = from[(kLanes * block + l) * s.state + n];
  return simd::load(lanes);
}

// Aᵀ in blocks of kLanes channels: the vector of A[i0..i0+kLanes, n] at [block · N + n], 0 past I.
Vectors transposed(const Sizes& s, const float* A) {
  Vectors out(static_cast<size_t>(s.blocks()) * s.state);
  for (int k = 0; k < s.blocks(); ++k)
    for (int n = 0; n < s.state; ++n) out[static_cast<size_t>(k) * s.state + n] = column(s, A, k, n);
  return out;
}

// The state of a block of channels as N vectors from / to a (I, N) row-major matrix.
void gather(const Sizes& s, const float* from, int block, vec* h) {
  for (int n = 0; n < s.state; ++n) h[n] = column(s, from, block, n);
}

void scatter(const Sizes& s, const vec* h, int block, float* to) {
  for (int n = 0; n < s.state; ++n) {
    float lanes[kLanes];
    simd::store(lanes, h[n]);
    for (int l = 0; l < kLanes && kLanes * block + l < s.inner; ++l) to[(kLanes * block + l) * s.state + n] = lanes[l];
  }
}

// One block's T steps forward from h (N vectors, updated in place). With `ys`, y_t is stored
// there; with `hs`, the states h_0 .. h_{T-1} at hs + t·N.
void steps_forward(const Sizes& s, int b, int block, const vec* A, const float* delta, const float* u,
                   const float* Bs, const float* Cs, vec* h, float* ys, vec* hs) {
  const Lanes m(s.inner - kLanes * block);
  const int i = kLanes * block;
  for (int t = 0; t < s.steps; ++t) {
    const vec d = m.load(delta + s.at(b, t, s.inner) + i);
    const vec du = d * m.load(u + s.at(b, t, s.inner) + i);
    const float *B = Bs + s.at(b, t, s.state), *C = Cs + s.at(b, t, s.state);
    vec y = simd::zero();
    for (int n = 0; n < s.state; ++n) {
      const vec a = exp_nonpositive(d * A[n]);
      h[n] = simd::fmadd(a, h[n], du * simd::splat(B[n]));
      y = simd::fmadd(h[n], simd::splat(C[n]), y);
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
        const vec* Ab = At.data() + static_cast<size_t>(block) * N;
        const Lanes m(s.inner - kLanes * block);
        const int i = kLanes * block;
        gather(s, h0.typed_data() + b * matrix, block, hs.data());
        std::copy_n(hs.data(), N, g.data());  // g holds the state going forward, then ∂h going back
        steps_forward(s, b, block, Ab, delta.typed_data(), u.typed_data(), Bs.typed_data(), Cs.typed_data(),
                      g.data(), nullptr, hs.data() + N);
        gather(s, d_last.typed_data() + b * matrix, block, g.data());
        std::fill_n(d_a.data(), N, simd::zero());
        for (int t = s.steps - 1; t >= 0; --t) {
          const size_t row = s.at(b, t, s.inner) + i;
          const vec d = m.load(delta.typed_data() + row), x = m.load(u.typed_data() + row);
          const vec dy = m.load(d_ys.typed_data() + row), dx = d * x;
          const float *B = Bs.typed_data() + s.at(b, t, N), *C = Cs.typed_data() + s.at(b, t, N);
          float *dB = dB_row + static_cast<size_t>(t) * N, *dC = dC_row + static_cast<size_t>(t) * N;
          const vec *h = hs.data() + static_cast<size_t>(t + 1) * N, *h_prev = h - N;
          vec dd = simd::zero(), gB = simd::zero();
          for (int n = 0; n < N; ++n) {
            using simd::fmadd;
            const vec Bn = simd::splat(B[n]);
            const vec gn = fmadd(dy, simd::splat(C[n]), g[n]);
            dC[n] += simd::sum(h[n] * dy);
            const vec a = exp_nonpositive(d * Ab[n]);
            const vec ga = gn * h_prev[n] * a;  // ∂a_t ⊗ a_t
            dd = fmadd(ga, Ab[n], fmadd(gn * x, Bn, dd));
            d_a[n] = fmadd(ga, d, d_a[n]);
            dB[n] += simd::sum(gn * dx);
            gB = fmadd(gn, Bn, gB);
            g[n] = gn * a;
          }
          m.store(d_delta->typed_data() + row, dd);
          m.store(d_u->typed_data() + row, gB * d);
        }
        scatter(s, g.data(), block, d_h0->typed_data() + b * matrix);
        scatter(s, d_a.data(), block, d_A->typed_data() + b * matrix);
      }
    }
  }, s.parts());
  return ffi::Error::Success();
}

}  // namespace

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
