// The selective scan of Mamba (dp.SelectiveSSM) for float32 on x86-64 CPUs with AVX2 and FMA, as
// two XLA FFI handlers. With a_t = exp(Δ_t A) and b_t = (Δ_t ⊗ u_t) B_t, never stored:
//   h_t = a_t ⊗ h_{t-1} + b_t  (I × N, from h_{-1} = h0),   y_t = h_t C_t
//   backward, from ∂y_t and ∂h_{T-1}: g_t = ∂h_t = c_t ∂y_t + a_{t+1} ⊗ g_{t+1},
//   ∂C_t = Σ_i h_t ∂y_t,  ∂B_t = Σ_i g_t Δ_t u_t,  ∂u_t = Δ_t Σ_n g_t B_t,
//   ∂Δ_t = Σ_n g_t (h_{t-1} a_t A + u_t B_t),  ∂A = Σ_t g_t h_{t-1} a_t Δ_t,  ∂h0 = a_0 ⊗ g_0.
// Channels are independent: a vector holds 8 channels i (a block) and its state is N such vectors.
// Time runs in chunks of kChunk steps, and within a chunk a group of kGroup blocks one after the
// other, so that the strided rows of Δ and u a chunk reads stay in cache for the whole group. The
// forward pass runs a (row, group) per task. The backward pass runs a row per task (its ∂B, ∂C sum
// over channels): per group, the states at every chunk's start forward, then the chunks in
// reverse, each chunk's states recomputed from its start (kChunk·N vectors, in L1) and its steps
// run backward. ∂A comes back per row (summed by the caller).
// Layout: Δ, u, y, ∂Δ, ∂u (B, T, I); B, C, ∂B, ∂C (B, T, N); A (I, N); h0, h, ∂A (B, I, N).
#include <vector>

#include "cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

constexpr int kChunk = 64;  // steps
constexpr int kGroup = 8;   // blocks of 8 channels

struct Sizes {
  int batch, steps, inner, state;
  int blocks() const { return (inner + 7) / 8; }
  int groups() const { return (blocks() + kGroup - 1) / kGroup; }
  int chunks() const { return (steps + kChunk - 1) / kChunk; }
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

// Steps [t0, t1) of one block forward from h (N vectors, updated in place). With `ys`, y_t is
// stored there; with `hs`, the state h_t at hs + (t − t0)·N.
void steps_forward(const Sizes& s, int b, int block, int t0, int t1, const __m256* A, const float* delta,
                   const float* u, const float* Bs, const float* Cs, __m256* h, float* ys, __m256* hs) {
  const Lanes m(s.inner - 8 * block);
  const int i = 8 * block;
  for (int t = t0; t < t1; ++t) {
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
    if (hs) std::copy_n(h, s.state, hs + static_cast<size_t>(t - t0) * s.state);
  }
}

struct Inputs {
  const float *delta, *u, *Bs, *Cs, *d_ys;
};

struct Gradients {
  float *d_delta, *d_u, *d_Bs, *d_Cs;
};

// Steps [t0, t1) of one block backward: hs holds h_{t0−1} .. h_{t1−1}; g (N vectors) enters as
// ∂h_{t1−1} and leaves as ∂h_{t0−1}; ∂A accumulates in d_a, ∂B and ∂C in the row's sums.
void steps_backward(const Sizes& s, int b, int block, int t0, int t1, const __m256* A, const Inputs& in,
                    const __m256* hs, __m256* g, __m256* d_a, const Gradients& out) {
  const int N = s.state, i = 8 * block;
  const Lanes m(s.inner - i);
  for (int t = t1 - 1; t >= t0; --t) {
    const size_t row = s.at(b, t, s.inner) + i;
    const __m256 d = m.load(in.delta + row), x = m.load(in.u + row), dy = m.load(in.d_ys + row);
    const __m256 dx = _mm256_mul_ps(d, x);
    const float *B = in.Bs + s.at(b, t, N), *C = in.Cs + s.at(b, t, N);
    float *dB = out.d_Bs + s.at(b, t, N), *dC = out.d_Cs + s.at(b, t, N);
    const __m256 *h = hs + static_cast<size_t>(t - t0 + 1) * N, *h_prev = h - N;
    __m256 dd = _mm256_setzero_ps(), gB = _mm256_setzero_ps();
    for (int n = 0; n < N; ++n) {
      const __m256 Bn = _mm256_set1_ps(B[n]);
      const __m256 gn = _mm256_fmadd_ps(dy, _mm256_set1_ps(C[n]), g[n]);
      dC[n] += sum8(_mm256_mul_ps(h[n], dy));
      const __m256 a = exp_nonpositive(_mm256_mul_ps(d, A[n]));
      const __m256 ga = _mm256_mul_ps(_mm256_mul_ps(gn, h_prev[n]), a);  // ∂a_t ⊗ a_t
      dd = _mm256_fmadd_ps(ga, A[n], _mm256_fmadd_ps(_mm256_mul_ps(gn, x), Bn, dd));
      d_a[n] = _mm256_fmadd_ps(ga, d, d_a[n]);
      dB[n] += sum8(_mm256_mul_ps(gn, dx));
      gB = _mm256_fmadd_ps(gn, Bn, gB);
      g[n] = _mm256_mul_ps(gn, a);
    }
    m.store(out.d_delta + row, dd);
    m.store(out.d_u + row, _mm256_mul_ps(gB, d));
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::F32> A,
                   ffi::Buffer<ffi::F32> Bs, ffi::Buffer<ffi::F32> Cs, ffi::Buffer<ffi::F32> u,
                   ffi::Buffer<ffi::F32> h0, ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> h_last) {
  const Sizes s = sizes_of(delta, A);
  const int N = s.state;
  Vectors At = transposed(s, A.typed_data());
  const size_t matrix = static_cast<size_t>(s.inner) * N;
  in_parallel(pool, static_cast<long>(s.batch) * s.groups(), [&](long begin, long end) {
    Vectors h(static_cast<size_t>(kGroup) * N);
    for (long item = begin; item < end; ++item) {
      const int b = static_cast<int>(item / s.groups()), first = static_cast<int>(item % s.groups()) * kGroup;
      const int last = std::min(first + kGroup, s.blocks());
      for (int block = first; block < last; ++block) gather(s, h0.typed_data() + b * matrix, block, &h[(block - first) * N]);
      for (int t0 = 0; t0 < s.steps; t0 += kChunk)
        for (int block = first; block < last; ++block)
          steps_forward(s, b, block, t0, std::min(t0 + kChunk, s.steps), &At[static_cast<size_t>(block) * N],
                        delta.typed_data(), u.typed_data(), Bs.typed_data(), Cs.typed_data(), &h[(block - first) * N],
                        ys->typed_data(), nullptr);
      for (int block = first; block < last; ++block) scatter(s, &h[(block - first) * N], block, h_last->typed_data() + b * matrix);
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
  const int N = s.state;
  Vectors At = transposed(s, A.typed_data());
  const size_t matrix = static_cast<size_t>(s.inner) * N, group = static_cast<size_t>(kGroup) * N;
  const Inputs in{delta.typed_data(), u.typed_data(), Bs.typed_data(), Cs.typed_data(), d_ys.typed_data()};
  const Gradients out{d_delta->typed_data(), d_u->typed_data(), d_Bs->typed_data(), d_Cs->typed_data()};
  in_parallel(pool, s.batch, [&](long begin, long end) {
    // starts: the group's states at every chunk's start; hs: one block's states through a chunk
    Vectors starts(s.chunks() * group), state(group), g(group), d_a(group), hs(static_cast<size_t>(kChunk + 1) * N);
    for (int b = static_cast<int>(begin); b < end; ++b) {
      std::fill_n(out.d_Bs + s.at(b, 0, N), static_cast<size_t>(s.steps) * N, 0.0f);
      std::fill_n(out.d_Cs + s.at(b, 0, N), static_cast<size_t>(s.steps) * N, 0.0f);
      for (int first = 0; first < s.blocks(); first += kGroup) {
        const int last = std::min(first + kGroup, s.blocks());
        auto at = [&](Vectors& v, int block, size_t offset = 0) { return &v[offset + static_cast<size_t>(block - first) * N]; };
        for (int block = first; block < last; ++block) {
          gather(s, h0.typed_data() + b * matrix, block, at(state, block));
          gather(s, d_last.typed_data() + b * matrix, block, at(g, block));
          std::fill_n(at(d_a, block), N, _mm256_setzero_ps());
        }
        for (int c = 0; c < s.chunks(); ++c) {
          std::copy_n(&state[0], group, &starts[c * group]);
          if (c + 1 < s.chunks())
            for (int block = first; block < last; ++block)
              steps_forward(s, b, block, c * kChunk, (c + 1) * kChunk, &At[static_cast<size_t>(block) * N], in.delta,
                            in.u, in.Bs, in.Cs, at(state, block), nullptr, nullptr);
        }
        for (int c = s.chunks() - 1; c >= 0; --c) {
          const int t0 = c * kChunk, t1 = std::min(t0 + kChunk, s.steps);
          for (int block = first; block < last; ++block) {
            const __m256* Ab = &At[static_cast<size_t>(block) * N];
            std::copy_n(at(starts, block, c * group), N, &hs[0]);
            std::copy_n(&hs[0], N, at(state, block));
            steps_forward(s, b, block, t0, t1, Ab, in.delta, in.u, in.Bs, in.Cs, at(state, block), nullptr, &hs[N]);
            steps_backward(s, b, block, t0, t1, Ab, in, &hs[0], at(g, block), at(d_a, block), out);
          }
        }
        for (int block = first; block < last; ++block) {
          scatter(s, at(g, block), block, d_h0->typed_data() + b * matrix);
          scatter(s, at(d_a, block), block, d_A->typed_data() + b * matrix);
        }
      }
    }
  }, s.parts());
  return ffi::Error::Success();
}

}  // namespace

#pragma GCC pop_options

XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_selective_forward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // Δ
                                  .Arg<ffi::Buffer<ffi::F32>>()  // A
                                  .Arg<ffi::Buffer<ffi::F32>>()  // B
                                  .Arg<ffi::Buffer<ffi::F32>>()  // C
                                  .Arg<ffi::Buffer<ffi::F32>>()  // u
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>());  // h_{T-1}

XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_selective_backward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // Δ
                                  .Arg<ffi::Buffer<ffi::F32>>()  // A
                                  .Arg<ffi::Buffer<ffi::F32>>()  // B
                                  .Arg<ffi::Buffer<ffi::F32>>()  // C
                                  .Arg<ffi::Buffer<ffi::F32>>()  // u
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ∂y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ∂h_{T-1}
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ∂Δ
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ∂A, per row
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ∂B
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ∂C
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ∂u
                                  .Ret<ffi::Buffer<ffi::F32>>());  // ∂h0
