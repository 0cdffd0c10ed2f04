"""What every benchmark's report says about where and how it was measured, how it is written, and its plots.

`machine` (the CPU and its cores), `report_header` (the benchmark, date, machine, torch threads and package versions
that head a benchmark's JSON), `write_json` (written atomically), `quiet` (offline, no per-step chatter from
transformers and TRL), and the plots: `plot_metric` draws per-seed and mean curves of the arms (`arms.COLORS`,
`arms.LABELS`), `pyplot` is matplotlib's pyplot without a display.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from arms import COLORS, LABELS

from trl_flowrl._compat import package_versions


def machine() -> str:
    """The CPU model and core count, as every benchmark reports it."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


LOCAL_PATH_OPTIONS = ("--output-dir", "--cache-dir")  # where this machine kept files: no part of the measurement


def command_line(script: str, argv=None) -> str:
    """How a benchmark was invoked, as the README shows it: `python benchmarks/<script> <argv>` (argv None: this
    process's own arguments), without the options that only name local directories."""
    argv, kept = list(sys.argv[1:] if argv is None else argv), []
    while argv:
        flag = argv.pop(0)
        if flag in LOCAL_PATH_OPTIONS:
            argv = argv[1:]  # its value
        elif not flag.startswith(tuple(f"{option}=" for option in LOCAL_PATH_OPTIONS)):
            kept.append(flag)
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *kept])


def report_header(benchmark: str, smoke: bool, settings: dict, command: str | None = None) -> dict:
    """The head of a benchmark's JSON; `command` (see `command_line`) is how it was run, so that the README can say."""
    import torch

    return {
        "benchmark": benchmark,
        "command": command,
        "smoke": smoke,
        "date": time.strftime("%Y-%m-%d"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "versions": package_versions(),
        "settings": settings,
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def quiet() -> None:
    """Offline, one torch thread unless set otherwise, and no per-step chatter from transformers/TRL."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def plot_metric(ax, runs: dict[str, list[dict]], y, x="step", ylabel=None, xlabel=None) -> None:
    """Per-seed curves (thin) and their mean (thick) of each trainer; `y` and `x` are keys of a curve point or
    functions of one."""
    get = y if callable(y) else (lambda point: point[y])
    get_x = x if callable(x) else (lambda point: point[x])
    for name, records in runs.items():
        curves = [record["curve"] for record in records]
        for curve in curves:
            ax.plot([get_x(p) for p in curve], [get(p) for p in curve], color=COLORS[name], alpha=0.25, linewidth=0.8)
        xs = [sum(get_x(c[i]) for c in curves) / len(curves) for i in range(len(curves[0]))]
        ys = [sum(get(c[i]) for c in curves) / len(curves) for i in range(len(curves[0]))]
        ax.plot(xs, ys, color=COLORS[name], linewidth=2, label=f"{LABELS[name]} (mean of {len(curves)})")
    ax.set_xlabel(xlabel or (x if isinstance(x, str) else ""))
    ax.set_ylabel(ylabel or (y if isinstance(y, str) else ""))
    ax.grid(alpha=0.3)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
