"""Reports from evaluation results: a markdown table, plots, and merging of separate runs.

- `markdown_report(results)`: accuracy (avg@k and pass@k, models as rows, benchmarks as columns, with their mean as
  the papers report it) and a diversity table (one row per benchmark and model).
- `plot_pass_at_k(results, path)`: pass@k against k (log scale), one panel per benchmark, one line per model.
- `plot_accuracy_vs_diversity(results, path)`: avg@k against a diversity measure, one panel per benchmark, one point
  per model. The measure is the first available of: distinct correct paths per problem (exact, where the benchmark
  identifies paths), the judge score, and 1 - self-BLEU.
- `merge_results([...])`: one results dict from several runs (e.g. one per model, each on its own GPU job).

matplotlib is imported only for the plots, with a message saying how to install it when it is missing.
"""

from __future__ import annotations

import logging
import os
from typing import Any


logger = logging.getLogger(__name__)

DIVERSITY_AXES = (
    ("distinct_correct_paths", "distinct correct paths / problem", lambda d: d.get("distinct_correct_paths")),
    ("judge_score", "judge diversity score (1-5)", lambda d: d.get("judge_score")),
    ("one_minus_self_bleu", "1 - self-BLEU", lambda d: None if d.get("self_bleu") is None else 1 - d["self_bleu"]),
)


def _benchmark_names(results: dict) -> list[str]:
    names: list[str] = []
    for entry in results["models"].values():
        names += [n for n in entry["benchmarks"] if n not in names]
    return names


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _settings_note(results: dict) -> str:
    seen = {}
    for label, entry in results["models"].items():
        s = entry.get("settings", {})
        key = (s.get("num_samples"), s.get("temperature"), s.get("top_p"))
        seen.setdefault(key, []).append(label)
    parts = [
        f"k = {k}, temperature {t}, top_p {p}" + ("" if len(seen) == 1 else f" ({', '.join(labels)})")
        for (k, t, p), labels in seen.items()
    ]
    note = "Sampling: " + "; ".join(parts) + "."
    if len(seen) > 1:
        note += " **The models were sampled with different settings: their numbers do not compare directly.**"
    return note


def markdown_report(results: dict) -> str:
    """The results as markdown: accuracy tables (avg@k, pass@k) and a diversity table."""
    names = _benchmark_names(results)
    models = results["models"]
    out = ["# Evaluation results", "", _settings_note(results), ""]
    for title, read in (
        ("avg@k (mean accuracy over the k samples, %)", lambda b: b["avg_at_k"]),
        ("pass@k (unbiased estimator, k = all samples, %)", lambda b: b["pass_at_k"][str(b["num_samples"])]),
    ):
        rows = []
        for label, entry in models.items():
            values = [read(entry["benchmarks"][n]) if n in entry["benchmarks"] else None for n in names]
            present = [v for v in values if v is not None]
            mean = sum(present) / len(present) if len(present) == len(names) else None
            rows.append([label, *map(_pct, values)] + ([_pct(mean)] if len(names) > 1 else []))
        out += [f"## {title}", "", _table(["model", *names] + (["mean"] if len(names) > 1 else []), rows), ""]

    rows = []
    for name in names:
        for label, entry in models.items():
            bench = entry["benchmarks"].get(name)
            if bench is None:
                continue
            d = bench["diversity"]
            rows.append(
                [
                    name,
                    label,
                    _num(d.get("distinct_correct_paths")),
                    _num(d.get("correct_path_entropy")),
                    _num(d.get("distinct_answers")),
                    _num(d.get("distinct_2"), 3),
                    _num(d.get("distinct_4"), 3),
                    _num(d.get("self_bleu"), 3),
                    _num(d.get("judge_score")),
                    _pct(bench["generation"].get("truncated_fraction")),
                ]
            )
    header = [
        "benchmark",
        "model",
        "distinct correct paths",
        "correct-path entropy",
        "distinct answers",
        "distinct-2",
        "distinct-4",
        "self-BLEU",
        "judge (1-5)",
        "truncated %",
    ]
    out += [
        "## Diversity (per problem, averaged over problems)",
        "",
        _table(header, rows),
        "",
        "Distinct correct paths count problems with no correct sample as 0; '-' means not measured (no path "
        "identifier, no extracted answers, or no judge configured). Self-BLEU: lower is more diverse.",
        "",
    ]
    return "\n".join(out)


def _figure_module():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "Plots need matplotlib: pip install 'trl-flowrl[plots]' (or matplotlib), or turn plots off "
            "(plots=False, or --no-plots on the command line)."
        ) from None
    return Figure


def _panels(count: int):
    Figure = _figure_module()
    columns = min(count, 3)
    rows = (count + columns - 1) // columns
    figure = Figure(figsize=(4.5 * columns, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return figure, axes


def plot_pass_at_k(results: dict, path: str) -> str:
    """pass@k curves (k on a log2 axis), a panel per benchmark, a line per model; saved to `path`."""
    names = _benchmark_names(results)
    figure, axes = _panels(len(names))
    for ax, name in zip(axes, names):
        all_ks = set()
        for label, entry in results["models"].items():
            bench = entry["benchmarks"].get(name)
            if bench is None:
                continue
            ks = [int(k) for k in bench["pass_at_k"]]
            all_ks.update(ks)
            ax.plot(ks, [100 * bench["pass_at_k"][str(k)] for k in ks], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
        ax.minorticks_off()
        ax.set_title(name)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def plot_accuracy_vs_diversity(results: dict, path: str) -> str:
    """avg@k against a diversity measure (see the module docstring), a panel per benchmark; saved to `path`."""
    names = _benchmark_names(results)
    figure, axes = _panels(len(names))
    for ax, name in zip(axes, names):
        benches = {label: e["benchmarks"][name] for label, e in results["models"].items() if name in e["benchmarks"]}
        axis = next(
            (a for a in DIVERSITY_AXES if all(a[2](b["diversity"]) is not None for b in benches.values())),
            None,
        )
        ax.set_title(name)
        ax.set_ylabel("avg@k (%)")
        ax.grid(True, alpha=0.3)
        if axis is None:
            ax.text(0.5, 0.5, "no diversity measure", ha="center", va="center", transform=ax.transAxes)
            continue
        _, xlabel, read = axis
        for label, bench in benches.items():
            x, y = read(bench["diversity"]), 100 * bench["avg_at_k"]
            ax.scatter([x], [y], s=40, label=label)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
        ax.set_xlabel(xlabel)
    figure.savefig(path, dpi=120)
    return path


def write_report(results: dict, output_dir: str, plots: bool = True) -> dict[str, str]:
    """Write `results.json`, `results.md` and (when `plots`) the two plots into `output_dir`; returns their paths."""
    from .evaluator import _write_json

    os.makedirs(output_dir, exist_ok=True)
    paths = {"json": os.path.join(output_dir, "results.json"), "markdown": os.path.join(output_dir, "results.md")}
    _write_json(paths["json"], results)
    with open(paths["markdown"], "w") as f:
        f.write(markdown_report(results))
    if plots:
        paths["pass_at_k"] = plot_pass_at_k(results, os.path.join(output_dir, "pass_at_k.png"))
        paths["accuracy_vs_diversity"] = plot_accuracy_vs_diversity(
            results, os.path.join(output_dir, "accuracy_vs_diversity.png")
        )
    return paths


def merge_results(runs: list[dict[str, Any]], sources: list[str] | None = None) -> dict[str, Any]:
    """One results dict holding the models of every run (labels made unique with a `-2`, `-3` suffix).

    `sources` (where each run came from), when given, is recorded per model as `source`: the models' `samples_file`
    paths stay relative to their own run's directory.
    """
    if not runs:
        raise ValueError("Nothing to merge.")
    for index, run in enumerate(runs):
        if not isinstance(run, dict) or not isinstance(run.get("models"), dict):
            what = "an object without `models`" if isinstance(run, dict) else f"a {type(run).__name__}"
            raise ValueError(f"Run {index} is not an evaluation result (an object with `models`): it is {what}.")
    merged = {key: value for key, value in runs[0].items() if key != "models"}
    merged["models"] = {}
    for index, run in enumerate(runs):
        for label, entry in run["models"].items():
            unique, n = label, 2
            while unique in merged["models"]:
                unique, n = f"{label}-{n}", n + 1
            entry = dict(entry)
            if sources is not None:
                entry["source"] = sources[index]
            merged["models"][unique] = entry
    return merged
