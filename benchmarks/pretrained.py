"""BERT, GPT-2, Llama and Mamba, diffprog against Hugging Face `transformers` on PyTorch, same weights.

    python -m benchmarks.pretrained [--quick]

BERT-base-shaped encoder forward (`BertModel` with its pooler: 12 layers, width 768, 12 heads,
FF 3072, vocab 30522) on int ids (batch 8, T 128, every token valid), and GPT-2-small-shaped
greedy generation (`GPT2LMHeadModel`: 12 layers, width 768, vocab 50257) of 128 new tokens after
a 32-token prompt, batch 4, with a KV cache (`dp.generate`, `model.generate(do_sample=False)`);
the same for a Llama of GPT-2 small's size (12 layers, width 768, 12 heads, 4 key/value heads,
SwiGLU 2048, vocab 32000) and for Mamba-130m's shape (24 layers, width 768, state 16, vocab 50280;
transformers' sequential path, no CUDA kernels on the CPU).
Random weights (no download), loaded into diffprog with `dp.load_pretrained` from the
transformers model's state dict; the outputs are checked equal before timing. Each cell is the
best of --rounds interleaved rounds of the median of --reps calls; diffprog's compile time is
reported apart. Needs the test extra (transformers) and the bench extra (torch).
Writes benchmarks/results/pretrained.{json,md}.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import diffprog as dp

from .common import block, machine, markdown_table, median_time, optional_torch, timing_arguments, write


def bert_case(transformers, torch, quick):
    fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if quick else {}
    reference = transformers.BertModel(transformers.BertConfig(**fields)).eval()
    batch, steps = (2, 16) if quick else (8, 128)
    ids = np.random.RandomState(0).randint(0, reference.config.vocab_size, (batch, steps))
    model = dp.bert(reference.config)
    params = dp.load_pretrained(model, {k: v.numpy() for k, v in reference.state_dict().items()})
    ours = jax.jit(dp.batched(model).apply)
    theirs_ids = torch.tensor(ids)

    def theirs():
        with torch.no_grad():
            return reference(input_ids=theirs_ids)
    start = time.perf_counter()
    hidden, _ = block(ours(params, jnp.asarray(ids)))
    compile_s = time.perf_counter() - start
    error = float(np.abs(np.asarray(hidden) - theirs().last_hidden_state.numpy()).max())
    return {"name": f"BERT encoder forward (B{batch} T{steps})", "tokens": batch * steps, "error": error,
            "compile_s": compile_s, "diffprog": lambda: block(ours(params, jnp.asarray(ids))), "transformers": theirs}


CAUSAL = {  # (transformers class, config class, builder, full-size fields, --quick fields)
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dp.gpt2, {}, dict(n_embd=64, n_layer=2, n_head=4)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dp.llama,  # GPT-2 small's size, Llama's block
              dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                   num_attention_heads=12, num_key_value_heads=4),
              dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)),
    "mamba": ("MambaForCausalLM", "MambaConfig", dp.mamba,  # mamba-130m's shape
              dict(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16),
              dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, state_size=8)),
}


def causal_case(kind, transformers, torch, quick):
    """Greedy generation of a causal LM, diffprog against transformers from the same weights."""
    cls, config_cls, build, full, small = CAUSAL[kind]
    reference = getattr(transformers, cls)(getattr(transformers, config_cls)(**(small if quick else full))).eval()
    batch, prompt_len, new = (2, 8, 16) if quick else (4, 32, 128)
    prompts = np.random.RandomState(0).randint(0, reference.config.vocab_size, (batch, prompt_len))
    model = build(reference.config)
    params = dp.load_pretrained(model, {k: v.numpy() for k, v in reference.state_dict().items()})
    theirs_prompts = torch.tensor(prompts)

    def theirs():
        with torch.no_grad():
            return reference.generate(theirs_prompts, attention_mask=torch.ones_like(theirs_prompts),
                                      do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                      pad_token_id=0)[:, prompt_len:]
    start = time.perf_counter()
    tokens = block(dp.generate(model, params, prompts, new))
    compile_s = time.perf_counter() - start
    agree = float((np.asarray(tokens) == theirs().numpy()).mean())
    name = {"gpt2": "GPT-2", "llama": "Llama", "mamba": "Mamba"}[kind]
    return {"name": f"{name} greedy generation (B{batch}, prompt {prompt_len}, {new} new)", "tokens": batch * new,
            "agreement": agree, "compile_s": compile_s,
            "diffprog": lambda: block(dp.generate(model, params, prompts, new)), "transformers": theirs}


def main(argv=None):
    dp.keep_freed_memory()  # glibc keeps XLA's freed buffers: no page faults per step
    p = timing_arguments(__doc__, "small models, one round (< 1 minute)")
    p.add_argument("--models", nargs="+", choices=sorted(CAUSAL), default=list(CAUSAL), help="the causal LMs to generate with")
    args = p.parse_args(argv)
    reps, rounds = (2, 1) if args.quick else (args.reps, args.rounds)
    torch = optional_torch()
    import transformers  # the test extra
    if torch is None:
        raise SystemExit("benchmarks.pretrained compares against transformers on PyTorch: pip install -e '.[test,bench]'")
    torch.manual_seed(0)
    cases = [bert_case(transformers, torch, args.quick)] + [
        causal_case(kind, transformers, torch, args.quick) for kind in args.models]
    seconds = {(c["name"], kit): [] for c in cases for kit in ("diffprog", "transformers")}
    for _ in range(rounds):  # interleaved, so drift hits both kits alike
        for case in cases:
            for kit in ("diffprog", "transformers"):
                seconds[case["name"], kit].append(median_time(case[kit], reps, warmup=1))
    rows, results = [], {"machine": {**machine(), "transformers": transformers.__version__}, "cases": []}
    for case in cases:
        ours, theirs = (min(seconds[case["name"], kit]) for kit in ("diffprog", "transformers"))
        check = (f"max |Δ hidden| {case['error']:.1e}" if "error" in case
                 else f"{case['agreement']:.0%} of tokens equal")
        rows.append([case["name"], f"{ours * 1e3:.0f}", f"{theirs * 1e3:.0f}", f"{case['tokens'] / ours:,.0f}",
                     f"{case['tokens'] / theirs:,.0f}", f"{theirs / ours:.2f}", f"{case['compile_s']:.1f}", check])
        results["cases"].append({k: v for k, v in case.items() if not callable(v)} | {
            "diffprog_s": seconds[case["name"], "diffprog"], "transformers_s": seconds[case["name"], "transformers"]})
    table = markdown_table(["case", "diffprog ms", "transformers ms", "diffprog tok/s", "transformers tok/s",
                            "speed ratio (transformers / diffprog)", "diffprog compile s", "same result"], rows)
    write("pretrained", results, table, args.out, args.quick)
    return results


if __name__ == "__main__":
    main()
