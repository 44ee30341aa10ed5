"""float32 against bfloat16 mixed precision, diffprog beside PyTorch, on the char-LMs as users write them.

    python -m benchmarks.mixed_precision            # B32 T128 width 256, 3 rounds (about 5 minutes)
    python -m benchmarks.mixed_precision --quick    # small shapes

Models: the README's Transformer and LSTM char-LMs (`benchmarks.user_models.char_lm`: vocab 65,
2 layers of width 256; Transformer 4 heads, FF 1024, learned positions, causal) trained by
`dp.TrainStep` with Adam, in float32 and with compute_dtype=bfloat16 (on the CPU: the products in
bfloat16 by MKL, AMX where the CPU has it, the rest float32: `dp.kernels.autocast`); the same
models in PyTorch (`benchmarks.sequence_models.torch_runner`) in float32 and under
`torch.autocast("cpu", dtype=torch.bfloat16)`; and each model itself in bfloat16 (its params
cast: `model.to(torch.bfloat16)`), forward pass only ("bfloat16 model"). A variant a peer cannot run on this CPU (PyTorch's
bfloat16 LSTM without AVX512-BF16) is a row saying so, with its error (diffprog's own errors stop the run). Per variant: the train step (forward + backward +
Adam) and the forward pass, median of --reps calls after warm-up, best of --rounds interleaved
rounds. Writes benchmarks/results/mixed_precision.{json,md} with the CPU and its extensions.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import optax

import diffprog as dp

from .common import block, machine, markdown_table, median_time, optional_torch, timing_arguments, write
from .sequence_models import VOCAB, torch_runner
from .user_models import char_lm


def diffprog_variant(kind, width, batch, steps, dtype):
    ids = jax.random.randint(jax.random.key(1), (batch, steps), 0, VOCAB)
    model = char_lm(kind, width, steps)
    data = {"inputs": ids, "targets": jnp.roll(ids, -1, 1)}
    train = dp.TrainStep(model, lambda out, b: dp.metrics.cross_entropy(out, b["targets"]), optax.adam(1e-3), dtype)
    run, state, put = train.compile(train.init(model.init(jax.random.key(0), ids[0])), data)
    holder = [state]
    forward = jax.jit(lambda params: train.outputs(params, data))

    def step():
        holder[0], loss = run(holder[0], data)
        block(loss)
    return step, lambda: block(forward(holder[0]["params"]))


def diffprog_bfloat16_model(kind, width, batch, steps):
    """The model itself in bfloat16 (params cast, as `model.to(torch.bfloat16)`): its forward pass only."""
    ids = jax.random.randint(jax.random.key(1), (batch, steps), 0, VOCAB)
    model = char_lm(kind, width, steps)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), model.init(jax.random.key(0), ids[0]))
    forward = jax.jit(dp.batched(model).apply)
    return None, lambda: block(forward(params, ids))


def torch_bfloat16_model(kind, width, batch, steps):
    torch = optional_torch()
    torch.manual_seed(0)
    model, ids = torch_runner(kind, width, steps).to(torch.bfloat16), torch.randint(0, VOCAB, (batch, steps))

    def forward():
        with torch.no_grad():
            model(ids)
    return None, forward


def torch_variant(kind, width, batch, steps, autocast):
    torch = optional_torch()
    torch.manual_seed(0)
    model = torch_runner(kind, width, steps)
    opt, loss_fn = torch.optim.Adam(model.parameters(), 1e-3), torch.nn.CrossEntropyLoss()
    ids = torch.randint(0, VOCAB, (batch, steps))
    precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def step():
        opt.zero_grad(set_to_none=True)
        with precision():
            loss = loss_fn(model(ids).reshape(-1, VOCAB).float(), ids.reshape(-1))
        loss.backward()
        opt.step()

    def forward():
        with torch.no_grad(), precision():
            model(ids)
    return step, forward


def main(argv=None):
    dp.keep_freed_memory()
    p = timing_arguments(__doc__, "small shapes, one round")
    args = p.parse_args(argv)
    width, batch, steps = (32, 4, 32) if args.quick else (256, 32, 128)
    if args.quick:
        args.rounds, args.reps = 1, 3
    kits = {"diffprog": (diffprog_variant, None, jnp.bfloat16, "bfloat16", diffprog_bfloat16_model)}
    if optional_torch() is not None:
        kits["PyTorch"] = (torch_variant, False, True, "autocast bfloat16", torch_bfloat16_model)
    variants = {}  # (kind, kit, precision) -> (step or None, forward)
    for kind in ("transformer", "lstm"):
        for kit, (variant, full, mixed, mixed_name, bfloat16_model) in kits.items():
            variants[(kind, kit, "float32")] = variant(kind, width, batch, steps, full)
            variants[(kind, kit, mixed_name)] = variant(kind, width, batch, steps, mixed)
            variants[(kind, kit, "bfloat16 model")] = bfloat16_model(kind, width, batch, steps)
    failed = {}  # a peer that cannot run a variant on this CPU (PyTorch's bfloat16 LSTM needs AVX512-BF16)
    for key, (step, forward) in list(variants.items()):
        try:
            (step or forward)(), forward()
        except RuntimeError as error:
            if key[1] == "diffprog":  # the kit's own failure is never a table row
                raise
            failed[key] = str(error).splitlines()[0][:120]
            del variants[key]
    times = {key: {"step_s": [], "forward_s": []} for key in variants}
    for _ in range(args.rounds):
        for key, (step, forward) in variants.items():
            if step is not None:
                times[key]["step_s"].append(median_time(step, args.reps))
            times[key]["forward_s"].append(median_time(forward, args.reps))
    best = {key: {k: min(v) for k, v in t.items() if v} for key, t in times.items()}
    results = {"machine": machine(), "shape": {"batch": batch, "T": steps, "width": width},
               "variants": {f"{kind}/{kit} {precision}": best[kind, kit, precision] | {"rounds": times[kind, kit, precision]}
                            for kind, kit, precision in variants},
               "not_run": {f"{kind}/{kit} {precision}": error for (kind, kit, precision), error in failed.items()}}
    rows = []
    for kind, kit, precision in variants:
        r, f32 = best[kind, kit, precision], best[kind, kit, "float32"]
        step = [f"{r['step_s'] * 1e3:.1f}", f"{f32['step_s'] / r['step_s']:.2f}×"] if "step_s" in r else ["—", "—"]
        rows.append([kind, f"{kit} {precision}", *step, f"{r['forward_s'] * 1e3:.1f}",
                     f"{f32['forward_s'] / r['forward_s']:.2f}×"])
    rows += [[kind, f"{kit} {precision}", f"not run: {error}", "", "", ""] for (kind, kit, precision), error in failed.items()]
    table = (f"B{batch} T{steps} width {width}; "
             f"best of {args.rounds} rounds, median of {args.reps} calls\n\n"
             + markdown_table(["model", "variant", "train step ms", "vs its float32", "forward ms", "vs its float32"], rows))
    write("mixed_precision", results, table, args.out, args.quick)
    return results


if __name__ == "__main__":
    main()
