"""What every experiment shares: its run directory, results.json + config.json, markdown tables."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")


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


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs", help="root folder for runs/<name>/<timestamp>/")
    return p
