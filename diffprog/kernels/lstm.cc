// The LSTM recurrence for float32 on x86-64 CPUs with AVX2 and FMA or AVX-512 (cpu.h's `simd`),
// as XLA FFI handlers.
// The input projection x_t W_x (all steps at once; after a token embedding, a row of the
// projected table per token, read by `ForwardFromTable`) and the weight gradients are XLA's
// matrix products; these handlers run what is left, the T steps one after the other. Per step t:
//   z_t = xw_t + bias + h_{t-1} W_h                      (G = 4H columns: remember|save|focus|candidate)
//   f, i, o = σ(z_f), σ(z_i), σ(z_o),  g = tanh(z_g)
//   c_t = f ⊙ c_{t-1} + i ⊙ g,  h_t = o ⊙ tanh(c_t)
//   backward, from ∂h_t (output + carry) and ∂c_t:  ∂o = ∂h_t ⊙ tanh(c_t),
//   ∂c = ∂c_t + ∂h_t ⊙ o ⊙ (1 − tanh²(c_t)),  ∂f = ∂c ⊙ c_{t-1},  ∂i = ∂c ⊙ g,  ∂g = ∂c ⊙ i,
//   ∂z = [∂f f(1−f), ∂i i(1−i), ∂o o(1−o), ∂g (1−g²)],  ∂c_{t-1} = ∂c ⊙ f,  ∂h_{t-1} = ∂z W_hᵀ
// Rows of the batch are independent, so each thread runs all T steps for its own rows. A row
// past its length keeps its state, outputs 0 and passes its gradients through. The per-step
// products h_{t-1} W_h and ∂z W_hᵀ multiply by W_h packed once per call: by MKL's packed sgemm
// where Python handed it over (cpu.h's `vendor_gemms`) — its bfloat16 GEMM under autocast
// (`bfloat16`) — else by cpu.h's micro-kernel (under autocast its bfloat16 pairs, AVX512-BF16).
// Layout: xw, gates, ∂z (T, B, G); hs, cs, ∂hs (T, B, H); states (B, H); lengths (B,) int32.
#include <limits>
#include <vector>

#include "cpu.h"

namespace {

// tanh(x) as a rational function of x on [−7.9053, 7.9053] (outside it ±1 to float precision),
// absolute error ~2e-7; the approximation XLA and Eigen use for float32.
vec tanh(vec x) {
  using simd::fmadd, simd::splat;
  const vec limit = splat(7.90531110763549805f);
  x = simd::max(-limit, simd::min(limit, x));
  const vec x2 = x * x;
  vec p = splat(-2.76076847742355e-16f);
  for (float a : {2.00018790482477e-13f, -8.60467152213735e-11f, 5.12229709037114e-08f, 1.48572235717979e-05f,
                  6.37261928875436e-04f, 4.89352455891786e-03f})
    p = fmadd(p, x2, splat(a));
  vec q = splat(1.19825839466702e-06f);
  for (float b : {1.18534705686654e-04f, 2.26843463243900e-03f, 4.89352518554385e-03f})
    q = fmadd(q, x2, splat(b));
  return p * x / q;
}

vec sigmoid(vec x) {  // σ(x) = (1 + tanh(x/2)) / 2
  const vec half = simd::splat(0.5f);
  return simd::fmadd(half, tanh(half * x), half);
}

struct Sizes {
  int steps, batch, hidden;
  int gates() const { return 4 * hidden; }
  // Threads worth starting: handing work to another thread costs ~50 µs, the time of ~4 MFLOP.
  long parts() const { return 1 + 2L * steps * batch * hidden * gates() / 4'000'000; }
  size_t at(int t, int b, int width) const { return (static_cast<size_t>(t) * batch + b) * width; }
};

// One row's step forward: the gates from z (= pre + xw + bias), the new state (c, h) in place.
void cell_forward(int hidden, const float* pre, const float* xw, const float* bias, float* c, float* h,
                  float* gates, float* h_out, float* c_out) {
  for (int j = 0; j < hidden; j += kLanes) {
    const Lanes m(hidden - j);
    vec z[4];
    for (int k = 0; k < 4; ++k) {
      const int at = k * hidden + j;
      z[k] = m.load(pre + at) + (m.load(xw + at) + m.load(bias + at));
    }
    const vec remember = sigmoid(z[0]), save = sigmoid(z[1]), focus = sigmoid(z[2]), candidate = tanh(z[3]);
    const vec cell = simd::fmadd(remember, m.load(c + j), save * candidate);
    const vec out = focus * tanh(cell);
    const vec values[4] = {remember, save, focus, candidate};
    for (int k = 0; k < 4; ++k) m.store(gates + k * hidden + j, values[k]);
    m.store(c + j, cell), m.store(c_out + j, cell);
    m.store(h + j, out), m.store(h_out + j, out);
  }
}

// One row's step backward: ∂z from ∂h_t = d_out + d_h and ∂c_t = d_c; d_c becomes ∂c_{t-1}.
void cell_backward(int hidden, const float* gates, const float* c, const float* c_prev, const float* d_out,
                   const float* d_h, float* d_c, float* d_z) {
  const vec one = simd::splat(1.0f);
  for (int j = 0; j < hidden; j += kLanes) {
    const Lanes m(hidden - j);
    const vec remember = m.load(gates + j), save = m.load(gates + hidden + j);
    const vec focus = m.load(gates + 2 * hidden + j);
    const vec candidate = m.load(gates + 3 * hidden + j);
    const vec squashed = tanh(m.load(c + j));
    const vec dh = m.load(d_out + j) + m.load(d_h + j);
    const vec d_focus = dh * squashed;
    const vec dc = simd::fmadd(dh * focus, simd::fnmadd(squashed, squashed, one), m.load(d_c + j));
    const vec d_remember = dc * m.load(c_prev + j);
    const vec d_save = dc * candidate, d_candidate = dc * save;
    auto through_sigmoid = [&](vec d, vec s) { return d * (s * (one - s)); };
    m.store(d_z + j, through_sigmoid(d_remember, remember));
    m.store(d_z + hidden + j, through_sigmoid(d_save, save));
    m.store(d_z + 2 * hidden + j, through_sigmoid(d_focus, focus));
    m.store(d_z + 3 * hidden + j, d_candidate * simd::fnmadd(candidate, candidate, one));
    m.store(d_c + j, dc * remember);
  }
}

// C (rows × n) = A (rows × k) W at every step, W (k × n) the same at all of them: W_h, or W_hᵀ
// (`transposed`: w is stored n × k), packed once: for MKL's packed sgemm, or with `bfloat16` for
// its bfloat16 × bfloat16 → float32 GEMM (A and W rounded to bfloat16: autocast's products, on
// AMX or AVX512-BF16), or, without MKL, for the micro-kernel: float32, or with `bfloat16` its
// bfloat16 pairs where the CPU has AVX512-BF16 (AMD's AVX-512 CPUs; float32 where it has not).
class StepProduct {
 public:
  StepProduct(const float* w, bool transposed, int rows, int k, int n, bool bfloat16)
      : vendor_(vendor_gemms.load()), bfloat16_(bfloat16), rows_(rows), k_(k), n_(n) {
    const int ld = transposed ? k : n, identifier = 162, transpose = transposed ? 112 : 111;
    if (vendor_ && bfloat16_) {
      std::vector<uint16_t> rounded(static_cast<size_t>(k) * n);
      for (size_t i = 0; i < rounded.size(); ++i) rounded[i] = to_bfloat16(w[i]);
      packed16_.resize(vendor_->size_bf16(identifier, rows, n, k) / sizeof(uint16_t) + 1);
      vendor_->pack_bf16(101, identifier, transpose, rows, n, k, rounded.data(), ld, packed16_.data());
      a16_.resize(static_cast<size_t>(rows) * k);
    } else if (vendor_) {
      packed_.resize(vendor_->size(identifier, rows, n, k) / sizeof(float) + 1);
      vendor_->pack(101, identifier, transpose, rows, n, k, 1.0f, w, ld, packed_.data());
    } else {
      packed_.resize(packed_size(k, n));
      transposed ? pack_transposed(w, k, n, k, packed_.data()) : pack(w, n, k, n, packed_.data());
#if defined(__AVX512BF16__)
      if (bfloat16_) {
        pairs_.resize(paired_size(k, n));
        pair_rows(packed_.data(), k, n, pairs_.data());
        a_pairs_.resize(static_cast<size_t>(rows) * (k + 1) / 2 + kLanes);
      }
#endif
    }
  }
  void operator()(const float* a, float* c) {
    if (vendor_ && bfloat16_) {
      for (size_t i = 0; i < a16_.size(); ++i) a16_[i] = to_bfloat16(a[i]);
      vendor_->compute_bf16(101, 111, 151, rows_, n_, k_, 1.0f, a16_.data(), k_, packed16_.data(), n_, 0.0f, c, n_);
    } else if (vendor_) {
      vendor_->compute(101, 111, 151, rows_, n_, k_, a, k_, packed_.data(), n_, 0.0f, c, n_);
#if defined(__AVX512BF16__)
    } else if (bfloat16_) {
      const int pairs = (k_ + 1) / 2;
      for (int r = 0; r < rows_; ++r) pair_row(a + static_cast<size_t>(r) * k_, k_, a_pairs_.data() + r * pairs);
      multiply<Bfloat16Pairs>(rows_, n_, pairs, {a_pairs_.data(), pairs, 1}, pairs_.data(), c, n_);
#endif
    } else {
      multiply(rows_, n_, k_, {a, k_, 1}, packed_.data(), c, n_);
    }
  }

 private:
  const PackedGemms* vendor_;
  bool bfloat16_;
  int rows_, k_, n_;
  std::vector<float> packed_;
  std::vector<uint16_t> packed16_, a16_;
  std::vector<uint32_t> pairs_, a_pairs_;
};

Sizes sizes_of(ffi::Buffer<ffi::F32>& xw) {
  auto dims = xw.dimensions();
  return {static_cast<int>(dims[0]), static_cast<int>(dims[1]), static_cast<int>(dims[2] / 4)};
}

// The T steps forward; xw_row(t, b) is where x_t W_x of row b is (G floats).
template <class XwRow>
ffi::Error Steps(ffi::ThreadPool pool, const Sizes n, XwRow xw_row, ffi::Buffer<ffi::F32>& bias,
                 ffi::Buffer<ffi::F32>& w_h, ffi::Buffer<ffi::F32>& h0, ffi::Buffer<ffi::F32>& c0,
                 ffi::Buffer<ffi::S32>& lengths, bool bfloat16, ffi::ResultBuffer<ffi::F32>& hs,
                 ffi::ResultBuffer<ffi::F32>& h, ffi::ResultBuffer<ffi::F32>& c, ffi::ResultBuffer<ffi::F32>& gates,
                 ffi::ResultBuffer<ffi::F32>& cs) {
  const int H = n.hidden, G = n.gates();
  std::copy_n(h0.typed_data(), static_cast<size_t>(n.batch) * H, h->typed_data());
  std::copy_n(c0.typed_data(), static_cast<size_t>(n.batch) * H, c->typed_data());
  in_parallel(pool, n.batch, [&](long begin, long end) {
    const int rows = static_cast<int>(end - begin);
    std::vector<float> pre(static_cast<size_t>(rows) * G);
    float *h_rows = h->typed_data() + begin * H, *c_rows = c->typed_data() + begin * H;
    StepProduct by_w_h(w_h.typed_data(), false, rows, H, G, bfloat16);
    for (int t = 0; t < n.steps; ++t) {
      by_w_h(h_rows, pre.data());
      for (int r = 0; r < rows; ++r) {
        const int b = static_cast<int>(begin) + r;
        float *h_out = hs->typed_data() + n.at(t, b, H), *c_out = cs->typed_data() + n.at(t, b, H);
        float* gates_out = gates->typed_data() + n.at(t, b, G);
        if (t < lengths.typed_data()[b]) {
          cell_forward(H, pre.data() + static_cast<size_t>(r) * G, xw_row(t, b), bias.typed_data(), c_rows + r * H,
                       h_rows + r * H, gates_out, h_out, c_out);
        } else {
          std::fill_n(h_out, H, 0.0f), std::fill_n(gates_out, G, 0.0f);
          std::copy_n(c_rows + r * H, H, c_out);
        }
      }
    }
  }, n.parts());
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xw, ffi::Buffer<ffi::F32> bias,
                   ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                   ffi::Buffer<ffi::S32> lengths, bool bfloat16, ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> h,
                   ffi::ResultBuffer<ffi::F32> c, ffi::ResultBuffer<ffi::F32> gates, ffi::ResultBuffer<ffi::F32> cs) {
  const Sizes n = sizes_of(xw);
  const float* rows = xw.typed_data();
  return Steps(pool, n, [&](int t, int b) { return rows + n.at(t, b, n.gates()); }, bias, w_h, h0, c0, lengths,
               bfloat16, hs, h, c, gates, cs);
}

// The same steps with x_t W_x of row b the row ids[t, b] of table (V, G) — a row of NaN where the
// id is outside [0, V), as `EmbedToken.lookup` under jit —, read as each step needs it: the
// (T, B, G) array of `Forward`'s xw is never written.
ffi::Error ForwardFromTable(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::S32> ids,
                            ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> h0,
                            ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::S32> lengths, bool bfloat16,
                            ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> h, ffi::ResultBuffer<ffi::F32> c,
                            ffi::ResultBuffer<ffi::F32> gates, ffi::ResultBuffer<ffi::F32> cs) {
  const auto steps = ids.dimensions(), width = table.dimensions();
  const Sizes n{static_cast<int>(steps[0]), static_cast<int>(steps[1]), static_cast<int>(width[1] / 4)};
  const long vocab = width[0];
  const std::vector<float> missing(n.gates(), std::numeric_limits<float>::quiet_NaN());
  const float* rows = table.typed_data();
  const int32_t* id = ids.typed_data();
  return Steps(pool, n, [&](int t, int b) {
    const long at = id[static_cast<size_t>(t) * n.batch + b];
    return at >= 0 && at < vocab ? rows + at * n.gates() : missing.data();
  }, bias, w_h, h0, c0, lengths, bfloat16, hs, h, c, gates, cs);
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> gates,
                    ffi::Buffer<ffi::F32> cs, ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::S32> lengths,
                    ffi::Buffer<ffi::F32> d_hs, ffi::Buffer<ffi::F32> d_h, ffi::Buffer<ffi::F32> d_c,
                    bool bfloat16, ffi::ResultBuffer<ffi::F32> d_z, ffi::ResultBuffer<ffi::F32> d_h0,
                    ffi::ResultBuffer<ffi::F32> d_c0) {
  const Sizes n = sizes_of(gates);
  const int H = n.hidden, G = n.gates();
  std::copy_n(d_h.typed_data(), static_cast<size_t>(n.batch) * H, d_h0->typed_data());
  std::copy_n(d_c.typed_data(), static_cast<size_t>(n.batch) * H, d_c0->typed_data());
  in_parallel(pool, n.batch, [&](long begin, long end) {
    const int rows = static_cast<int>(end - begin);
    std::vector<float> back(static_cast<size_t>(rows) * H);
    float *dh_rows = d_h0->typed_data() + begin * H, *dc_rows = d_c0->typed_data() + begin * H;
    StepProduct by_w_h_transposed(w_h.typed_data(), true, rows, G, H, bfloat16);
    for (int t = n.steps - 1; t >= 0; --t) {
      float* d_z_rows = d_z->typed_data() + n.at(t, static_cast<int>(begin), G);
      for (int r = 0; r < rows; ++r) {
        const int b = static_cast<int>(begin) + r;
        if (t < lengths.typed_data()[b]) {
          const float* c_prev = t ? cs.typed_data() + n.at(t - 1, b, H) : c0.typed_data() + static_cast<size_t>(b) * H;
          cell_backward(H, gates.typed_data() + n.at(t, b, G), cs.typed_data() + n.at(t, b, H), c_prev,
                        d_hs.typed_data() + n.at(t, b, H), dh_rows + r * H, dc_rows + r * H,
                        d_z_rows + static_cast<size_t>(r) * G);
        } else {
          std::fill_n(d_z_rows + static_cast<size_t>(r) * G, G, 0.0f);
        }
      }
      by_w_h_transposed(d_z_rows, back.data());
      for (int r = 0; r < rows; ++r)
        if (t < lengths.typed_data()[begin + r]) std::copy_n(back.data() + r * H, H, dh_rows + r * H);
    }
  }, n.parts());
  return ffi::Error::Success();
}

}  // namespace

// MKL's packed GEMMs (float32's three functions, then bfloat16's), or nulls for the micro-kernel.
extern "C" void diffprog_use_sgemm(void* size, void* pack, void* compute, void* size_bf16, void* pack_bf16,
                                   void* compute_bf16) {
  static PackedGemms mkl;
  if (!size || !pack || !compute || !size_bf16 || !pack_bf16 || !compute_bf16) return vendor_gemms.store(nullptr);
  mkl = {reinterpret_cast<decltype(mkl.size)>(size), reinterpret_cast<decltype(mkl.pack)>(pack),
         reinterpret_cast<decltype(mkl.compute)>(compute), reinterpret_cast<decltype(mkl.size_bf16)>(size_bf16),
         reinterpret_cast<decltype(mkl.pack_bf16)>(pack_bf16),
         reinterpret_cast<decltype(mkl.compute_bf16)>(compute_bf16)};
  vendor_gemms.store(&mkl);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_lstm_forward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xw
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Attr<bool>("bfloat16")        // the per-step products in bfloat16
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c
                                  .Ret<ffi::Buffer<ffi::F32>>()  // gates
                                  .Ret<ffi::Buffer<ffi::F32>>());  // cs

XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_lstm_forward_from_table, ForwardFromTable,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // table (V, G)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids (T, B)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Attr<bool>("bfloat16")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hs
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c
                                  .Ret<ffi::Buffer<ffi::F32>>()  // gates
                                  .Ret<ffi::Buffer<ffi::F32>>());  // cs

XLA_FFI_DEFINE_HANDLER_SYMBOL(diffprog_lstm_backward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gates
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_hs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_c
                                  .Attr<bool>("bfloat16")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_z
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_h0
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d_c0
