"""What every experiment shares: its run directory, results.json + config.json, markdown tables."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
from pathlib import Path

import jax
import matplotlib
from jax.experimental.compilation_cache import compilation_cache

matplotlib.use("Agg")


def default_text() -> str:
    """English prose that ships with every Python installation (the documentation topics in
    `pydoc_data`), so that the text experiments run offline."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(p: argparse.ArgumentParser, path) -> str:
    """The UTF-8 text at `path` (`--text`), or `default_text()` when path is None; a file that
    cannot be read is a usage error naming it."""
    if path is None:
        return default_text()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        p.error(f"--text {path}: cannot read it as UTF-8 text ({error})")


def run_dir(name: str, root: str = "runs") -> Path:
    """runs/<name>/<timestamp>/, created."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(root) / name / stamp
    path.mkdir(parents=True, exist_ok=True)
    return path


def environment() -> dict:
    return {"jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine()}


def save_config(out: Path, config: dict) -> dict:
    """Write out/config.json: the run's settings and the environment it ran in; return it."""
    config = {**config, "environment": environment()}
    save_json(out / "config.json", config)
    return config


def save_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)  # atomic


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def at_least(least: int):
    """An argparse type: an int >= least (`--steps 0` is refused before any work)."""
    def parse(text):
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value
    parse.__name__ = f"int >= {least}"
    return parse


def positive_float(text):
    """An argparse type: a float > 0 (a learning rate)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def probability(text):
    """An argparse type: a float in [0, 1) (a dropout rate)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def default_compile_cache() -> str:
    """JAX's own setting when the user made one (JAX_COMPILATION_CACHE_DIR), else
    $XDG_CACHE_HOME/diffprog/jax (~/.cache/diffprog/jax)."""
    return jax.config.jax_compilation_cache_dir or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffprog" / "jax")


COMPILE_CACHE_BYTES = 2 << 30
"""The most the experiments' compile cache holds (2 GiB): past it JAX deletes the programs
used least recently (JAX_COMPILATION_CACHE_MAX_SIZE, when set, is the user's bound instead)."""


def use_compile_cache(folder: str) -> None:
    """JAX's persistent compilation cache in `folder` ("": none): a later run of the same
    experiment loads its compiled programs (the training step, evaluation, generation) instead
    of compiling them again — what torch.compile's cache does for PyTorch users. Programs that
    compile in under 0.1 s are not stored (unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS
    says otherwise), and the folder is kept under COMPILE_CACHE_BYTES. XLA:CPU checks that a
    stored program was compiled for this CPU's features before running it (a folder shared by
    different machines recompiles, it never runs instructions the CPU lacks)."""
    if (folder or None) == jax.config.jax_compilation_cache_dir:
        return
    compilation_cache.reset_cache()  # a folder already in use by this process is let go
    compilation_cache.set_cache_dir(folder or None)
    if folder and "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    if folder and "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_BYTES)


class Parser(argparse.ArgumentParser):
    """argparse, and `--out` must be a folder it can write to, checked before any work; with
    `--compile_cache` (experiments), JAX's persistent compilation cache is set up."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if "compile_cache" in parsed:
            use_compile_cache(parsed.compile_cache)
        out = Path(parsed.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as error:
            self.error(f"--out {out} is not a folder this process can write to ({error.strerror or error})")
        return parsed


def parser(description: str, out: str = "runs", out_help: str = "root folder for runs/<name>/<timestamp>/", *,
           compile_cache: bool = True) -> Parser:
    """The command line every experiment and benchmark shares: --out, and for experiments
    (`compile_cache`) --compile_cache. Benchmarks that time compilation go without it."""
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=out, help=out_help)
    if compile_cache:
        p.add_argument("--compile_cache", default=default_compile_cache(), metavar="FOLDER",
                       help='JAX\'s persistent compilation cache: later runs load compiled programs ("": compile every run)')
    return p
