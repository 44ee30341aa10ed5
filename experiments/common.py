"""What every experiment shares: its run directory, results.json + config.json, markdown tables."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import jax
import matplotlib

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


class Parser(argparse.ArgumentParser):
    """argparse, and `--out` must be a folder it can write to, checked before any work."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        out = Path(parsed.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as error:
            self.error(f"--out {out} is not a folder this process can write to ({error.strerror or error})")
        return parsed


def parser(description: str, out: str = "runs", out_help: str = "root folder for runs/<name>/<timestamp>/") -> Parser:
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=out, help=out_help)
    return p
