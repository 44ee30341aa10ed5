"""The fast paths, and the one place that chooses them.

Each fast path computes what a layer's readable definition computes, faster on some platform;
the definition stays the reference it is tested against and the path taken everywhere else.

| fast path | used by | where | definition |
|---|---|---|---|
| `self_attention`: C++ kernel (attention.cc); under `autocast(bfloat16)` on a CPU with AMX its six products bfloat16 × bfloat16 → float32 on AMX tiles (`library.amx_attention`) | `Attention` (self, dot score, no mask) | CPU, float32 | `jax.nn.dot_product_attention` (causal: with a causal mask) |
| `projected_self_attention`: the same kernel reading q, k, v as thirds of one projection and adding their bias (float32; under autocast with AMX: split, then `self_attention`) | `Attention` (the same, kv_heads = heads, no rotary) | CPU, float32 | `self_attention` of the thirds + bias |
| `causal_attention_blocks`: blocks of 64 queries | the same, causal | elsewhere | the same |
| `recurrence` → `lstm_recurrence`: C++ kernels (lstm.cc), per-step products by MKL's packed sgemm on Intel's AVX-512 CPUs where installed, by cpu.h's micro-kernel on AVX2 ones and AMD's AVX-512 ones (`library.float32_by_mkl`, switched by `library.use_vendor_sgemm`; bfloat16 under `autocast`: MKL's, or the micro-kernel's on AVX512-BF16's pairs); after a token embedding its inputs' rows read from the projected table by the kernel (`TableRows`) | `LSTM` on a batch | CPU, float32 | `LSTM.scan` |
| `recurrence` → `scan_recurrence`: written-out backward pass | recurrent layers on a batch | elsewhere | `Recurrent.scan` |
| `product` → `gemm`: MKL's GEMM, float32 (on AVX2 CPUs those of depth ≤ 256 with A not transposed by cpu.h's micro-kernel: `library.float32_by_mkl`; on AMD's AVX-512 CPUs only those and bfloat16 Aᵀ B by the micro-kernel on AVX512-BF16's pairs, the rest XLA's dot: `library.mkl_at_full_width`) and bfloat16 (AMX where the CPU has it; bfloat16 products other than Aᵀ B run as XLA's dot into float32, the faster there: `runs_on_mkl`), ≥ `VENDOR_MIN_WORK` multiply-adds, sides ≥ `VENDOR_MIN_SIDE` | `Dense`, `FeedForward`, ... | CPU, MKL installed | `x @ w` |
| `relu_affine`: gemm.cc's shallow product (cpu.h's micro-kernel) adding the bias and taking the ReLU as it stores each tile, float32, `product`'s sizes, depth ≤ `SHALLOW_DEPTH`, where `library.float32_by_mkl()` is False (AVX2 CPUs, AMD's AVX-512 ones) | `FeedForward` with ReLU and a bias | CPU, MKL installed | `relu(product(x, w) + b)` |
| `step_product` → `gemm`: gemm.cc's shallow product (cpu.h's micro-kernel) for each step's product, whatever its size, float32, depth ≤ `SHALLOW_DEPTH`, where `library.float32_by_mkl()` is False (AVX2 CPUs, AMD's AVX-512 ones) | `Recurrent.scan`'s h W_h and its backward's ∂gh W_hᵀ (SimpleRNN, GRU, ...) | CPU, MKL installed | `h @ w_h` |
| `product` → `_narrowing_product`: transposed-operand gradient | the same | CPU, no MKL | the same |
| `summed_products`: MKL's Aᵀ B on the merged rows (T, B) as they lie (each device its shard, summed across devices) | the recurrent layers' weight gradients over all steps, float32 | CPU, MKL installed, `product`'s sizes | `jnp.tensordot` over the leading axes |
| `add_to_each`: the gradient of a table added to every example as a product with ones | `LearnedPositions` on a batch | CPU | `xs + y` (its gradient XLA's sum over the batch) |
| `selective_scan` → `kernel_selective`: C++ kernels (ssm.cc), the (T, I, N) terms never stored | `SelectiveSSM` | CPU, float32 | `scan_selective` (`lax.scan`, autodiff) |
| `selective_scan` → `written_selective`: the scan with a written-out backward pass | the same | CPU, other dtypes | the same |
| `selective_scan` → `parallel_selective`: `lax.associative_scan` (log T depth) | `SelectiveSSM` | accelerators | the same |

The platform is chosen at lowering (`lax.platform_dependent`: an accelerator program never holds a
CPU kernel); `disabled()` traces the definitions alone (e.g. to `jax.export` a model for CPU
serving, or to debug against the reference). The C++ kernels compile on first use (`build`,
with -march=native: AVX-512's width where the CPU has it, else AVX2's); where they cannot (no C++ compiler, not x86-64 with AVX2 and FMA), `available()` is False and the
jax.numpy paths run. Under a mesh each device runs a kernel on its own shard of the batch
(`partition.batch_partitioned`).
"""
from .attention import (attention_kernel, causal_attention, causal_attention_blocks, causal_attention_kernel,
                        projected_self_attention, self_attention, split_projection)
from .library import (available, build, cache_dir, disabled, enabled, in_float32_on_cpu, on_cpu,
                      vendor_blas)
from .products import add_to_each, autocast, gemm, product, relu_affine, step_product, summed_products
from .recurrence import lstm_backward, lstm_forward, lstm_recurrence, recurrence, scan_recurrence
from .ssm import kernel_selective, parallel_selective, scan_selective, selective_scan, written_selective
