"""Every experiment and benchmark runs end to end on tiny settings and writes what it promises."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.mark.slow
def test_compare_quick(tmp_path):
    from experiments import compare
    # copy has a per-position loss "mask" in its batches; a causal Transformer must not take it
    # for its attention mask
    runs = compare.main(["--preset", "quick", "--tasks", "adding", "copy", "--models", "lstm",
                         "transformer", "--seeds", "3", "--out", str(tmp_path)])
    assert len(runs) == 4 and {r["seed"] for r in runs} == {3}
    out = next((tmp_path / "compare").iterdir())
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 4 and "| adding | T=10 |" in results["table"]
    assert {p.name for p in out.iterdir()} >= {"results.json", "config.json", "metric_vs_length.png", "learning_curves.png"}
    adding = [r for r in runs if r["task"] == "adding"]
    assert all(0.1 < r["baseline"] < 0.25 for r in adding)  # ≈ 1/6
    assert all(r["curve"] and r["params"] > 0 for r in runs)


@pytest.mark.slow
def test_compare_quick_runs_the_new_families_on_mqar(tmp_path):
    from experiments import compare
    runs = compare.main(["--preset", "quick", "--tasks", "mqar", "--models", "mamba", "transformer++", "--out", str(tmp_path)])
    assert {(r["task"], r["model"]) for r in runs} == {("mqar", "mamba"), ("mqar", "transformer++")}
    assert all(0 <= r["metric"] <= 1 and r["params"] > 0 for r in runs)
    table = json.loads((next((tmp_path / "compare").iterdir()) / "results.json").read_text())["table"]
    assert "mamba" in table and "transformer++" in table and "| mqar | pairs=2 |" in table


def test_compare_refuses_lengths_outside_the_preset(tmp_path, capsys):
    from experiments import compare
    with pytest.raises(SystemExit):
        compare.main(["--preset", "quick", "--tasks", "adding", "--lengths", "200", "--out", str(tmp_path)])
    assert "none of the lengths" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["experiments.compare", "experiments.charlm", "experiments.seq2seq",
                                  "experiments.soft_programs", "experiments.lstm_counter", "experiments.vision",
                                  "experiments.bert_qa", "benchmarks.sequence_models", "benchmarks.pretrained",
                                  "benchmarks.kernels", "benchmarks.layers", "benchmarks.depth", "benchmarks.page_faults",
                                  "benchmarks.nanogpt"])
def test_help_of_every_experiment_and_benchmark(name, capsys):
    module = __import__(name, fromlist=["main"])
    with pytest.raises(SystemExit) as exit:
        module.main(["--help"])
    assert exit.value.code == 0 and "usage" in capsys.readouterr().out


@pytest.mark.slow
def test_charlm_trains_samples_and_resumes(tmp_path):
    from experiments import charlm
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    common = ["--text", str(text), "--body", "lstm", "--n_layer", "1", "--n_embd", "16", "--block_size", "16",
              "--batch_size", "4", "--eval_interval", "10", "--eval_batches", "2", "--checkpoint_every", "10",
              "--workdir", str(tmp_path / "run"), "--sample_chars", "20"]
    first = charlm.main(common + ["--max_iters", "10"])
    second = charlm.main(common + ["--max_iters", "20", "--resume"])
    assert second["steps"] == 20 and second["val_loss"] < first["val_loss"] + 0.5
    assert len(second["sample"]) == 16 + 20
    assert (tmp_path / "run" / "checkpoints" / "20").exists()
    with pytest.raises(SystemExit):
        charlm.main(["--text", str(tmp_path / "missing.txt")])


@pytest.mark.slow
def test_a_second_run_loads_its_compiled_programs_from_the_compile_cache(tmp_path):
    """--compile_cache FOLDER: the first run stores every program it compiles there, a second
    run in a new process finds each of them (it adds none: the keys do not change between
    processes) and computes the same results; --compile_cache "" stores nothing, not even in
    JAX's own JAX_COMPILATION_CACHE_DIR."""
    import os
    import subprocess
    import sys

    def run(name, cache, env_cache):
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(env_cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_ENABLE_COMPILATION_CACHE": "true"}  # as users have it (the suite runs without)
        subprocess.run([sys.executable, "-m", "experiments.charlm", "--body", "rnn", "--n_layer", "1", "--n_embd", "8",
                        "--max_iters", "3", "--eval_interval", "2", "--eval_batches", "1", "--checkpoint_every", "0",
                        "--sample_chars", "5", "--workdir", str(tmp_path / name), "--compile_cache", cache],
                       check=True, env=env, capture_output=True, timeout=300)
        return json.loads((tmp_path / name / "results.json").read_text())

    cache, unused = tmp_path / "cache", tmp_path / "unused"
    unused.mkdir()
    first = run("first", str(cache), unused)
    stored = sorted(p.name for p in cache.iterdir())
    assert len(stored) >= 5  # init, the training step, evaluation, generation, the batches
    second = run("second", str(cache), unused)
    assert sorted(p.name for p in cache.iterdir()) == stored
    assert second == first and not any(unused.iterdir())
    assert run("uncached", "", unused) == first and not any(unused.iterdir())


def test_the_experiments_compile_cache_stays_under_its_bound(tmp_path, monkeypatch):
    """use_compile_cache bounds the folder (COMPILE_CACHE_BYTES): once the stored programs pass
    it, JAX deletes the least recently used, and the newest stays."""
    from jax.experimental.compilation_cache import compilation_cache

    from experiments import common
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # these programs compile in ~10 ms
    settings = ("jax_compilation_cache_max_size", "jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs")
    suites = jax.config.jax_compilation_cache_dir, {name: getattr(jax.config, name) for name in settings}
    jax.config.update("jax_enable_compilation_cache", True)  # as users have it (the suite runs without)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    stored = lambda folder: {p.name: p.stat().st_size for p in folder.iterdir() if p.name.endswith("-cache")}
    programs, x = [jax.jit(lambda x, k=k: jnp.sin(x) * k) for k in range(5)], jnp.ones(3)
    try:
        one, bounded = tmp_path / "one", tmp_path / "bounded"
        common.use_compile_cache(str(one))
        programs[0](x)
        (size,) = stored(one).values()  # one program's entry
        monkeypatch.setattr(common, "COMPILE_CACHE_BYTES", int(2.5 * size))
        common.use_compile_cache(str(bounded))
        for program in programs[1:]:
            program(x)
        kept = stored(bounded)
        assert 1 <= len(kept) <= 2 and sum(kept.values()) <= 2.5 * size
    finally:  # the suite's own settings for the tests after this one
        compilation_cache.reset_cache()
        for name, value in suites[1].items():
            jax.config.update(name, value)
        compilation_cache.set_cache_dir(suites[0])


def test_default_corpus_ships_with_python():
    from experiments.common import default_text
    text = default_text()
    assert len(text) > 100_000 and " the " in text


def _wrote_a_plot_and_results(root, name):
    out = next((root / name).iterdir())
    assert any(p.suffix == ".png" for p in out.iterdir()) and (out / "results.json").exists()


@pytest.mark.slow
def test_lstm_counter_smoke(tmp_path):
    from experiments import lstm_counter
    counter = lstm_counter.main(["--steps", "2", "--hidden", "4", "--length", "12", "--out", str(tmp_path)])
    assert -1 <= counter["best_correlation"] <= 1 and len(counter["correlations"]) == 4
    _wrote_a_plot_and_results(tmp_path, "lstm_counter")


@pytest.mark.slow
def test_soft_programs_smoke(tmp_path):
    from experiments import soft_programs
    runs = soft_programs.main(["--steps", "2", "--out", str(tmp_path)])
    assert {(r["program"], r["mode"]) for r in runs} == {(p, m) for p in ("if", "switch", "lookup") for m in ("soft", "annealed", "hard")}
    _wrote_a_plot_and_results(tmp_path, "soft_programs")


@pytest.mark.slow
def test_seq2seq_smoke(tmp_path):
    """The script end to end with the LSTM model (its attention heatmap too); the Transformer's
    training and translation are test_seq2seq's."""
    from experiments import seq2seq
    results = seq2seq.main(["--steps", "2", "--max_len", "4", "--dim", "8", "--models", "lstm+attention", "--out", str(tmp_path)])
    assert set(results) == {"lstm+attention"} and set(results["lstm+attention"]["exact_match"]) == {3, 4}
    _wrote_a_plot_and_results(tmp_path, "seq2seq")


def test_soft_lookup_task_is_solvable_by_its_score():
    """The lookup's target (the value of the nearest key) is what a hard general-score lookup
    with W = 50 I returns, so the experiment asks for a rule the program can express."""
    from experiments import soft_programs as sp
    queries = sp.inputs("lookup", jax.random.key(3), 500)
    found, _ = jax.vmap(lambda q: sp.lookup_program({"W": 50 * jnp.eye(4)}, q, 1.0, True))(queries)
    np.testing.assert_array_equal(found, sp.targets("lookup", queries))


@pytest.mark.slow
@pytest.mark.parametrize("name, flags", [("sequence_models", ["--models", "rnn", "lstm"]),
                                         ("sequence_models", ["--models", "transformer"]),
                                         ("sequence_models", ["--models", "mamba", "transformer++"]),
                                         ("depth", []), ("kernels", []), ("layers", []), ("page_faults", [])])
def test_benchmarks_quick(name, flags, tmp_path):
    module = __import__(f"benchmarks.{name}", fromlist=["main"])
    results = module.main(["--quick", "--out", str(tmp_path), *flags])
    assert (tmp_path / f"{name}_quick.json").exists() and (tmp_path / f"{name}_quick.md").exists()
    figure = {"sequence_models": "step_time_vs_T", "depth": "depth"}.get(name)
    assert figure is None or (tmp_path / f"{figure}_quick.png").exists()
    assert results["machine"]["cores"] >= 1


def test_mixed_precision_reports_a_variant_a_peer_cannot_run_instead_of_stopping(tmp_path, monkeypatch):
    """A peer variant that raises on this CPU (PyTorch's bfloat16 LSTM without AVX512-BF16) is a
    "not run" row with its error's first line; every other variant is still timed (the kits'
    variants stood in for by calls that count themselves)."""
    from benchmarks import mixed_precision
    calls = {}

    def variant(kit):
        def make(kind, width, batch, steps, precision):
            name = (kind, kit, precision)
            def step():
                if name == ("lstm", "PyTorch", True):
                    raise RuntimeError("could not create a primitive descriptor (stand-in)\nsecond line")
                calls[name] = calls.get(name, 0) + 1
            return step, step
        return make

    def bfloat16_model(kit):  # forward only
        def make(*shape):
            step = variant(kit)(*shape, "model")[0]
            return None, step
        return make
    for kit, name in (("diffprog", "diffprog"), ("PyTorch", "torch")):
        monkeypatch.setattr(mixed_precision, f"{name}_variant", variant(kit))
        monkeypatch.setattr(mixed_precision, f"{name}_bfloat16_model", bfloat16_model(kit))
    monkeypatch.setattr(mixed_precision, "optional_torch", lambda: True)
    results = mixed_precision.main(["--quick", "--out", str(tmp_path)])
    assert results["not_run"] == {"lstm/PyTorch autocast bfloat16": "could not create a primitive descriptor (stand-in)"}
    assert len(results["variants"]) == len(calls) == 11 and min(calls.values()) > 3  # warm-up, then --reps per call
    table = (tmp_path / "mixed_precision_quick.md").read_text()
    assert "| lstm | PyTorch autocast bfloat16 | not run: could not create" in table
    assert "| transformer | diffprog bfloat16 model | — | — |" in table and "step_s" not in results["variants"]["lstm/PyTorch bfloat16 model"]


def test_mixed_precision_stops_when_diffprog_itself_fails(tmp_path, monkeypatch):
    """Only a peer's failure becomes a "not run" row: the kit's own error stops the benchmark."""
    from benchmarks import mixed_precision

    def broken(*args):
        def step():
            raise RuntimeError("diffprog stand-in failure")
        return step, step
    monkeypatch.setattr(mixed_precision, "diffprog_variant", broken)
    monkeypatch.setattr(mixed_precision, "diffprog_bfloat16_model", lambda *shape: (None, broken()[1]))
    monkeypatch.setattr(mixed_precision, "optional_torch", lambda: None)
    with pytest.raises(RuntimeError, match="diffprog stand-in failure"):
        mixed_precision.main(["--quick", "--out", str(tmp_path)])


def test_nanogpt_benchmark_writes_the_data_as_nanogpts_prepare_does(tmp_path):
    """benchmarks.nanogpt writes nanoGPT's shakespeare_char files: uint16 ids of the sorted
    characters, the first 90 % for training; meta.pkl's itos reads them back into the text."""
    import pickle

    from benchmarks import nanogpt
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3
    nanogpt.prepare(tmp_path, text)
    folder = tmp_path / "data" / "shakespeare_char"
    meta = pickle.loads((folder / "meta.pkl").read_bytes())
    train, val = (np.fromfile(folder / f"{split}.bin", np.uint16) for split in ("train", "val"))
    assert meta["vocab_size"] == len(set(text)) and len(train) == int(0.9 * len(text))
    assert "".join(meta["itos"][i] for i in np.concatenate([train, val])) == text
    assert [meta["stoi"][c] for c in sorted(set(text))] == list(range(meta["vocab_size"]))


def test_nanogpt_benchmark_alternates_and_gives_charlm_one_compile_cache(tmp_path, monkeypatch):
    """benchmarks.nanogpt runs nanoGPT then charlm in every round (processes stood in for here),
    charlm with the same --compile_cache folder each time (round 1 fills it), and reports the
    ratio of each round's two wall times."""
    from benchmarks import nanogpt
    order, caches = [], []

    def run(command, cwd=None):
        order.append("nanoGPT" if "train.py" in command else "charlm")
        if order[-1] == "nanoGPT":
            return 60.0 + 10 * len(order), "iter 1: loss 2.0, time 30.0ms\nstep 2000: train loss 1.7, val loss 1.886\n"
        caches.append(command[command.index("--compile_cache") + 1])
        workdir = Path(command[command.index("--workdir") + 1])
        workdir.mkdir(parents=True)
        (workdir / "results.json").write_text(json.dumps({"val_loss": 1.842}))
        (workdir / "metrics.jsonl").write_text(json.dumps({"tokens_per_s": 32000}) + "\n")
        return 50.0, ""
    monkeypatch.setattr(nanogpt, "timed", run)
    (tmp_path / "train.py").write_text("")
    (tmp_path / "text.txt").write_text("to be or not to be " * 20)
    nanogpt.main(["--nanogpt", str(tmp_path), "--text", str(tmp_path / "text.txt"), "--rounds", "3", "--out", str(tmp_path)])
    assert order == ["nanoGPT", "charlm"] * 3 and len(caches) == 3 and len(set(caches)) == 1
    report = (tmp_path / "nanogpt.md").read_text()
    assert "round 1 (charlm compiling every program) 1.40×" in report and "1.80× / 2.20×" in report

def test_commits_guard_alternates_which_version_runs_first(tmp_path, monkeypatch):
    """A then B in odd rounds, B then A in even ones; each version's figures stay its own."""
    from benchmarks import commits
    calls = []
    monkeypatch.setattr(commits, "checkout", lambda rev, path: Path(path))
    monkeypatch.setattr(commits, "time_case", lambda tree, case, quick, reps: calls.append(tree.name) or
                        {"a": 1.0, "b": 2.0}[tree.name])
    monkeypatch.setattr(commits, "subprocess", SimpleNamespace(run=lambda *a, **k: None))  # no worktree to remove
    out = commits.main(["X", "Y", "--rounds", "3", "--cases", "lstm_forward", "--out", str(tmp_path)])
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert out["results"]["lstm_forward"]["a_rounds"] == [1.0] * 3 and out["results"]["lstm_forward"]["ratio"] == 2.0


def test_commits_in_process_times_each_case_per_version_and_round(tmp_path, monkeypatch):
    """--in-process builds each case once per version in this process and times it every round
    (both versions this tree here: nothing to import or compile twice)."""
    from benchmarks import commits
    monkeypatch.setattr(commits, "checkout", lambda rev, path: commits.ROOT)
    out = commits.main(["X", "Y", "--in-process", "--quick", "--rounds", "2", "--reps", "2", "--cases", "lstm_forward",
                        "--out", str(tmp_path)])
    r = out["results"]["lstm_forward"]
    assert out["in_process"] and len(r["a_rounds"]) == len(r["b_rounds"]) == 2 and min(r["a_rounds"] + r["b_rounds"]) > 0
    assert r["ratio"] == pytest.approx(float(np.median(np.array(r["b_rounds"]) / np.array(r["a_rounds"]))))
    assert "both versions in one process" in (tmp_path / "commits_quick.md").read_text()


def test_commits_in_process_runs_a_second_version_on_its_own_kernels(tmp_path):
    """--in-process imports a version under its own module name and, under `own_kernels`, its
    programs call its own copy of the C++ kernels by their renamed targets (attention and the MKL
    product), computing what this tree's do; this tree's programs keep theirs. (The version here is
    this tree, its kernel libraries copied into the version's cache, so nothing is compiled.)"""
    import shutil
    from benchmarks import commits
    from diffprog.kernels import library
    if not library.available() or library.vendor_blas() is None:
        pytest.skip("the C++ kernels or MKL are not available")
    cache = tmp_path / "kernels"
    cache.mkdir()
    for built in library.cache_dir().glob("kernels-*.so"):
        shutil.copy(built, cache)
    import diffprog as dp
    version = commits.load_version(commits.ROOT, "diffprog_t").dp
    assert version.__name__ == "diffprog_t" and version.kernels.library is not library
    q = jax.random.normal(jax.random.key(0), (2, 16, 2, 8))
    a = jax.random.normal(jax.random.key(1), (256, 256))
    programs = {"attention": lambda kit: lambda q, a: kit.kernels.self_attention(q, q, q, True),
                "product": lambda kit: lambda q, a: kit.kernels.gemm(a, a)}
    for name, program in programs.items():
        with commits.own_kernels("t_", cache):
            theirs = jax.jit(program(version)).lower(q, a).compile()
        ours = jax.jit(program(dp)).lower(q, a).compile()
        assert 'custom_call_target="t_diffprog_' in theirs.as_text(), name
        assert 'custom_call_target="diffprog_' in ours.as_text() and "t_diffprog_" not in ours.as_text(), name
        np.testing.assert_allclose(theirs(q, a), ours(q, a), rtol=1e-6, atol=1e-6)
    assert jax.ffi.ffi_call.__module__.startswith("jax") and "DIFFPROG_CACHE" not in os.environ


@pytest.mark.slow
def test_commits_guard_times_two_versions_interleaved(tmp_path):
    """benchmarks.commits checks out a commit beside the working tree and times a user-written
    model in each, in fresh processes: both figures positive, the ratio their quotient."""
    from benchmarks import commits
    out = commits.main(["HEAD", ".", "--quick", "--rounds", "1", "--reps", "2", "--cases", "lstm_forward",
                        "--out", str(tmp_path)])
    r = out["results"]["lstm_forward"]
    assert r["a_s"] > 0 and r["b_s"] > 0 and abs(r["ratio"] - r["b_s"] / r["a_s"]) < 1e-9
    assert "lstm_forward" in (tmp_path / "commits_quick.md").read_text()
