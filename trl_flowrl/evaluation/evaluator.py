"""`evaluate`: sample k completions per problem from one or more models, grade them, measure accuracy and diversity.

The result (returned, and written to `results.json` when `output_dir` is given) is a dict:

```
{"format": "trl-flowrl-evaluation/1", "created": ..., "environment": {...},
 "models": {label: {"model": path, "settings": {...},
                    "benchmarks": {name: {"num_problems", "num_samples", "max_new_tokens", "avg_at_k",
                                          "pass_at_k": {"1": ..., "2": ..., ..., "k": ...},
                                          "outcomes": {...}, "diversity": {...}, "generation": {...},
                                          "problems": [per-problem details],
                                          "samples_file": "samples/<label>/<name>.jsonl"  (or "samples": [...])}}}}}
```

Accuracies are fractions in [0, 1]. `score_samples` does the grading and metrics for completions generated
elsewhere (e.g. during training), with no model involved.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import metrics
from .benchmarks import DEFAULT_MAX_NEW_TOKENS, Benchmark, load_benchmark, problem_id, prompt_text
from .generation import Sample, check_model_path, check_sampling, load_generator, prompt_problem
from .judge import JudgeClient, JudgeConfig


logger = logging.getLogger(__name__)

FORMAT = "trl-flowrl-evaluation/1"
NGRAM_ORDERS = (1, 2, 3, 4)


# -- scoring --------------------------------------------------------------------------------------------------------


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _json_safe(value):
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def score_samples(
    benchmark: Benchmark,
    samples: Sequence[Sequence[Sample | str]],
    judge: JudgeConfig | JudgeClient | None = None,
    ks: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Grade the samples of every problem of `benchmark` and compute accuracy and diversity.

    Args:
        benchmark: the problems, grader and optional path identifier.
        samples: (P, k) completions, `Sample`s or plain strings; every problem needs the same k >= 1.
        judge: when given, the judge rubric scores each problem's samples (network calls to the configured endpoint).
        ks: the pass@k curve's k values (default 1, 2, 4, ..., k).

    Returns the benchmark's entry of the results (see the module docstring), with the per-sample records under
    `samples` (list of P lists of k dicts).
    """
    if len(samples) != len(benchmark):
        raise ValueError(f"Got samples for {len(samples)} problems, {benchmark.name!r} has {len(benchmark)}.")
    k = len(samples[0]) if samples else 0
    if k < 1 or any(len(s) != k for s in samples):
        raise ValueError("Every problem needs the same number (>= 1) of samples.")
    texts = [[s.text if isinstance(s, Sample) else str(s) for s in problem] for problem in samples]

    start = time.perf_counter()
    grades = benchmark.grade(texts)
    paths = benchmark.path_ids(texts)
    grading_seconds = time.perf_counter() - start

    judged = None
    if judge is not None:
        client = judge if isinstance(judge, JudgeClient) else JudgeClient(judge)
        judged = client.judge_many([prompt_text(row["prompt"]) for row in benchmark.rows], texts)

    problems, records = [], []
    for i, (row, problem_texts, problem_grades) in enumerate(zip(benchmark.rows, texts, grades)):
        correct = [g.correct for g in problem_grades]
        answers = [None if g.answer is None else re.sub(r"\s+", " ", g.answer.strip()) for g in problem_grades]
        entry = {
            "index": i,
            "id": _json_safe(problem_id(row)),
            "num_correct": sum(correct),
            "accuracy": sum(correct) / k,
            "outcomes": dict(Counter(g.outcome or ("correct" if g.correct else "wrong") for g in problem_grades)),
            "distinct_answers": metrics.count_distinct(answers) if any(a is not None for a in answers) else None,
            "distinct_correct_paths": None,
            "correct_path_entropy": None,
            "distinct_n": {str(n): metrics.distinct_n(problem_texts, n) for n in NGRAM_ORDERS},
            "self_bleu": metrics.self_bleu(problem_texts),
        }
        if paths is not None:
            correct_paths = [p for p, ok in zip(paths[i], correct) if ok and p is not None]
            entry["distinct_correct_paths"] = metrics.count_distinct(correct_paths)
            entry["correct_path_entropy"] = metrics.entropy(correct_paths) if correct_paths else None
        if judged is not None:
            entry["judge_score"] = judged[i].score
            if judged[i].error:
                entry["judge_error"] = judged[i].error
        problems.append(entry)
        records.append(
            [
                {
                    "problem": i,
                    "sample": j,
                    "text": text,
                    "correct": grade.correct,
                    "outcome": grade.outcome,
                    "answer": grade.answer,
                    "path_id": None if paths is None else _json_safe(paths[i][j]),
                    "num_tokens": sample.num_tokens if isinstance(sample, Sample) else None,
                    "finish_reason": sample.finish_reason if isinstance(sample, Sample) else None,
                }
                for j, (text, grade, sample) in enumerate(zip(problem_texts, problem_grades, samples[i]))
            ]
        )

    curve = metrics.pass_at_k_curve([k] * len(problems), [p["num_correct"] for p in problems], ks)
    outcomes = Counter()
    for p in problems:
        outcomes.update(p["outcomes"])
    diversity = {
        "distinct_correct_paths": None,
        "distinct_correct_paths_solved": None,
        "correct_path_entropy": None,
        "distinct_answers": _mean(p["distinct_answers"] for p in problems),
        **{f"distinct_{n}": _mean(p["distinct_n"][str(n)] for p in problems) for n in NGRAM_ORDERS},
        "self_bleu": _mean(p["self_bleu"] for p in problems),
    }
    if paths is not None:
        diversity["distinct_correct_paths"] = _mean(p["distinct_correct_paths"] for p in problems)
        diversity["distinct_correct_paths_solved"] = _mean(
            p["distinct_correct_paths"] for p in problems if p["num_correct"]
        )
        diversity["correct_path_entropy"] = _mean(p["correct_path_entropy"] for p in problems)
    if judged is not None:
        diversity["judge_score"] = _mean(r.score for r in judged)
        diversity["judge_failures"] = sum(r.score is None for r in judged)
    flat = [s for problem in samples for s in problem]
    typed = all(isinstance(s, Sample) for s in flat)
    return {
        "description": benchmark.description,
        "num_problems": len(problems),
        "num_samples": k,
        "avg_at_k": metrics.avg_at_k([[g.correct for g in problem] for problem in grades]),
        "pass_at_k": {str(kk): value for kk, value in curve.items()},
        "outcomes": dict(outcomes),
        "diversity": diversity,
        "generation": {
            "mean_completion_tokens": _mean(s.num_tokens for s in flat) if typed else None,
            "truncated_fraction": sum(s.finish_reason == "length" for s in flat) / len(flat) if typed else None,
            "grading_seconds": round(grading_seconds, 3),
        },
        "problems": problems,
        "samples": records,
    }


# -- the evaluation loop --------------------------------------------------------------------------------------------


def _default_label(model) -> str:
    if isinstance(model, str):
        parts = [p for p in re.split(r"[/\\]", model.rstrip("/\\")) if p]
        if len(parts) >= 2 and re.match(r"checkpoint-\d+$", parts[-1]):
            return f"{parts[-2]}/{parts[-1]}"
        return parts[-1] if parts else model
    return os.path.basename(str(getattr(model, "name_or_path", "") or "").rstrip("/")) or "model"


def _resolve_model(model):
    """`embedded` (the arithmetic model) and `embedded:<task>` name the package's tiny models; any other path or hub
    id is checked here (`check_model_path`), before anything is generated."""
    if isinstance(model, str) and model.split(":")[0] == "embedded" and not os.path.exists(model):
        from trl_flowrl.tasks import embedded_model_path

        return embedded_model_path(model.partition(":")[2] or "arithmetic")
    if isinstance(model, str):
        check_model_path(model)
    return model


def named_models(model) -> dict[str, Any]:
    """{label: model} from a path/hub id/instance, a list of them, a `label=path` string, or a mapping."""
    if isinstance(model, Mapping):
        named = dict(model)
    else:
        items = [model] if isinstance(model, str) or not isinstance(model, Sequence) else list(model)
        named = {}
        for item in items:
            label = None
            if isinstance(item, str) and "=" in item and not os.path.exists(item):
                label, _, item = item.partition("=")
            label = label or _default_label(item)
            base, n = label, 2
            while label in named:
                label, n = f"{base}-{n}", n + 1
            named[label] = item
    if not named:
        raise ValueError("Give at least one model to evaluate.")
    return {label: _resolve_model(m) for label, m in named.items()}


def _file_name(label: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", label).strip("_") or "model"


def _environment() -> dict[str, str | None]:
    from trl_flowrl import __version__

    env = {"python": platform.python_version(), "trl-flowrl": __version__}
    for package in ("trl", "transformers", "torch", "vllm"):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            env[package] = None
    return env


def _write_json(path: str, data: dict) -> None:
    _write_atomically(path, lambda f: json.dump(data, f, indent=2))


def _write_samples(path: str, records: list[list[dict]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_atomically(path, lambda f: f.writelines(json.dumps(r) + "\n" for problem in records for r in problem))


def _write_atomically(path: str, write) -> None:
    # A failure leaves the previous file (or none), never a truncated one.
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise


def check_prompts(benchmark: Benchmark) -> None:
    """Refuse, before any model is loaded, a benchmark with a prompt that cannot be generated from, naming the row."""
    for i, row in enumerate(benchmark.rows):
        problem = prompt_problem(row.get("prompt"))
        if problem is not None:
            source = f" ({benchmark.description})" if benchmark.description else ""
            row_id = "" if problem_id(row) is None else f", id {problem_id(row)!r}"
            raise ValueError(
                f"Benchmark {benchmark.name!r}{source}, row {i} (counting from 0{row_id}): {problem}. Fix or remove "
                "that row."
            )


def evaluate(
    model,
    benchmarks: str | Sequence[str | Benchmark] | Benchmark,
    num_samples: int = 16,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int | None = None,
    output_dir: str | None = None,
    *,
    tokenizer=None,
    backend: str = "auto",
    batch_size: int = 64,
    seed: int = 0,
    limit: int | None = None,
    grader: str | None = None,
    judge: JudgeConfig | None = None,
    plots: bool = True,
    progress: bool = True,
    model_kwargs: dict | None = None,
    vllm_kwargs: dict | None = None,
) -> dict[str, Any]:
    """Evaluate one or more models on benchmarks: k samples per problem, avg@k, pass@k curve, diversity.

    Args:
        model: a checkpoint path or hub id (`"embedded"`: the package's tiny arithmetic model,
            `"embedded:programs"`: its programming one), a model instance (with
            `tokenizer`), a list of those, `"label=path"` strings, or a {label: model} mapping. Several models go
            into one report, side by side.
        benchmarks: names (`"math500,aime24"` or a list; see `available_benchmarks()`), local dataset paths
            (graded by `grader`), or `Benchmark` objects.
        num_samples: k, samples per problem (paper: 16).
        temperature, top_p: sampling (paper: 0.6, 0.95).
        max_new_tokens: generation length for every benchmark; default each benchmark's own (8192, the paper's,
            for the math and code sets and local datasets; 80 for `arithmetic`, 128 for `programs`).
        output_dir: where `results.json`, `results.md`, the plots and `samples/<model>/<benchmark>.jsonl` go; when
            None nothing is written and the samples stay in the returned dict.
        tokenizer: the tokenizer of a model instance.
        backend: `"auto"` (vLLM if installed), `"vllm"` or `"transformers"`.
        batch_size: sequences per `generate` call (transformers backend).
        seed: sampling seed.
        limit: evaluate only the first `limit` problems of each benchmark.
        grader: the grader of local datasets (`math`, `code`, `boxed`, `module:function`), or an override for the
            built-in ones.
        judge: the judge rubric's endpoint; None (default) makes no network call.
        plots: write the plots (needs matplotlib) when `output_dir` is given.
        progress: show progress bars.
        model_kwargs: passed to `AutoModelForCausalLM.from_pretrained`.
        vllm_kwargs: passed to `vllm.LLM`.

    Returns the results dict (also written to `output_dir/results.json`). A file that cannot be written does not
    lose what was graded: a benchmark's samples then stay in `results.json` (under `samples`, with `samples_error`),
    and the returned dict lists every failed write under `write_errors` (absent when there was none).
    """
    # Wrong options, paths and prompts fail here, before any model is loaded.
    check_sampling(num_samples, temperature, top_p, 1 if max_new_tokens is None else max_new_tokens)
    models = named_models(model)  # a wrong path fails before any benchmark is loaded
    if isinstance(benchmarks, (str, Benchmark)):
        benchmarks = (
            [b.strip() for b in benchmarks.split(",") if b.strip()] if isinstance(benchmarks, str) else [benchmarks]
        )
    loaded = [b if isinstance(b, Benchmark) else load_benchmark(b, grader=grader) for b in benchmarks]
    loaded = [b.head(limit) for b in loaded]
    if not loaded:
        raise ValueError("Give at least one benchmark.")
    names = [b.name for b in loaded]
    if len(set(names)) != len(names):
        raise ValueError(f"Benchmark names must be unique, got {names}.")
    for benchmark in loaded:
        check_prompts(benchmark)
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)

    results = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": _environment(),
        "models": {},
    }
    write_errors = []

    def write_failed(what: str, error: Exception, consequence: str):
        write_errors.append(f"{what}: {error}")
        logger.error("Could not write %s (%s); %s", what, error, consequence)

    for label, checkpoint in models.items():
        generator = load_generator(
            checkpoint,
            tokenizer=tokenizer,
            backend=backend,
            batch_size=batch_size,
            seed=seed,
            model_kwargs=model_kwargs,
            vllm_kwargs=vllm_kwargs,
        )
        entry = {
            "model": checkpoint if isinstance(checkpoint, str) else _default_label(checkpoint),
            "settings": {
                "backend": generator.backend,
                "num_samples": num_samples,
                "temperature": temperature,
                "top_p": top_p,
                "seed": seed,
                "batch_size": batch_size if generator.backend == "transformers" else None,
                "limit": limit,
            },
            "benchmarks": {},
        }
        results["models"][label] = entry
        try:
            for benchmark in loaded:
                length = max_new_tokens if max_new_tokens is not None else benchmark.max_new_tokens
                length = length or DEFAULT_MAX_NEW_TOKENS
                start = time.perf_counter()
                samples = generator.generate(
                    benchmark.prompts,
                    num_samples=num_samples,
                    temperature=temperature,
                    top_p=top_p,
                    max_new_tokens=length,
                    seed=seed,
                    desc=f"{label} / {benchmark.name}",
                    progress=progress,
                )
                seconds = time.perf_counter() - start
                scored = score_samples(benchmark, samples, judge=judge)
                scored["max_new_tokens"] = length
                scored["generation"]["seconds"] = round(seconds, 3)
                if output_dir is not None:
                    relative = os.path.join("samples", _file_name(label), f"{benchmark.name}.jsonl")
                    try:
                        _write_samples(os.path.join(output_dir, relative), scored["samples"])
                    except OSError as error:
                        write_failed(relative, error, "the samples stay in results.json, under `samples`")
                        scored["samples_error"] = f"{relative}: {error}"
                    else:
                        del scored["samples"]
                        scored["samples_file"] = relative
                entry["benchmarks"][benchmark.name] = scored
                logger.info(
                    "%s / %s: avg@%d %.2f%%, pass@%d %.2f%%",
                    label,
                    benchmark.name,
                    num_samples,
                    100 * scored["avg_at_k"],
                    num_samples,
                    100 * scored["pass_at_k"][str(num_samples)],
                )
                if output_dir is not None:  # keep finished work if a later benchmark fails
                    try:
                        _write_json(os.path.join(output_dir, "results.json"), results)
                    except OSError as error:
                        write_failed("results.json", error, "trying again after the next benchmark")
        finally:
            generator.close()

    if output_dir is not None:
        from .report import write_report

        try:
            write_report(results, output_dir, plots=plots)
        except (OSError, ImportError) as error:  # ImportError: the plots' matplotlib
            write_failed(f"the report in {output_dir}", error, "the results are returned")
    if write_errors:
        results["write_errors"] = write_errors
    return results
