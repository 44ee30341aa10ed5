"""TrainStep, the pure step, and train(), one small, dependable loop around it — jit, donated state, orbax checkpoints, resume,
NaN guard, JSONL metrics, tqdm, data parallelism over a `jax.sharding.Mesh`, bf16 compute.

Data is a function of the step: `data(step) -> batch`, a dict of arrays with a leading batch
axis: "inputs" (an array or a tuple of arrays), "targets", optionally "mask" (same shape as
targets), and any side input the model reads (e.g. "lengths" (B,)), passed as `name=`.
Because the batch is a function of the step, the step IS the data position: a resumed run sees
exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from . import kernels
from .batching import batched
from .checks import ArgumentError, example_spec, path_name
from .core import QUICK_COMPILE, Layer

Batch = dict


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a NaN or infinite loss); names the step."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored (corrupt or incompatible); names the file and mismatch."""


@dataclasses.dataclass
class TrainResult:
    params: Any
    opt_state: Any
    step: int
    history: list  # the metric records, also written to <workdir>/metrics.jsonl


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _shardings(mesh, state, batch, fsdp):
    """Batch split along the mesh's first axis; state replicated, or (fsdp) each array split
    along its first axis that the device count divides."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    axis, n = mesh.axis_names[0], mesh.devices.size

    def param_spec(a):
        if fsdp:
            for i, size in enumerate(np.shape(a)):
                if size % n == 0:
                    return NamedSharding(mesh, P(*([None] * i + [axis])))
        return NamedSharding(mesh, P())
    return (jax.tree.map(param_spec, state),
            jax.tree.map(lambda a: NamedSharding(mesh, P(axis)), batch))


class _Checkpoints:
    """orbax-checkpoint: atomic writes (temporary directory, then rename), keep the last N."""

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp
        self.ocp, self.directory = ocp, directory
        self.manager = ocp.CheckpointManager(
            directory.absolute(), item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=False, create=True))

    def latest(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step, state):
        """Atomic: a failed save (disk full, read-only folder) leaves the older checkpoints as
        they were, and raises CheckpointError naming the path and the newest intact one."""
        try:
            self.manager.save(step, args=self.ocp.args.StandardSave(state))
            self.manager.wait_until_finished()
        except Exception as e:  # orbax wraps OSError in several types
            self.manager.reload()
            intact = self.manager.latest_step()
            raise CheckpointError(f"{self.directory / str(step)}: cannot save checkpoint ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:300] if str(e) else ''}); "
                                  + (f"the checkpoint of step {intact} in {self.directory} is intact"
                                     if intact is not None else "no earlier checkpoint exists")) from e

    def check_compatible(self, step, like):
        """Compare the checkpoint's parameter shapes with the model's before reading arrays."""
        path = self.directory / str(step)
        try:
            saved = self.manager.item_metadata(step)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot restore checkpoint: unreadable metadata ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:300]})") from e
        try:
            saved = {part: saved[part] for part in ("params", "opt_state")}
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: cannot restore checkpoint: its metadata is missing or incomplete "
                                  f"(found {type(saved).__name__}; was default/_METADATA deleted?)") from e
        describe = lambda tree: {path_name(p): f"{tuple(a.shape)} {a.dtype}"
                                 for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}
        for part, whose in (("params", "the model"), ("opt_state", "the optimiser")):
            want, got = describe(like[part]), describe(saved[part])
            for name in sorted(set(want) | set(got)):
                if want.get(name) != got.get(name):
                    raise CheckpointError(f"{path}: {part}{name} is {got.get(name, 'absent')} in the "
                                          f"checkpoint, {whose} expects {want.get(name, 'nothing')}"
                                          + (" (another optimiser than the one that saved it?)" if part == "opt_state" else ""))

    def restore(self, step, like):
        path = self.directory / str(step)
        self.check_compatible(step, like)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), like)
        try:
            restored = self.manager.restore(step, args=self.ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many types; name the file and the cause
            raise CheckpointError(f"{path}: cannot restore checkpoint ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:300]})") from e
        want = jax.tree_util.tree_flatten_with_path(like)[0]
        got = jax.tree_util.tree_flatten_with_path(restored)[0]
        for (path_w, a), (_, b) in zip(want, got):
            if np.shape(a) != np.shape(b) or a.dtype != b.dtype:
                raise CheckpointError(f"{path}: {jax.tree_util.keystr(path_w)} is "
                                      f"{np.shape(b)} {b.dtype} in the checkpoint, the model "
                                      f"expects {np.shape(a)} {a.dtype}")
        if len(want) != len(got):
            raise CheckpointError(f"{path}: the checkpoint holds {len(got)} arrays, the model "
                                  f"expects {len(want)}")
        # orbax places what it restores on `like`'s devices, committed; an array `like` left
        # uncommitted (one device, no placement asked) comes back uncommitted, so the resumed
        # state hits the step already compiled in this process instead of compiling it again
        return jax.tree.map(lambda a, b: b if getattr(a, "committed", True) else jnp.asarray(np.asarray(b)),
                            like, restored)


LOSS_KEYS = frozenset({"inputs", "targets", "mask"})
"""Batch keys that belong to the loss, never passed to the model: "mask" is the loss mask of
`dp.metrics` (which positions count), not an attention mask."""


@dataclasses.dataclass(frozen=True)  # equal steps (same model, loss and optimiser objects) share jit's cache
class TrainStep:
    """One optimisation step of `model` (a one-example layer, run on the batch by `dp.batched`),
    pure: `step(state, batch) -> (state, loss)`, the loss a device scalar.

    state: {"params", "opt_state", "step", "rng"} (`init`). batch: a dict with "inputs" (B, ...),
    the loss's entries ("targets", an optional loss "mask") and any side inputs of the model by
    name (e.g. "lengths"); loss(outputs, batch) -> scalar. The step's dropout key is
    fold_in(rng, step). compute_dtype (e.g. jnp.bfloat16): mixed precision; params and optimiser
    state stay float32. On accelerators params and float inputs are cast to it for the forward and
    backward pass; on the CPU, where bfloat16 arithmetic outside the products is slower than
    float32, only the matrix products run in bfloat16 (`dp.kernels.autocast`: bfloat16 × bfloat16
    → float32 by MKL, on AMX where the CPU has it; float32 where it has no bfloat16 hardware);
    another dtype (float16) is cast as on accelerators.
    mesh: a `jax.sharding.Mesh` for `compile`: the batch is sharded along its first axis, the
    state replicated (fsdp=True: each array split along its first axis the device count divides).
    Steps compare equal when their fields do (the loss and optimiser by identity), and equal
    steps share one compiled program per batch shape: `jax.jit` caches by the function's hash.
    """

    model: Layer
    loss: Callable
    optimizer: optax.GradientTransformation
    compute_dtype: Any = None
    mesh: Any = None
    fsdp: bool = False

    def init(self, params, seed: int = 0) -> dict:
        return {"params": params, "opt_state": self.optimizer.init(params), "step": jnp.int32(0),
                "rng": jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))}

    def outputs(self, params, batch, key=None):
        """The model's (B, ...) outputs on the batch, in float32."""
        net, precision = batched(self.model), contextlib.nullcontext()
        if self.compute_dtype is not None and jnp.dtype(self.compute_dtype) == jnp.bfloat16 and self.platform() == "cpu":
            precision = kernels.autocast(self.compute_dtype)
        elif self.compute_dtype is not None:
            params = _cast(params, self.compute_dtype)
            batch = {**batch, "inputs": _cast(batch["inputs"], self.compute_dtype)}
        side = {k: v for k, v in batch.items() if k in net.side_inputs and k not in LOSS_KEYS}
        with precision:
            return _cast(net.apply(params, batch["inputs"], key=key, **side), jnp.float32)

    def platform(self) -> str:
        """Where the step runs: the mesh's devices', else the default backend."""
        return self.mesh.devices.flat[0].platform if self.mesh is not None else jax.default_backend()

    def __call__(self, state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        value, grads = jax.value_and_grad(lambda p: self.scalar_loss(self.outputs(p, batch, key), batch))(state["params"])
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        return {**state, "params": optax.apply_updates(state["params"], updates),
                "opt_state": opt_state, "step": state["step"] + 1}, value

    def scalar_loss(self, outputs, batch):
        """loss(outputs, batch), checked to be one number (a per-example loss is an error)."""
        value = self.loss(outputs, batch)
        if jnp.shape(value) != ():
            raise ArgumentError(f"train: the loss must return a scalar (e.g. a mean over the batch), got shape "
                                f"{jnp.shape(value)} from {getattr(self.loss, '__name__', self.loss)!r}")
        return value

    def evaluate(self, metrics: tuple, params, batch) -> dict:
        """{name: fn(outputs, batch)} for metrics = ((name, fn), ...), dropout off."""
        outputs = self.outputs(params, batch)
        return {name: fn(outputs, batch) for name, fn in metrics}

    def compile(self, state, batch):
        """(jit-compiled step with the state donated, the state placed for it, put(batch) that
        places a batch), sharded over `mesh` when there is one."""
        if self.mesh is None:
            return _jitted(self), state, lambda b: b
        state_sharding, batch_sharding = _shardings(self.mesh, state, batch, self.fsdp)
        step = jax.jit(self, donate_argnums=0, in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, None))
        return step, jax.device_put(state, state_sharding), lambda b: jax.device_put(b, batch_sharding)


@functools.lru_cache(maxsize=32)
def _clipped(optimizer, clip_norm):
    """clip_by_global_norm, then the optimiser: one object per pair, so equal train() calls
    build equal TrainSteps (and compile once)."""
    return optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)


@functools.lru_cache(maxsize=32)
def _jitted(step: TrainStep):
    """The step under jit, one object per equal step: jit's caches hold a function weakly, so a
    step's program would be traced and compiled again once the TrainStep of an earlier, equal
    train() call is freed."""
    return jax.jit(step, donate_argnums=0)


_evaluate = jax.jit(TrainStep.evaluate, static_argnums=(0, 1))
_all_finite = jax.jit(lambda tree: jnp.array([jnp.isfinite(a).all() for a in jax.tree.leaves(tree)], bool).all(),
                      compiler_options=QUICK_COMPILE)
"""One program for the whole tree (op by op, each leaf's shape compiled its own two ops), compiled
for compile time: it runs once per checkpoint."""


def _check_arguments(*, steps, keep, log_every, workdir, checkpoint_every, resume, eval_every):
    """train()'s settings, before any work."""
    for name, value, least in (("steps", steps, 0), ("keep", keep, 1), ("log_every", log_every, 1),
                               ("checkpoint_every", checkpoint_every, 0), ("eval_every", eval_every, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise ArgumentError(f"train: {name} must be an int >= {least}, got {value!r}")
    if checkpoint_every and workdir is None:
        raise ArgumentError("train: checkpoint_every needs workdir= (where the checkpoints go)")
    if resume and not (workdir is not None and checkpoint_every):
        raise ArgumentError("train: resume=True needs workdir= and checkpoint_every > 0 (the checkpoints "
                            "to resume from)")


def _checked_data(data, side_inputs, mesh):
    """data(step) with every batch checked: keys are loss keys or side inputs of the model (a
    typo such as `length` for `lengths` would otherwise be dropped, and padding would train),
    lists become arrays, and under a mesh the batch divides the devices."""
    devices = None if mesh is None else mesh.devices.size

    def checked(step):
        batch = data(step)
        if not isinstance(batch, dict) or "inputs" not in batch:
            raise ArgumentError(f"train: data({step}) must return a dict with 'inputs', got "
                                f"{type(batch).__name__}{' with keys ' + str(sorted(batch)) if isinstance(batch, dict) else ''}")
        unknown = sorted(set(batch) - LOSS_KEYS - set(side_inputs))
        if unknown:
            raise ArgumentError(f"train: data({step}) has key(s) {unknown} that are neither the loss's "
                                f"{sorted(LOSS_KEYS)} nor side inputs of the model "
                                f"{sorted(set(side_inputs) - {'key'}) or '(it takes none)'}")
        batch = {k: np.asarray(v) if isinstance(v, list) else v for k, v in batch.items()}
        if devices is not None:
            for name, a in batch.items():
                for leaf in jax.tree.leaves(a):
                    if np.ndim(leaf) == 0 or np.shape(leaf)[0] % devices:
                        raise TrainingError(f"step {step}: batch['{name}'] has leading shape {np.shape(leaf)[:1]}, "
                                            f"not divisible by the {devices} devices of the mesh")
        return batch
    return checked


def train(model: Layer, loss: Callable, optimizer: optax.GradientTransformation,
          data: Callable[[int], Batch], *, steps: int, seed: int = 0,
          eval_data: Optional[Iterable[Batch]] = None, eval_every: int = 0,
          eval_metrics: Optional[dict] = None, workdir: Optional[str] = None,
          checkpoint_every: int = 0, keep: int = 3, resume: bool = False,
          quiet: bool = False, log_every: int = 10, mesh=None, fsdp: bool = False,
          compute_dtype=None, clip_norm: Optional[float] = None, params=None,
          description: str = "train") -> TrainResult:
    """Train `model` for `steps` steps of `TrainStep(model, loss, optimizer, compute_dtype, mesh,
    fsdp)` (see there for the batch, the loss and the sharding); data(step) -> batch.

    The optimiser is any optax transformation (LR schedules live inside it); `clip_norm`
    prepends `optax.clip_by_global_norm`. params: start from (a copy of) these instead of
    `model.init(fold_in(key(seed), 0), one example)`.
    workdir: metrics.jsonl is appended there; with checkpoint_every > 0, orbax checkpoints of
    the state go to workdir/checkpoints (last `keep` kept) and `resume=True` continues from the
    latest one. eval_data: batches averaged every `eval_every` steps and at the end, reporting
    the loss and `eval_metrics` {name: fn(outputs, batch)}.
    Calls with the same model, loss and optimiser objects and equal settings compile the step
    once per batch shape (see `TrainStep`).
    The loop reads losses from the device only every `log_every` steps (and before a
    checkpoint, an evaluation and the end), so the host never waits for each step; a non-finite
    loss then raises TrainingError naming the first step that had one, and nothing is saved after it.
    """
    _check_arguments(steps=steps, keep=keep, log_every=log_every, workdir=workdir,
                     checkpoint_every=checkpoint_every, resume=resume, eval_every=eval_every)
    if eval_every and eval_data is None:
        raise ArgumentError(f"train: eval_every={eval_every} needs eval_data= (the batches to evaluate on)")
    if eval_data is not None:
        eval_data = list(eval_data)
        if not eval_data:
            raise ArgumentError("train: eval_data is empty; give at least one batch, or eval_data=None")
    if clip_norm is not None:
        optimizer = _clipped(optimizer, clip_norm)
    train_step = TrainStep(model, loss, optimizer, compute_dtype, mesh, fsdp)
    data = _checked_data(data, batched(model).side_inputs, mesh)
    first = data(0)
    if params is None:
        params = model.init(jax.random.fold_in(jax.random.key(seed), 0), example_spec(first["inputs"]))
    else:  # the compiled step donates its state: train on a copy, so the caller's arrays stay usable
        params = jax.tree.map(jnp.copy, params)
    step_fn, state, put = train_step.compile(train_step.init(params, seed), first)
    evaluate = functools.partial(_evaluate, train_step, tuple({"loss": loss, **(eval_metrics or {})}.items()))

    workdir = Path(workdir) if workdir else None
    checkpoints = None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        if checkpoint_every:
            checkpoints = _Checkpoints(workdir / "checkpoints", keep)
            if resume and checkpoints.latest() is not None:
                try:
                    state = checkpoints.restore(checkpoints.latest(), state)
                except CheckpointError:
                    checkpoints.manager.close()  # orbax's threads, closed now rather than at exit
                    raise
    start = int(state["step"])
    history, pending = [], []  # pending: (step, device loss) not yet read

    def record(entry):
        history.append(entry)
        if workdir is not None:
            with open(workdir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    def read_losses():
        """The pending losses, read from the device; stops at the first non-finite one."""
        values = jax.device_get([value for _, value in pending])
        for (step, _), value in zip(pending, values):
            if not math.isfinite(value):
                bar.close()
                last = checkpoints.latest() if checkpoints else None
                raise TrainingError(f"step {step}: loss is {value}; training stopped"
                                    + (f" (last good checkpoint: step {last} in "
                                       f"{checkpoints.directory})" if last is not None else ""))
        pending.clear()
        return float(values[-1])

    def run_eval(step):
        totals = [jax.device_get(evaluate(state["params"], put(b))) for b in eval_data]
        record({"step": step, **{f"eval_{k}": float(np.mean([t[k] for t in totals])) for k in totals[0]}})

    tokens = int(np.prod(np.shape(first["targets"])))
    bar = tqdm(total=steps, initial=start, desc=description, dynamic_ncols=True,
               disable=quiet or not sys.stderr.isatty())
    tick, tick_step = time.perf_counter(), start
    for step in range(start, steps):
        state, value = step_fn(state, put(data(step)))
        pending.append((step, value))
        done = step + 1
        bar.update(1)
        log = done % log_every == 0 or done == steps
        evaluating = eval_data is not None and eval_every and done % eval_every == 0 and done != steps
        saving = checkpoints and (done % checkpoint_every == 0 or done == steps)
        if not (log or evaluating or saving):
            continue
        value = read_losses()
        if log:
            now = time.perf_counter()
            rate = tokens * (done - tick_step) / max(now - tick, 1e-9)
            tick, tick_step = now, done
            record({"step": done, "loss": value, "tokens_per_s": rate})
            bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{rate:,.0f}")
        if evaluating:
            run_eval(done)
        if saving:
            if not _all_finite(state["params"]):
                raise TrainingError(f"step {step}: parameters are not finite; checkpoint not saved")
            checkpoints.save(done, state)
    bar.close()
    if eval_data is not None:
        run_eval(steps)
    return TrainResult(state["params"], state["opt_state"], int(state["step"]), history)
